#!/usr/bin/env python3
"""Seeded bugs in the CUDA kernels must fail ``pytest -m emulated_cuda`` (docs/cuda-emulation.md).

Copies ``csrc`` to a temporary folder, checks that the emulated tests pass on the copy, then
applies one mutant at a time — each ``__syncthreads()`` removed in turn, shuffle offsets and lanes
changed, loop bounds off by one, tail guards removed, shared-memory indices shifted — and runs
``tests/ops/test_cuda_emulation.py`` against it (``-x``: the first failing test kills the mutant).
Prints the table mutant -> killed by which test; exits 1 when a mutant survives or the unmodified
copy fails. One build folder serves every mutant, so ninja recompiles only the translation unit
a mutant touched.

    python .ci/cuda_mutation_check.py            # all mutants
    python .ci/cuda_mutation_check.py --list     # their names
    python .ci/cuda_mutation_check.py --only pv-barrier-1 --only bwd-p-lane
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORWARD = "class_aware_attention_cuda_forward.cu"
BACKWARD = "class_aware_attention_cuda_backward.cu"
SHARED = "class_aware_attention_cuda.cuh"
TEST = "tests/ops/test_cuda_emulation.py"
# Per mutant: compile of the touched unit (about a minute on 2 cores) and the tests up to the
# first failure; a mutant that makes the kernels loop forever still ends at the launch limit.
MUTANT_TIMEOUT_S = 900


@dataclass(frozen=True)
class Mutant:
    """Replace the ``occurrence``-th (0-based) ``old`` in ``file`` by ``new``."""

    name: str
    kind: str
    file: str
    old: str
    new: str
    occurrence: int = 0


def barrier_mutants() -> list[Mutant]:
    """Each __syncthreads() of the CUDA sources removed in turn."""
    mutants = []
    for file, prefix in ((FORWARD, "fwd"), (BACKWARD, "bwd"), (SHARED, "cuh")):
        text = (ROOT / "csrc" / file).read_text()
        for index, _ in enumerate(re.finditer(r"__syncthreads\(\);", text)):
            mutants.append(Mutant(f"{prefix}-barrier-{index}", "barrier removed", file,
                                  "__syncthreads();", ";", index))
    return mutants


MUTANTS: list[Mutant] = [
    # Shuffles: offsets and lanes.
    Mutant("warp-sum-offset", "shuffle offset", SHARED,
           "x += __shfl_xor_sync(kFullMask, x, offset);",
           "x += __shfl_xor_sync(kFullMask, x, offset / 2);"),
    Mutant("warp-sum-start", "shuffle offset", SHARED,
           "for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {\n    x +=",
           "for (int offset = kWarpSize / 4; offset > 0; offset /= 2) {\n    x +="),
    Mutant("fwd-stats-lane", "shuffle lane", FORWARD,
           "__shfl_xor_sync(kFullMask, run_sum[j], offset)",
           "__shfl_xor_sync(kFullMask, run_sum[j], offset ^ 1)"),
    Mutant("bwd-p-lane", "shuffle lane", BACKWARD,
           "__shfl_sync(kFullMask, p_lane[r], j)", "__shfl_sync(kFullMask, p_lane[r], j + 1)"),
    Mutant("bwd-ds-lane", "shuffle lane", BACKWARD,
           "__shfl_sync(kFullMask, ds_lane, j)", "__shfl_sync(kFullMask, ds_lane, KT - 1 - j)"),
    # Loop bounds off by one.
    Mutant("fwd-q-stage-bound", "loop bound", FORWARD,
           "e < KT * kScoreDepth;", "e <= KT * kScoreDepth;"),
    Mutant("fwd-depth-bound", "loop bound", FORWARD,
           "for (int c = 0; c < kScoreDepth; ++c) {",
           "for (int c = 0; c < kScoreDepth - 1; ++c) {"),
    Mutant("pv-key-bound", "loop bound", FORWARD,
           "for (int key = warp; key < M; key += kPvWarps)",
           "for (int key = warp; key <= M; key += kPvWarps)"),
    Mutant("bwd-score-bound", "loop bound", BACKWARD,
           "for (int c = 0; c < dk; ++c) {", "for (int c = 0; c <= dk; ++c) {"),
    Mutant("bwd-dq-keys-bound", "loop bound", BACKWARD,
           "for (int r = 0; r < kBwdKeys; ++r) {", "for (int r = 1; r < kBwdKeys; ++r) {"),
    Mutant("row-dot-bound", "loop bound", BACKWARD,
           "for (int col = lane; col < n; col += kWarpSize)",
           "for (int col = lane; col <= n; col += kWarpSize)"),
    Mutant("dq-reduce-bound", "loop bound", BACKWARD,
           "for (int t = 0; t < n_key_tiles; ++t)", "for (int t = 0; t < n_key_tiles - 1; ++t)"),
    # Tail guards removed.
    Mutant("fwd-k-tail", "tail guard", FORWARD,
           "k_s[r][c] = (key0 + r < M && d0 + c < dk)", "k_s[r][c] = (d0 + c < dk)"),
    Mutant("fwd-q-tail", "tail guard", FORWARD,
           "q_s[c][j] = (j < rows && d0 + c < dk)", "q_s[c][j] = (d0 + c < dk)"),
    Mutant("fwd-key-tail", "tail guard", FORWARD,
           "    if (key < M) {\n      const auto p_key", "    if (true) {\n      const auto p_key"),
    Mutant("pv-row-tail", "tail guard", FORWARD,
           "if (row0 + j < K && col0 + c < dv)", "if (col0 + c < dv)"),
    Mutant("bwd-go-tail", "tail guard", BACKWARD,
           "go_s[e] = j < K ? static_cast<float>(go[bK * dv + e]) : 0.f;",
           "go_s[e] = static_cast<float>(go[bK * dv + e]);"),
    Mutant("bwd-dv-tail", "tail guard", BACKWARD,
           "        if (key < M) {\n          store_from_float",
           "        if (true) {\n          store_from_float"),
    Mutant("dq-reduce-tail", "tail guard", BACKWARD,
           "if (e >= batch * row_elems) {", "if (e > batch * row_elems) {"),
    Mutant("softmax-grad-tail", "tail guard", BACKWARD,
           "if (e >= numel) {", "if (e > numel) {"),
    # Shared-memory indices shifted.
    Mutant("fwd-k-smem-index", "shared index", FORWARD,
           "const acc_t kc = k_s[tid][c];", "const acc_t kc = k_s[tid][c + 1];"),
    Mutant("fwd-stats-smem-index", "shared index", FORWARD,
           "merge_softmax_stats(row_max, row_sum, warp_max[w][tid], warp_sum_exp[w][tid]);",
           "merge_softmax_stats(row_max, row_sum, warp_max[w - 1][tid], warp_sum_exp[w][tid]);"),
    Mutant("pv-smem-index", "shared index", FORWARD,
           "partial[warp][j][lane * kPvVec + e] += acc[j][e];",
           "partial[warp][j][lane * kPvVec + e + 1] += acc[j][e];"),
    Mutant("bwd-q-smem-stride", "shared index", BACKWARD,
           "sum += ds_all[j] * q_s[j * (dk + 1) + c];", "sum += ds_all[j] * q_s[j * dk + c];"),
    Mutant("bwd-ds-smem-index", "shared index", BACKWARD,
           "ds_s[(r0 + r) * KT + lane] = ds_lane;", "ds_s[(r0 + r) * KT + lane + 1] = ds_lane;"),
]


def all_mutants() -> list[Mutant]:
    return barrier_mutants() + MUTANTS


def apply(mutant: Mutant, text: str) -> str:
    """text with the mutant's change; fails when its anchor is gone (sources changed)."""
    start = -1
    for _ in range(mutant.occurrence + 1):
        start = text.find(mutant.old, start + 1)
        if start < 0:
            raise SystemExit(f"mutant {mutant.name}: {mutant.old!r} (occurrence "
                             f"{mutant.occurrence}) not found in csrc/{mutant.file}; update "
                             f".ci/cuda_mutation_check.py")
    return text[:start] + mutant.new + text[start + len(mutant.old):]


