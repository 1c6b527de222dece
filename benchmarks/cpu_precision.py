"""CPU fp32 vs bf16 autocast (``--precision bf16``): DPT step time and toy-task accuracy.

    nice -n -5 python benchmarks/cpu_precision.py --out benchmarks/results/cpu_precision_DATE.json

1. Speed: one training step (forward, loss, backward) and one evaluation pass (4 batches, no
   autograd) of the fast DPT with the defaults on a ViT-B/16-shaped open_clip CLIP with random
   weights, batch 8, 100 classes: ``cpu_speed.py``'s model and workloads. Each precision is
   warmed up once, then timed in interleaved rounds (fp32, bf16, fp32, bf16, ...) so that load
   from other processes on a shared machine hits both alike; the table gives the medians over
   the rounds and the median of the per-round bf16/fp32 ratios.
2. Accuracy: DPT seed 1 on the toy task with the demo's recipe (``dpt-fast demo``: 16 shots,
   12 epochs, 100 test images per class), through the engine's ``train_run``, once with fp32 and
   once with bf16 autocast (training and evaluation): the test accuracy of each.

torch runs as many intra-op threads as this process has cores (``--threads`` to change). The
JSON records the CPU (model, family, the bf16 instructions it has), torch, the date and the
load average before and after. ``--clip tiny`` with small ``--toy-*`` values is a smoke run of
a few seconds (the test of this script).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from cpu_speed import BATCH, EVAL_BATCHES, _build, workload
from json_report import emit
from toy_robustness import cpu_description

from dpt_fast.engine.device import autocast_dtype

PRECISIONS = ("fp32", "bf16")
MODES = ("train", "eval")
CPU = torch.device("cpu")
# The CPU flags that decide how bf16 matrix products run: AVX-512 BF16 has bf16 dot-product
# instructions (VDPBF16PS), AMX-BF16 tile matrix units; without either, oneDNN converts to fp32.
BF16_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_info() -> dict:
    """The CPU as ``toy_robustness.cpu_description`` gives it, plus its family and model
    numbers (the model name may be masked in a VM), its bf16 flags and what torch makes of it."""
    info = cpu_description()
    fields: dict[str, str] = {}
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
        flags = set(fields.get("flags", "").split())
    except OSError:  # not Linux: the flags stay unknown
        pass
    info.update(vendor=fields.get("vendor_id"), family=fields.get("cpu family"),
                model_number=fields.get("model"), flags={f: f in flags for f in BF16_FLAGS},
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                mkldnn_bf16_supported=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    return info


def _make_clip(kind: str) -> torch.nn.Module:
    from dpt_fast.testing import tiny_clip, vit_b16_clip

    return vit_b16_clip() if kind == "vit-b16" else tiny_clip()


def time_precisions(clip_kind: str, n_classes: int, rounds: int) -> dict:
    """Seconds per training step and per evaluation pass of the fast DPT, fp32 and bf16
    autocast interleaved round by round (one model, the same batch)."""
    clip = _make_clip(clip_kind)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    model = _build("fast", n_classes, clip=clip)
    images = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, n_classes, (BATCH,), generator=torch.Generator().manual_seed(1))
    results = {}
    for mode in MODES:
        works = {p: workload(mode, model, images, labels, autocast_dtype(p, CPU))
                 for p in PRECISIONS}
        for work in works.values():
            work()  # warm-up: oneDNN creates its bf16 primitives on first use
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for _ in range(rounds):
            for precision, work in works.items():
                start = time.perf_counter()
                work()
                times[precision].append(time.perf_counter() - start)
        ratios = [bf16 / fp32 for fp32, bf16 in zip(times["fp32"], times["bf16"], strict=True)]
        # the minimum too: on a shared machine it is the round least slowed by other processes
        results[mode] = {**{p: {"median_s": statistics.median(t), "min_s": min(t), "all_s": t}
                            for p, t in times.items()},
                         "bf16_over_fp32": statistics.median(ratios)}
        print(f"{mode}: fp32 {results[mode]['fp32']['median_s']:.3f}s, bf16 "
              f"{results[mode]['bf16']['median_s']:.3f}s", file=sys.stderr)
    return results


def toy_accuracy(work_dir: Path, seed: int, epochs: int, shots: int,
                 test_per_class: int) -> dict:
    """DPT on the toy task with the demo's recipe, trained and tested in each precision."""
    from dpt_fast.toy import demo, task

    root = work_dir / "data"
    task.write_task(root, per_class={"train": shots, "test": test_per_class})
    results = {}
    for precision in PRECISIONS:
        config = demo.train_config("dpt", root=root, output_dir=work_dir / precision,
                                   shots=shots, seed=seed, epochs=epochs, device="cpu")
        run = demo.run_method(dataclasses.replace(config, precision=precision))
        results[precision] = {"accuracy": run["accuracy"], "train_s": run["train_s"],
                              "wall_s": run["wall_s"], "epoch_loss": run["epoch_loss"]}
        print(f"toy DPT {precision}: {run['accuracy']:.2f}% in {run['wall_s']:.0f}s",
              file=sys.stderr)
    results["bf16_minus_fp32_points"] = results["bf16"]["accuracy"] - results["fp32"]["accuracy"]
    return results


