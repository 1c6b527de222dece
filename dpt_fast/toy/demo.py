"""``dpt-fast demo``: a complete first run with no downloads, on the toy CLIP and toy task.

1. loads the shipped toy CLIP (checksum verified) and writes the toy task to disk in CoOp's
   DTD layout;
2. zero-shot accuracy of the toy CLIP on the task's test split (hand-crafted prompts);
3. few-shot CoOp, VPT and DPT with the fast model, each trained and evaluated through the real
   engine (``dpt_fast.engine.run.train_run`` with ``--recipe toy``: the toy CLIP and the toy
   recipe of ``dpt_fast.engine.recipe``), for each seed, all with that one recipe;
4. the step time of the fast model against the reference model on the same batch;
5. prints a table (mean ± std over seeds when several) and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import DataLoader

from dpt_fast.clip_interop import OpenClipModule
from dpt_fast.config import DPTConfig
from dpt_fast.data import ImageDataset, build_dataset, build_transforms
from dpt_fast.data.records import Datum
from dpt_fast.engine.device import resolve_device
from dpt_fast.engine.recipe import TOY_MODEL, TOY_RUN, apply_recipe, recipe_model_values
from dpt_fast.toy import task
from dpt_fast.toy.options import (
    DEFAULT_EPOCHS,
    DEFAULT_METHODS,
    DEFAULT_OUTPUT_DIR,
    DEFAULT_SEEDS,
    DEFAULT_SHOTS,
    add_demo_arguments,
)
from dpt_fast.toy_clip import PRETRAINED_TAG
from dpt_fast.toy_clip.model import load_toy_backbone
from dpt_fast.zero_shot import zero_shot_classifier

if TYPE_CHECKING:
    from dpt_fast.engine.config import TrainConfig

# The toy recipe (``--recipe toy``: dpt_fast.engine.recipe, where its values are explained).
# These names keep the values that benchmarks/toy_robustness.py records with its results.
BATCH_SIZE = cast(int, TOY_RUN["batch_size"])
LR = TOY_RUN["lr"]
TEXT_LR = TOY_RUN["text_lr"]
WARMUP_EPOCHS = TOY_RUN["warmup_epochs"]
MODEL_OVERRIDES = {k: v for k, v in TOY_MODEL.items() if k != "template"}
# What the demo sets itself; everything else comes from the recipe.
_DEMO_FIELDS = frozenset({"dataset", "root", "shots", "seed", "recipe", "epochs", "pretrained",
                          "eval_batch_size", "num_workers", "device", "output_dir", "method"})
TIMING_STEPS = 5  # training steps timed for the fast / reference ratio (after one warm-up)


@torch.no_grad()
def zero_shot_accuracy(clip: OpenClipModule, items: Sequence[Datum], classnames: list[str],
                       template: str, device: torch.device, batch_size: int = 100) -> float:
    """Top-1 accuracy (%) of CLIP with hand-crafted prompts on the records ``items``."""
    clip.eval()
    text = zero_shot_classifier(clip, classnames, template)  # zero-shot CLIP's classifier
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) \
        else clip.visual.image_size
    loader = DataLoader(ImageDataset(items, build_transforms(train=False, image_size=size)),
                        batch_size=batch_size)
    correct = seen = 0
    for images, labels in loader:
        image = torch.nn.functional.normalize(clip.encode_image(images.to(device)), dim=-1)
        correct += int((image @ text.T).argmax(-1).cpu().eq(labels).sum().item())
        seen += labels.shape[0]
    return 100.0 * correct / seen


def model_config(method: str) -> DPTConfig:
    """The DPTConfig of a method on the toy task: the toy recipe's prompts and template."""
    # DPTConfig checks the method's name
    return DPTConfig(method=method, **recipe_model_values("toy", method))


def train_config(method: str, *, root: Path, output_dir: Path, shots: int, seed: int,
                 epochs: int, device: str, pretrained: str = PRETRAINED_TAG) -> TrainConfig:
    """The engine's TrainConfig of one few-shot run on the toy task: what ``dpt-fast train
    --dataset dtd --recipe toy`` builds, with the demo's shots, seed, epochs and weights."""
    from dpt_fast.engine.config import TrainConfig

    config = TrainConfig(
        dataset=task.DATASET_NAME, root=str(root), shots=shots, seed=seed, recipe="toy",
        epochs=epochs, pretrained=pretrained, eval_batch_size=100, num_workers=0,
        device=device, output_dir=str(output_dir / f"{method}_seed{seed}"),
        model=DPTConfig(method=method))
    return apply_recipe(config, _DEMO_FIELDS)