def run_tests(env: dict[str, str], log_file: Path | None) -> tuple[bool, str, float]:
    """(passed, first failing test or "BUILD: ..." when the sources did not compile, seconds);
    pytest's output goes to log_file."""
    start = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider",
             "-m", "emulated_cuda", TEST],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=MUTANT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {MUTANT_TIMEOUT_S} s", time.monotonic() - start
    seconds = time.monotonic() - start
    log = result.stdout + result.stderr
    if log_file is not None:
        log_file.write_text(log)
    if "Error building extension" in log:
        return False, "BUILD: the sources did not compile", seconds
    if result.returncode == 0:
        return True, "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", log, re.MULTILINE)
    if failed:
        reason = re.search(r"^E\s+(\w*(Error|assert).*)$", log, re.MULTILINE)
        return False, failed[0].removeprefix(TEST + "::") + (
            f" ({reason.group(1)[:100]})" if reason else ""), seconds
    return False, (log.strip().splitlines() or ["no output"])[-1], seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--only", action="append", default=[], help="run only these mutants")
    parser.add_argument("--logs", type=Path, default=None,
                        help="folder for each run's pytest output (<mutant>.log)")
    args = parser.parse_args()
    mutants = all_mutants()
    if args.list:
        for m in mutants:
            print(f"{m.name:24} {m.kind:16} csrc/{m.file}")
        return 0
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            parser.error(f"unknown mutants: {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]

    with tempfile.TemporaryDirectory(prefix="dpt_fast_mutants_") as tmp:
        csrc = Path(tmp) / "csrc"
        shutil.copytree(ROOT / "csrc", csrc)
        env = dict(os.environ, DPT_FAST_CUDA_EMULATION_SOURCES=str(csrc),
                   DPT_FAST_CUDA_EMULATION_BUILD=str(Path(tmp) / "build"),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        total = time.monotonic()
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
        passed, detail, seconds = run_tests(env, args.logs and args.logs / "unmodified.log")
        print(f"unmodified sources: {'pass' if passed else 'FAIL ' + detail} ({seconds:.0f} s)",
              flush=True)
        if not passed:
            return 1
        rows = []
        for mutant in mutants:
            path = csrc / mutant.file
            original = path.read_text()
            path.write_text(apply(mutant, original))
            try:
                passed, detail, seconds = run_tests(
                    env, args.logs and args.logs / f"{mutant.name}.log")
            finally:
                path.write_text(original)  # a new mtime: ninja recompiles it for the next one
            verdict = "SURVIVED" if passed else "killed"
            if detail.startswith("BUILD"):
                verdict = "BROKEN"  # did not compile: not a meaningful mutant
            rows.append((mutant, verdict, detail, seconds))
            print(f"{mutant.name:24} {verdict:8} {seconds:5.0f} s  {detail}", flush=True)

    print("\n| mutant | kind | file | killed by |\n|---|---|---|---|")
    for mutant, verdict, detail, _ in rows:
        by = detail.split(" (")[0] if verdict == "killed" else f"**{verdict}**"
        print(f"| {mutant.name} | {mutant.kind} | {mutant.file} | {by} |")
    bad = [m.name for m, verdict, _, _ in rows if verdict != "killed"]
    print(f"\n{len(rows) - len(bad)} of {len(rows)} mutants killed in "
          f"{time.monotonic() - total:.0f} s" + (f"; not killed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
