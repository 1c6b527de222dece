"""``dpt-fast demo``: a complete first run with no downloads, on the toy CLIP and toy task.

1. loads the shipped toy CLIP (checksum verified) and writes the toy task to disk in CoOp's
   DTD layout;
2. zero-shot accuracy of the toy CLIP on the task's test split (hand-crafted prompts);
3. few-shot CoOp, VPT and DPT with the fast model, each trained and evaluated through the real
   engine (``dpt_fast.engine.run.train_run``);
4. the step time of the fast model against the reference model on the same batch;
5. prints a table and writes ``results.json`` to the output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dpt_fast.config import DPTConfig
from dpt_fast.data import ImageDataset, build_dataset, build_transforms
from dpt_fast.tokenizer import ClipTokenizer
from dpt_fast.toy import task
from dpt_fast.toy.model import CONFIG_PATH, load_toy_clip, write_full_checkpoint
from dpt_fast.toy.options import (
    DEFAULT_EPOCHS,
    DEFAULT_METHODS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEED,
    DEFAULT_SHOTS,
    add_demo_arguments,
)

BATCH_SIZE = 16
# Learning rates for the toy (the authors' 0.002 / 0.01 over 60 epochs are too slow for 20).
TEXT_LR = 0.05
VISUAL_LR = 0.2
# The toy model's prompt sizes: short contexts for a small model and 24 classes.
MODEL_OVERRIDES = {"n_text_ctx": 4, "n_visual_ctx": 4, "cavpt_top_k": 5, "cavpt_n_ctx": 4,
                   "guidance_epochs": 5}
TIMING_STEPS = 5  # training steps timed for the fast / reference ratio (after one warm-up)
FULL_CHECKPOINT = "toy_clip_full.safetensors"


@torch.no_grad()
def zero_shot_accuracy(clip: torch.nn.Module, items, classnames: list[str], template: str,
                       device: torch.device, batch_size: int = 100) -> float:
    """Top-1 accuracy (%) of CLIP with hand-crafted prompts on the records ``items``."""
    clip.eval()
    tokens = ClipTokenizer()([template.format(name) for name in classnames]).to(device)
    text = torch.nn.functional.normalize(clip.encode_text(tokens), dim=-1)
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) \
        else clip.visual.image_size
    loader = DataLoader(ImageDataset(items, build_transforms(train=False, image_size=size)),
                        batch_size=batch_size)
    correct = seen = 0
    for images, labels in loader:
        image = torch.nn.functional.normalize(clip.encode_image(images.to(device)), dim=-1)
        correct += (image @ text.T).argmax(-1).cpu().eq(labels).sum().item()
        seen += labels.shape[0]
    return 100.0 * correct / seen


def model_config(method: str) -> DPTConfig:
    """The DPTConfig of a method on the toy task."""
    overrides = dict(MODEL_OVERRIDES)
    if method != "dpt":
        overrides = {k: v for k, v in overrides.items() if not k.startswith("cavpt")}
    return DPTConfig(method=method, template=task.TEMPLATE, **overrides)


def train_config(method: str, *, root: Path, output_dir: Path, pretrained: Path, shots: int,
                 seed: int, epochs: int, device: str):
    """The engine's TrainConfig of one few-shot run on the toy task."""
    from dpt_fast.engine.config import TrainConfig

    return TrainConfig(
        dataset=task.DATASET_NAME, root=str(root), shots=shots, seed=seed,
        backbone=str(CONFIG_PATH), pretrained=str(pretrained), epochs=epochs,
        batch_size=BATCH_SIZE, eval_batch_size=100, lr=VISUAL_LR, text_lr=TEXT_LR,
        warmup_epochs=0, text_warmup_epochs=0, num_workers=0, device=device,
        output_dir=str(output_dir / method), model=model_config(method),
    )


def run_method(config) -> dict:
    """Train and evaluate one method through the engine; accuracy, times and throughput."""
    from dpt_fast.engine.run import train_run

    start = time.perf_counter()
    results = train_run(config, template_explicit=True, overwrite=True)
    wall = time.perf_counter() - start
    history = results["history"]
    train_images = config.shots * len(results["classes"])
    train_time = sum(train_images / h["images_per_s"] for h in history)
    return {"method": config.model.method, "accuracy": results["test"]["accuracy"],
            "train_s": train_time, "wall_s": wall, "epochs": len(history),
            "images_per_s": sum(h["images_per_s"] for h in history) / len(history)}


