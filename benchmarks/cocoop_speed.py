"""CPU step time and peak activation memory of the fast vs the reference CoCoOp on a
ViT-B/16-shaped CLIP (``dpt_fast.testing.vit_b16_clip``: random weights, fp32, 224 px).

Each case runs in its own subprocess (a fresh allocator and CLIP per measurement):

    python benchmarks/cocoop_speed.py                          # the default table, JSON to stdout
    python benchmarks/cocoop_speed.py --out results.json       # also write it to a file
    python benchmarks/cocoop_speed.py --case train:fast:8      # one case, here
    python benchmarks/cocoop_speed.py --reuse earlier.jsonl    # cases measured before: kept

Cases ``mode:impl:batch[:warmup[:repeats]]``, 100 classes ("class 0".."class 99"): ``train`` is
one training step (forward, cross-entropy, backward; gradients cleared), ``eval`` one evaluation
batch in eval mode under ``no_grad`` (the image features computed in the pass, as the authors' code
does), ``eval_cached`` the same with the frozen image features given (what ``dpt-fast`` does
with its frozen-feature cache). Times are the median over --repeats after ``warmup`` calls
(default 1; the default table runs the reference's minute-long calls once, without one). Both the
wall time (``seconds``) and the process's CPU time (``cpu_seconds``, ``time.process_time``) are
recorded: on one thread the CPU time is the work itself, while the wall time also counts the
time other processes of a shared machine hold the core, so ratios are taken of CPU times.

Not in the default table, for this machine's sake (23 GiB, 2 cores): the reference's batch-8
training step (its per-image loop keeps all 8 images' text graphs until backward, 8 times the
batch-1 step's activations, ~21 GiB) and its 100-image evaluation (~100 times the per-image
work of the 10-image case, over half an hour of CPU). Both are linear in the images by
construction (one image at a time), which ``ratios`` uses, per image, and says so. A result
taken from ``--reuse`` (a case measured by an earlier run or by ``--case``, in the same setting)
is marked ``"reused": true``.

Peak activation memory (``peak_activation_mib``): one more call under ``torch.profiler`` with
``profile_memory=True``; every op's own allocations and frees (``self_cpu_memory_usage``) are
summed in the order the ops started, and the peak of that running sum is the most tensor
memory the call held beyond what existed before it (the CLIP, the prompts, the inputs): its
activations, the autograd graph's saved tensors and the gradients. It counts tensors only (not
the allocator's slack), at op granularity, the same way for both models.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

N_CLASSES = 100
DEFAULT_CASES = [
    "train:fast:1", "train:reference:1:0:1",
    "train:fast:8",
    "eval:fast:10", "eval:reference:10:0:1", "eval_cached:fast:10",
    "eval:fast:100:0:1",
]
MIB = 2**20


def _build(impl: str, n_classes: int):
    """The fast or reference CoCoOp with the authors' defaults on a ViT-B/16-shaped CLIP."""
    import torch

    from dpt_fast import CoCoOp
    from dpt_fast.reference import CoCoOp as ReferenceCoCoOp
    from dpt_fast.testing import vit_b16_clip

    torch.manual_seed(0)
    cls = CoCoOp if impl == "fast" else ReferenceCoCoOp
    return cls(vit_b16_clip(), [f"class {i}" for i in range(n_classes)])


def workload(mode: str, model, images, labels):
    """The timed unit of ``mode`` as a function (see the module docstring)."""
    import torch

    def train_step() -> None:
        model.train()
        loss = model.loss(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    frozen = model.encode_image_frozen(images) if mode == "eval_cached" else None

    def eval_pass() -> None:
        model.eval()
        with torch.no_grad():
            model(images, frozen_features=frozen)

    return train_step if mode == "train" else eval_pass


def peak_activation_bytes(work) -> int:
    """The peak of the tensor memory ``work()`` allocates beyond what exists before it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        work()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def run_case(case: str, repeats: int) -> dict:
    """Measure one case in this process."""
    import torch

    mode, impl, batch, *rest = case.split(":")
    batch, warmup = int(batch), int(rest[0]) if rest else 1
    repeats = int(rest[1]) if len(rest) > 1 else repeats
    model = _build(impl, N_CLASSES)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=gen)
    labels = torch.randint(0, N_CLASSES, (batch,), generator=gen)
    work = workload(mode, model, images, labels)
    for _ in range(warmup):
        work()
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        work()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "case": case, "mode": mode, "impl": impl, "batch": batch, "n_classes": N_CLASSES,
        "seconds": statistics.median(times), "all_seconds": times,
        "cpu_seconds": statistics.median(cpu_times), "all_cpu_seconds": cpu_times,
        # the memory target is a training step's; evaluation runs without a graph
        "peak_activation_mib": peak_activation_bytes(work) / MIB if mode == "train" else None,
        "text_positions": model.prompt_learner.used_length,
        "threads": torch.get_num_threads(),
    }


def ratios(results: list[dict]) -> dict:
    """Reference over fast for every fast case: CPU-time speed-up and activation-memory
    fraction against the reference case of the same mode (``eval`` for ``eval_cached``) at the
    same batch, else at another batch per image (the reference's work, time and activations
    are linear in the images: it runs them one at a time), marked ``per_image_from``."""
    done = [r for r in results if "seconds" in r]
    out = {}
    for r in done:
        if r["impl"] != "fast":
            continue
        mode = "eval" if r["mode"] == "eval_cached" else r["mode"]
        twins = [t for t in done if t["impl"] == "reference" and t["mode"] == mode]
        if not twins:
            continue
        same = [t for t in twins if t["batch"] == r["batch"]]
        twin = same[0] if same else twins[0]
        images = r["batch"] / twin["batch"]  # the reference's cost scaled to this batch
        entry = {"speedup": twin["cpu_seconds"] * images / r["cpu_seconds"],
                 "wall_speedup": twin["seconds"] * images / r["seconds"]}
        if r["peak_activation_mib"] is not None and twin["peak_activation_mib"] is not None:
            entry["activation_memory_fraction"] = (r["peak_activation_mib"]
                                                   / (twin["peak_activation_mib"] * images))
        if not same:
            entry["per_image_from"] = twin["case"]
        out[r["case"]] = entry
    return out


def _cpu_model() -> str:
    """The CPU's model name (as ``lscpu`` reads it), or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case here (mode:impl:batch) and print JSON")
    parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results JSON here too")
    parser.add_argument("--reuse", nargs="*", default=[],
                        help="files of result lines an earlier run printed (stderr, one JSON "
                             "object a line; --case output): cases found there are not run again")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return 0

    import torch
    from json_report import emit, run_case_in_subprocess  # beside this script (run by path)

    earlier = {}
    for path in args.reuse:
        with open(path) as f:
            for line in f:
                if line.startswith("{"):
                    found = json.loads(line)
                    if "seconds" in found:
                        earlier[found["case"]] = found
    results = []
    for case in args.cases:
        if case in earlier:
            results.append({**earlier[case], "reused": True})
            continue
        results.append(run_case_in_subprocess(__file__, case, args.repeats))
        print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpus": torch.get_num_threads(), "torch": torch.__version__,
        "python": sys.version.split()[0],
        "model": "CoCoOp (authors' defaults) on a ViT-B/16-shaped open_clip CLIP, random "
                 f"weights, fp32, {N_CLASSES} classes",
        "results": results, "fast_vs_reference": ratios(results),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