def format_table(report: dict) -> str:
    """The result table: per row fp32, bf16 and their ratio (or difference)."""
    lines = [f"{'':<28}{'fp32':>10}{'bf16':>10}{'bf16/fp32':>14}"]
    for mode, label in (("train", "train step, s (median)"), ("eval", "eval pass, s (median)")):
        row = report["speed"][mode]
        lines.append(f"{label:<28}{row['fp32']['median_s']:>10.3f}{row['bf16']['median_s']:>10.3f}"
                     f"{'x' + format(row['bf16_over_fp32'], '.2f'):>14}")
    if "accuracy" in report:
        acc = report["accuracy"]
        lines.append(f"{'toy DPT test accuracy, %':<28}{acc['fp32']['accuracy']:>10.2f}"
                     f"{acc['bf16']['accuracy']:>10.2f}"
                     f"{format(acc['bf16_minus_fp32_points'], '+.2f') + ' pts':>14}")
        lines.append(f"{'toy DPT run, s (wall)':<28}{acc['fp32']['wall_s']:>10.1f}"
                     f"{acc['bf16']['wall_s']:>10.1f}"
                     f"{'x' + format(acc['bf16']['wall_s'] / acc['fp32']['wall_s'], '.2f'):>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", choices=("vit-b16", "tiny"), default="vit-b16",
                        help="the CLIP of the speed part (tiny: a smoke run)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per precision")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=1, help="the toy run's seed")
    parser.add_argument("--toy-epochs", type=int, default=None,
                        help="default: the demo's")
    parser.add_argument("--toy-shots", type=int, default=None, help="default: the demo's")
    parser.add_argument("--toy-test-per-class", type=int, default=None,
                        help="default: the toy task's")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--work-dir", help="where the toy runs go (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON report here too")
    args = parser.parse_args(argv)

    from dpt_fast.toy import task
    from dpt_fast.toy.options import DEFAULT_EPOCHS, DEFAULT_SHOTS

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("dpt_fast").setLevel(logging.WARNING)  # the runs' progress lines
    torch.set_num_threads(args.threads)
    epochs = DEFAULT_EPOCHS if args.toy_epochs is None else args.toy_epochs
    shots = DEFAULT_SHOTS if args.toy_shots is None else args.toy_shots
    test_per_class = task.TEST_PER_CLASS if args.toy_test_per_class is None \
        else args.toy_test_per_class
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "cpu": cpu_info(), "threads": torch.get_num_threads(), "nice": os.nice(0),
        "load_average_start": os.getloadavg(),
        "torch": torch.__version__, "python": platform.python_version(),
        "config": {"clip": args.clip, "classes": args.classes, "batch": BATCH,
                   "eval_batches": EVAL_BATCHES, "rounds": args.rounds,
                   "toy": {"method": "dpt", "seed": args.seed, "epochs": epochs,
                           "shots": shots, "test_per_class": test_per_class}},
    }
    report["speed"] = time_precisions(args.clip, args.classes, args.rounds)
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            report["accuracy"] = toy_accuracy(Path(args.work_dir or tmp), args.seed, epochs,
                                              shots, test_per_class)
    report["load_average_end"] = os.getloadavg()
    report["table"] = format_table(report)
    emit(report, args.out)
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
