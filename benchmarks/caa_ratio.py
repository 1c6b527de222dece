"""Interleaved A/B timing of class-aware attention forward + backward: op vs composition.

pytest-benchmark times one implementation after the other, so on a busy machine a load change
between two cases lands in their ratio. This script interleaves the implementations round by
round (op, composition, compiled; then composition, compiled, op; ...: each round starts with the
next one), computes the ratio op / baseline within each round,
and reports the median ratio and its quartiles over all rounds: the issue's number, measured so
that machine noise mostly cancels. Each timed call's gradients are dropped before the next call,
as in a training loop: on CPU the op then reuses their memory through its block cache
(csrc/cpu_block_cache.h), while the composition gets fresh memory from the default allocator, so
the CPU ratio measures that allocation policy as well as the kernels.

    python benchmarks/caa_ratio.py                          # B = 32 and 256, JSON to stdout
    python benchmarks/caa_ratio.py --threads 1 2 --out benchmarks/results/cpu_caa_ratio.json

Shapes: K=10 class queries over M=207 tokens, dk=32, dv=768 (DPT's CAVPT on ViT-B/16);
float32 on CPU, bfloat16 on a GPU. Each timed call is one forward plus ``torch.autograd.grad``
for q, k and v.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from caa_inputs import DK, DV, KEYS, ROWS, caa_inputs
from json_report import emit, write_json

from dpt_fast.ops import _extension, class_aware_attention, class_aware_attention_ref

TIMING_S = 0.05  # target length of one timing, seconds
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _timed_call(fn: Callable, leaves: tuple[torch.Tensor, ...], grad_out: torch.Tensor,
                calls: int) -> float:
    """Seconds per forward + backward of fn, averaged over `calls` back-to-back calls."""
    sync = torch.cuda.synchronize if leaves[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        torch.autograd.grad(fn(*leaves), leaves, grad_out)
    sync()
    return (time.perf_counter() - start) / calls


def measure(batch: int, rounds: int, device: str, dtype: torch.dtype,
            impls: dict[str, Callable]) -> dict:
    """Per-round times of every impl, interleaved, and the op / baseline ratios."""
    leaves, grad_out = caa_inputs(batch, device, dtype)
    for fn in impls.values():  # warm-up: caches, allocator, inductor compile
        _timed_call(fn, leaves, grad_out, 2)
    # Each timing lasts about TIMING_S (one call where a call is longer): short timings are
    # mostly noise (timer, allocator, a neighbour's burst), long ones blur the interleaving.
    single = min(_timed_call(impls["op"], leaves, grad_out, 1) for _ in range(3))
    calls = max(1, round(TIMING_S / single))
    times: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for round_index in range(rounds):
        # Each round starts with the next impl: what one impl leaves behind (heap layout, cache
        # contents) falls on every impl in turn, not always on the same neighbour.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_timed_call(impls[name], leaves, grad_out, calls))
    result = {"B": batch, "calls_per_timing": calls,
              "median_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()}}
    for base in (name for name in impls if name != "op"):
        ratios = sorted(o / b for o, b in zip(times["op"], times[base], strict=True))
        quartiles = statistics.quantiles(ratios, n=4)
        result[f"op/{base}"] = {"median": statistics.median(ratios), "q1": quartiles[0],
                                "q3": quartiles[2]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="intra-op thread counts to measure (CPU)")
    parser.add_argument("--rounds", type=int, default=42,
                        help="interleaved rounds per case (rounded up to a multiple of the number "
                        "of implementations, so that each starts the same number of rounds)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip torch.compile of the composition (inductor needs a compiler)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # Without the fused kernels the op silently runs the composition: its ratio would read as
    # parity while timing the composition against itself.
    if not _extension.extension_available():
        parser.error(f"dpt_fast._C is not loaded ({_extension.load_error()}): nothing to time")
    if device == "cuda" and not _extension.cuda_kernels_available():
        parser.error("dpt_fast._C has no CUDA kernels (built without CUDA): nothing to time")
    impls: dict[str, Callable] = {"op": class_aware_attention,
                                  "composition": class_aware_attention_ref}
    if not args.no_compile:
        impls["compiled"] = torch.compile(class_aware_attention_ref, dynamic=False)
    rounds = -(-args.rounds // len(impls)) * len(impls)
    cases: list[dict] = []
    report = {
        "what": "class_aware_attention fwd+bwd, interleaved rounds; ratio < 1: op faster",
        "shape": {"K": ROWS, "M": KEYS, "dk": DK, "dv": DV}, "dtype": str(dtype),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "rounds": rounds, "op_kernels": f"dpt_fast._C ({device})",
        "date": time.strftime("%Y-%m-%d"), "cases": cases,
    }
    if device == "cpu" and os.path.exists(THP_SETTING):
        # Page faults on fresh memory are a large part of every implementation's CPU time (the
        # op's block cache avoids most of them); huge pages change their cost for all of them.
        with open(THP_SETTING) as f:
            report["transparent_hugepage"] = f.read().strip()
    for threads in args.threads if device == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for batch in args.batches:
            case = measure(batch, rounds, device, dtype, impls) | {"threads": threads}
            cases.append(case)
            summary = ", ".join(f"{k} {v['median']:.3f} [{v['q1']:.3f}, {v['q3']:.3f}]"
                                for k, v in case.items() if k.startswith("op/"))
            print(f"threads={threads} B={batch}: {summary}", file=sys.stderr)
            if args.out:  # the cases so far, in case a time limit stops the run
                write_json(report, args.out)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