def step_time_ratio(clip: torch.nn.Module, classnames: list[str], images: torch.Tensor,
                    labels: torch.Tensor, steps: int = TIMING_STEPS) -> dict:
    """Seconds per training step (forward, loss, backward) of the fast and reference DPT on
    the same batch, and their ratio."""
    from dpt_fast import DPT
    from dpt_fast.reference import DPT as ReferenceDPT

    times = {}
    for name, cls in (("fast", DPT), ("reference", ReferenceDPT)):
        torch.manual_seed(0)
        model = cls(clip, classnames, model_config("dpt")).to(images.device).train()
        for step in range(steps + 1):
            if step == 1:
                _sync(images.device)
                start = time.perf_counter()
            out = model(images)
            model.loss(out, labels, epoch=0).backward()
        _sync(images.device)
        times[name] = (time.perf_counter() - start) / steps
    return {"fast_step_s": times["fast"], "reference_step_s": times["reference"],
            "speedup": times["reference"] / times["fast"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(zero_shot: float, rows: list[dict]) -> str:
    lines = [f"{'method':<10}{'accuracy %':>12}{'train s':>10}{'images/s':>10}",
             f"{'zero-shot':<10}{zero_shot:>12.1f}{'-':>10}{'-':>10}"]
    for row in rows:
        lines.append(f"{row['method']:<10}{row['accuracy']:>12.1f}{row['train_s']:>10.1f}"
                     f"{row['images_per_s']:>10.1f}")
    return "\n".join(lines)


def run_demo(output_dir: str | Path = DEFAULT_OUTPUT_DIR, device: str = "cpu",
             shots: int = DEFAULT_SHOTS, epochs: int = DEFAULT_EPOCHS, seed: int = DEFAULT_SEED,
             methods: tuple[str, ...] = DEFAULT_METHODS, timing: bool = True,
             test_per_class: int = task.TEST_PER_CLASS, echo=print) -> dict:
    """Run the demo and return (and write) its results; see the module docstring."""
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch_device = torch.device(device)
    clip = load_toy_clip(torch_device)
    checkpoint = write_full_checkpoint(clip, output_dir / FULL_CHECKPOINT)
    root = output_dir / "data"
    task.write_task(root, per_class={"test": test_per_class})
    splits = build_dataset(task.DATASET_NAME, root, shots=shots, seed=seed)
    echo(f"toy task: {splits.num_classes} classes, {len(splits.train)} training images "
         f"({shots} shots), {len(splits.test)} test images")
    zero_shot = zero_shot_accuracy(clip, splits.test, splits.classnames, task.TEMPLATE,
                                   torch_device)
    echo(f"zero-shot accuracy: {zero_shot:.1f}%")
    rows = []
    for method in methods:
        config = train_config(method, root=root, output_dir=output_dir, pretrained=checkpoint,
                              shots=shots, seed=seed, epochs=epochs, device=device)
        rows.append(run_method(config))
        echo(f"{method}: {rows[-1]['accuracy']:.1f}% in {rows[-1]['wall_s']:.1f}s")
    results = {"zero_shot_accuracy": zero_shot, "methods": rows, "shots": shots,
               "epochs": epochs, "seed": seed, "device": device}
    echo("")
    echo(format_table(zero_shot, rows))
    if timing:
        batch = ImageDataset(splits.train[:BATCH_SIZE], build_transforms(
            train=False, image_size=clip.visual.image_size[0]))
        images = torch.stack([batch[i][0] for i in range(len(batch))]).to(torch_device)
        labels = torch.tensor([batch[i][1] for i in range(len(batch))], device=torch_device)
        results["step_time"] = step_time_ratio(clip, splits.classnames, images, labels)
        st = results["step_time"]
        echo(f"\nDPT training step, batch {len(batch)}: fast {1000 * st['fast_step_s']:.1f} ms, "
             f"reference {1000 * st['reference_step_s']:.1f} ms, "
             f"speed-up x{st['speedup']:.2f}")
    results["wall_s"] = time.perf_counter() - start
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    echo(f"results written to {output_dir / 'results.json'} (total {results['wall_s']:.0f}s)")
    return results


def main_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed flags; progress bars and the table only, unless -v."""
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.WARNING)  # open_clip logs its loading at INFO
        logging.getLogger("dpt_fast").setLevel(logging.WARNING)
    run_demo(args.output_dir, device=args.device, shots=args.shots, epochs=args.epochs,
             seed=args.seed, methods=tuple(args.methods))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-fast demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

