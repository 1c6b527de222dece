"""CPU step time and peak memory of the fast vs the reference DPT on a ViT-B/16-shaped CLIP.

Each measurement runs in its own subprocess, so its peak resident memory (ru_maxrss) is its own.

    python benchmarks/cpu_speed.py                       # the default table, JSON to stdout
    python benchmarks/cpu_speed.py --out results.json    # also write it to a file

Cases: one training step (forward + loss + backward, batch 8) with 100 and 397 classes, for
both models, and the fast model with 1000 classes; one evaluation pass over 4 batches of 8
with 397 classes (eval mode, no autograd). Times are the median over --repeats after a warm-up.
The reference's 1000-class step is not run: it needs more memory than a 24 GiB machine has.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time

from json_report import emit, run_case_in_subprocess

DEFAULT_CASES = [
    "train:fast:100", "train:reference:100",
    "train:fast:397", "train:reference:397",
    "train:fast:1000",
    "eval:fast:397", "eval:reference:397",
]
BATCH = 8
EVAL_BATCHES = 4


def _build(impl: str, n_classes: int, clip=None):
    """The fast or reference DPT with the defaults on ``clip`` (default: a ViT-B/16-shaped CLIP
    with random weights) and ``n_classes`` classes "class 0".."class N-1"."""
    import torch

    from dpt_fast import DPT, DPTConfig
    from dpt_fast.reference import DPT as ReferenceDPT
    from dpt_fast.testing import vit_b16_clip

    torch.manual_seed(0)
    cls = DPT if impl == "fast" else ReferenceDPT
    clip = vit_b16_clip() if clip is None else clip
    return cls(clip, [f"class {i}" for i in range(n_classes)], DPTConfig())


def workload(mode: str, model, images, labels, amp_dtype=None):
    """The timed unit of ``mode`` as a function: "train", one training step (forward, loss,
    backward); "eval", an evaluation pass over EVAL_BATCHES batches (eval mode, no autograd).
    ``amp_dtype``: autocast the forward and the loss to it, as the engine's Trainer does."""
    import torch

    def autocast():
        return torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16,
                              enabled=amp_dtype is not None)

    def train_step():
        model.train()  # an eval pass before (same model) left it in eval mode
        with autocast():
            loss = model.loss(model(images), labels, epoch=0)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def eval_pass():
        # a fresh evaluation: the text cache is cleared as train() -> eval() does
        model.train()
        model.eval()
        with torch.no_grad(), autocast():
            for _ in range(EVAL_BATCHES):
                model(images)

    return train_step if mode == "train" else eval_pass


def run_case(case: str, repeats: int) -> dict:
    """Measure one case in this process: {'case', 'seconds', 'peak_rss_gib', ...}."""
    import torch

    mode, impl, n_classes = case.split(":")
    n_classes = int(n_classes)
    model = _build(impl, n_classes)
    images = torch.randn(BATCH, 3, 224, 224)
    labels = torch.randint(0, n_classes, (BATCH,))
    work = workload(mode, model, images, labels)
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return {
        "case": case, "mode": mode, "impl": impl, "n_classes": n_classes, "batch": BATCH,
        "seconds": statistics.median(times), "all_seconds": times,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case here (mode:impl:classes) and print JSON")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="write the results JSON here too")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return 0

    import torch

    results = []
    for case in args.cases:
        results.append(run_case_in_subprocess(__file__, case, args.repeats))
        print(json.dumps(results[-1]), file=sys.stderr)
    by_case = {r["case"]: r for r in results if "seconds" in r}
    ratios = {}
    for case, r in by_case.items():
        twin = case.replace(":fast:", ":reference:")
        if r["impl"] == "fast" and twin in by_case:
            ref = by_case[twin]
            ratios[case] = {"speedup": ref["seconds"] / r["seconds"],
                            "memory_ratio": r["peak_rss_gib"] / ref["peak_rss_gib"]}
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0],
        "model": "ViT-B/16-shaped open_clip CLIP, random weights, fp32",
        "results": results, "fast_vs_reference": ratios,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