def run_method(config: TrainConfig) -> dict[str, Any]:
    """Train and evaluate one method through the engine: accuracy, times, throughput and the
    per-epoch training loss."""
    from dpt_fast.engine.run import train_run

    start = time.perf_counter()
    results = train_run(config, template_explicit=True, overwrite=True)
    wall = time.perf_counter() - start
    history = results["history"]
    train_images = config.shots * len(results["classes"])
    train_time = sum(train_images / h["images_per_s"] for h in history)
    return {"method": config.model.method, "seed": config.seed,
            "accuracy": results["test"]["accuracy"], "train_s": train_time, "wall_s": wall,
            # a method without the SGD loop (zeroshot, linear_probe) has no epochs
            "images_per_s": (sum(h["images_per_s"] for h in history) / len(history)
                             if history else None),
            "epoch_loss": [h["loss"] for h in history]}


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


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per method: the accuracy of each seed, their mean and sample std (0 for one seed)."""
    by_method: dict[str, list[float]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run["accuracy"])
    return {method: {"accuracies": accs, "mean": statistics.mean(accs),
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
            for method, accs in by_method.items()}


def format_table(zero_shot: float, runs: list[dict]) -> str:
    """The demo's result table: accuracy (mean ± std over seeds), train time per run."""
    summary = summarise(runs)
    lines = [f"{'method':<10}{'accuracy %':>16}{'vs zero-shot':>14}{'train s':>9}  seeds",
             f"{'zero-shot':<10}{zero_shot:>16.1f}{'':>14}{'-':>9}"]
    for method, stats in summary.items():
        seeds = [run for run in runs if run["method"] == method]
        train_s = statistics.mean(run["train_s"] for run in seeds)
        accuracy = f"{stats['mean']:.1f}" + (f" ± {stats['std']:.1f}" if len(seeds) > 1 else "")
        per_seed = " ".join(f"{run['seed']}:{run['accuracy']:.1f}" for run in seeds)
        lines.append(f"{method:<10}{accuracy:>16}{stats['mean'] - zero_shot:>+14.1f}"
                     f"{train_s:>9.1f}  {per_seed}")
    return "\n".join(lines)


def rounding_environment() -> dict:
    """What decides the float rounding of this process: CPU kernels and thread count."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            **{name: os.environ[name] for name in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY",
                                                   "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
               if name in os.environ}}


def run_demo(output_dir: str | Path = DEFAULT_OUTPUT_DIR, device: str = "cpu",
             shots: int = DEFAULT_SHOTS, epochs: int = DEFAULT_EPOCHS,
             seeds: tuple[int, ...] = DEFAULT_SEEDS, methods: tuple[str, ...] = DEFAULT_METHODS,
             timing: bool = True, data_dir: str | Path | None = None,
             test_per_class: int = task.TEST_PER_CLASS, pretrained: str = PRETRAINED_TAG,
             echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo and return (and write) its results; see the module docstring.

    ``pretrained``: the toy weights (``load_toy_backbone``): the shipped ones by default.
    """
    start = time.perf_counter()
    # first: "auto" becomes a device, and one this machine lacks is refused before any work
    torch_device = resolve_device(device)
    device = str(torch_device)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    clip = load_toy_backbone(pretrained, torch_device)
    root = Path(data_dir) if data_dir is not None else output_dir / "data"
    task.write_task(root, per_class={"test": test_per_class})
    splits = build_dataset(task.DATASET_NAME, root, shots=shots, seed=seeds[0])
    echo(f"toy task: {splits.num_classes} classes, {len(splits.train)} training images "
         f"({shots} shots), {len(splits.test)} test images")
    zero_shot = zero_shot_accuracy(clip, splits.test, splits.classnames, task.TEMPLATE,
                                   torch_device)
    echo(f"zero-shot accuracy: {zero_shot:.1f}%")
    runs = []
    for seed in seeds:
        for method in methods:
            config = train_config(method, root=root, output_dir=output_dir, shots=shots,
                                  seed=seed, epochs=epochs, device=device, pretrained=pretrained)
            runs.append(run_method(config))
            echo(f"{method} seed {seed}: {runs[-1]['accuracy']:.1f}% "
                 f"in {runs[-1]['wall_s']:.1f}s")
    results: dict[str, Any] = {
        "zero_shot_accuracy": zero_shot, "runs": runs, "summary": summarise(runs),
        "shots": shots, "epochs": epochs, "seeds": list(seeds), "device": device,
        "recipe": {"batch_size": BATCH_SIZE, "lr": LR, "text_lr": TEXT_LR,
                   "warmup_epochs": WARMUP_EPOCHS, "model": MODEL_OVERRIDES},
        "environment": rounding_environment()}
    echo("")
    echo(format_table(zero_shot, runs))
    if timing:
        batch = ImageDataset(splits.train[:BATCH_SIZE], build_transforms(
            train=False, image_size=clip.visual.image_size[0]))
        # the evaluation transform makes tensors
        images = torch.stack([cast(torch.Tensor, batch[i][0])
                              for i in range(len(batch))]).to(torch_device)
        labels = torch.tensor([batch[i][1] for i in range(len(batch))], device=torch_device)
        results["step_time"] = step_time_ratio(clip, splits.classnames, images, labels)
        st = results["step_time"]
        echo(f"\nDPT training step, batch {len(batch)}: fast {1000 * st['fast_step_s']:.1f} ms, "
             f"reference {1000 * st['reference_step_s']:.1f} ms, "
             f"fast/reference {st['fast_step_s'] / st['reference_step_s']:.2f} "
             f"(speed-up x{st['speedup']:.2f})")
    results["wall_s"] = time.perf_counter() - start
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    echo(f"results written to {output_dir / 'results.json'} (total {results['wall_s']:.0f}s)")
    return results


def main_from_args(args: argparse.Namespace) -> int:
    """Run the demo from parsed flags; progress bars and the table only, unless -v."""
    if not getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.WARNING)  # open_clip logs its loading at INFO
        logging.getLogger("dpt_fast").setLevel(logging.WARNING)
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"dpt-fast demo: --seeds repeats a seed: {args.seeds}")
    run_demo(args.output_dir, device=args.device, shots=args.shots, epochs=args.epochs,
             seeds=tuple(args.seeds), methods=tuple(dict.fromkeys(args.methods)),
             timing=args.timing, data_dir=args.data_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpt-fast demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return main_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
