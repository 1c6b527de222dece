"""Compile every Triton kernel of dpt_fast ahead of time for a GPU, report each one's resources.

Usage: python .ci/triton_aot_check.py [--archs 90,80] [--shapes NAME,...] [--dtypes bf16,...]
                                      [--kernels NAME,...] [--quick] [--jobs N]

No GPU is needed. A stand-in Triton driver names the GPU to compile for (sm_90: H100/H200; sm_80:
A100); the op's own launchers (``dpt_fast.kernels.prompt_attention``, under ``compile_only``)
run on CPU tensors of each representative shape below, in each dtype and dot precision, so
Triton specializes the kernels exactly as for the same CUDA tensors and the autotuned kernels
prune their candidates exactly as at run time. Triton's ``jit_cache_hook`` catches every compile
the launch would do (an autotuned kernel: each configuration its pruning keeps) instead of
compiling it; a process pool then compiles the distinct ones through ``JITFunction.preload``,
with an empty kernel cache and Triton's ptxas log on.

Printed: one row per compiled kernel (kernel, block config, warps, stages, dtype, the shapes
that use it, registers per thread, spill stores / loads in bytes, shared memory in bytes).
Exit status 1 when a compile fails, or a kernel the launchers may launch spills registers,
needs more shared memory per block than the GPU has, or more registers per block than an SM
has (registers per thread × 32 × warps).

``.ci/run`` runs it for sm_90 with the installed triton (the ``triton_aot`` stage), and with
``--quick`` in the venv of the GPU machine's versions (``aot_image``). The full check with that
triton (3.6), or any other: from a venv where that triton and dpt_fast are installed, run
``python .ci/triton_aot_check.py`` there (the script needs triton and torch's dtypes, not a
torch built for that triton); ``--archs 90,80`` adds the A100.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

if __name__ == "__main__":
    # Before anything imports triton: Triton compiles (never interprets) here, and an empty
    # kernel cache makes every kernel go through ptxas, whose log carries registers and spills.
    # The pool's workers inherit both.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpt_fast_triton_aot_")

import torch
import triton
from triton.backends.compiler import GPUTarget


@dataclass(frozen=True)
class Gpu:
    """The limits a compiled kernel must fit on one GPU architecture."""

    name: str
    shared_per_block: int  # bytes of shared memory one block may use (opt-in maximum)
    registers_per_sm: int = 65536
    registers_per_thread: int = 255


GPUS = {
    90: Gpu("H100/H200 (sm_90)", 227 * 1024),
    80: Gpu("A100 (sm_80)", 163 * 1024),
}


@dataclass(frozen=True)
class Shape:
    """One representative call of prompt_attention: q (B, H, Nq, D), k/v (B, H, Nk, D),
    prompts (Bp, H, P, D)."""

    name: str
    batch: int
    heads: int
    n_q: int
    n_k: int
    n_p: int
    prompt_batch: int
    dim: int
    causal: bool


def _shapes() -> list[Shape]:
    """ViT-B/16 vision layers (197 tokens, 12 heads, 10 prompts; shared or per-image prompts;
    the last layer's CLS query alone), the 77-token causal text encoder, a text suffix after a
    shared causal prefix (17 tokens: SOS + 16 context), and the vision forms at head dims 80
    (ViT-H/14) and 128 (the largest head block). open_clip's text towers all have head dim 64."""
    shapes = [
        Shape("vit-shared", 2, 12, 197, 197, 10, 1, 64, False),
        Shape("vit-per-image", 2, 12, 197, 197, 10, 2, 64, False),
        Shape("vit-cls", 2, 12, 1, 197, 10, 2, 64, False),
        Shape("text77", 4, 8, 77, 77, 0, 1, 64, True),
        Shape("text-suffix", 4, 8, 20, 20, 17, 1, 64, True),
    ]
    for dim in (80, 128):
        shapes += [
            Shape(f"vit-shared-d{dim}", 2, 16, 257, 257, 10, 1, dim, False),
            Shape(f"vit-cls-d{dim}", 2, 16, 1, 257, 10, 2, dim, False),
        ]
    return shapes


SHAPES = {s.name: s for s in _shapes()}
# dtype label -> (torch dtype, torch's float32 matmul precision: "highest" = IEEE dots, "high"
# = TF32 dots in the kernels, as the launchers read it).
DTYPES = {
    "bf16": (torch.bfloat16, "highest"),
    "fp16": (torch.float16, "highest"),
    "fp32": (torch.float32, "highest"),
    "fp32-tf32": (torch.float32, "high"),
}


KERNELS = ["forward_kernel", "backward_preprocess_kernel", "backward_dkdv_kernel",
           "backward_dq_kernel"]


class _CompileTargetDriver:
    """The part of a Triton driver that compiling needs: a device, a stream and the target GPU.
    Nothing launches, so nothing else is asked of it."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _use_target(arch: int) -> None:
    """Makes Triton compile for this architecture from now on in this process (there is no
    real driver to go back to without a GPU)."""
    triton.runtime.driver.set_active(_CompileTargetDriver(arch))


@dataclass
class Unit:
    """One distinct compile: a kernel specialized for arguments, one config, one architecture."""

    arch: int
    module: str
    kernel: str
    specialization: str  # Triton's JSON for JITFunction.preload
    dtype: str
    config: str
    warps: int
    shapes: list[str] = field(default_factory=list)


def _config_label(constants: dict, arg_names: list[str], num_warps: int, num_stages: int) -> str:
    by_name = {arg_names[key[0]] if isinstance(key, tuple) else key: value
               for key, value in constants.items()}
    tile = "x".join(str(by_name[n]) for n in ("BLOCK_M", "BLOCK_N") if n in by_name)
    return f"{tile} w{num_warps} s{num_stages}"


def collect(arch: int, shapes: list[Shape], dtypes: list[str], quick: bool = False) -> list[Unit]:
    """Every compile the launchers would do on this architecture for these shapes and dtypes:
    forward and backward of each shape, caught by Triton's jit_cache_hook, deduplicated.

    quick: only the first configuration the pruning keeps per kernel, dtype and shape.
    """
    from dpt_fast.kernels import prompt_attention as launchers

    units: dict[tuple[str, str], Unit] = {}
    current: dict[str, str] = {}
    seen: set[tuple[str, str, str]] = set()

    def hook(*, fn: object, compile: dict, **_: object) -> bool:
        if quick and (fn.name, current["dtype"], current["shape"]) in seen:
            return True
        seen.add((fn.name, current["dtype"], current["shape"]))
        jit = fn.jit_function
        label = _config_label(compile["constants"], jit.arg_names, compile["num_warps"],
                              compile["num_stages"])
        key = (fn.name, compile["specialization_data"])
        unit = units.setdefault(key, Unit(arch, fn.module, fn.name, key[1], current["dtype"],
                                          label, compile["num_warps"]))
        if current["shape"] not in unit.shapes:
            unit.shapes.append(current["shape"])
        return True  # compiled later, in the pool

    previous_hook = triton.knobs.runtime.jit_cache_hook
    previous_precision = torch.get_float32_matmul_precision()
    triton.knobs.runtime.jit_cache_hook = hook
    try:
        _use_target(arch)
        with launchers.compile_only():
            for dtype in dtypes:
                torch_dtype, precision = DTYPES[dtype]
                torch.set_float32_matmul_precision(precision)
                for shape in shapes:
                    current.update(dtype=dtype, shape=shape.name)
                    _run_launchers(launchers, shape, torch_dtype)
    finally:
        triton.knobs.runtime.jit_cache_hook = previous_hook
        torch.set_float32_matmul_precision(previous_precision)
    return list(units.values())


def _run_launchers(launchers: object, shape: Shape, dtype: torch.dtype) -> None:
    """Forward and backward of one shape through the launchers (compile only)."""
    q = torch.empty(shape.batch, shape.heads, shape.n_q, shape.dim, dtype=dtype)
    k = torch.empty(shape.batch, shape.heads, shape.n_k, shape.dim, dtype=dtype)
    v = torch.empty_like(k)
    k_prompt = torch.empty(shape.prompt_batch, shape.heads, shape.n_p, shape.dim, dtype=dtype)
    v_prompt = torch.empty_like(k_prompt)
    scale = shape.dim ** -0.5
    out, lse = launchers.prompt_attention_fwd(q, k, v, k_prompt, v_prompt, shape.causal, scale)
    launchers.prompt_attention_bwd(torch.empty_like(q), q, k, v, k_prompt, v_prompt, out, lse,
                                   shape.causal, scale)


@dataclass
class Resources:
    """What ptxas and Triton report for one compiled kernel."""

    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0  # bytes per block: Triton's dynamic shared memory + ptxas' static smem
    error: str = ""


_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> Resources:
    """Registers, spills, stack and static shared memory from ``ptxas -v`` of one kernel (frames
    of functions that were not inlined add up)."""
    found = Resources()
    for match in _FRAME.finditer(log):
        found.stack += int(match[1])
        found.spill_stores += int(match[2])
        found.spill_loads += int(match[3])
    used = _USED.findall(log)
    if used:
        found.registers = max(int(r) for r in used)
    found.shared = sum(int(s) for s in _SMEM.findall(log))
    return found


def compile_unit(arch: int, module: str, kernel: str, specialization: str) -> Resources:
    """Compiles one unit for the architecture (in a pool worker) and reads its resources."""
    target = importlib.import_module(module)
    fn = getattr(target, kernel)
    if isinstance(fn, triton.runtime.Autotuner):
        fn = fn.fn
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    try:
        _use_target(arch)
        with contextlib.redirect_stdout(log):
            compiled = fn.preload(specialization)
    except Exception as error:  # every failure is a row of the report
        return Resources(error=f"{type(error).__name__}: {str(error).strip()[-300:]}")
    found = parse_ptxas_log(log.getvalue())
    if found.registers < 0:
        return Resources(error="no ptxas report (was the kernel cache not empty?)")
    found.shared += compiled.metadata.shared
    return found


def problems(unit: Unit, found: Resources) -> list[str]:
    """Why this compiled kernel must not be launched on the architecture (empty: it may)."""
    if found.error:
        return [found.error]
    gpu = GPUS[unit.arch]
    why = []
    if found.spill_stores or found.spill_loads:
        why.append(f"spills {found.spill_stores}+{found.spill_loads} B")
    if found.shared > gpu.shared_per_block:
        why.append(f"shared memory {found.shared} B > {gpu.shared_per_block} B")
    if found.registers * 32 * unit.warps > gpu.registers_per_sm:
        why.append(f"{found.registers} registers x 32 x {unit.warps} warps > "
                   f"{gpu.registers_per_sm}")
    return why


def _compile_job(job: tuple[int, str, str, str]) -> Resources:
    return compile_unit(*job)


def run(archs: list[int], shapes: list[Shape], dtypes: list[str], jobs: int,
        quick: bool = False, kernels: list[str] | None = None) -> list[tuple[Unit, Resources]]:
    """Collects and compiles every unit (of these kernels only, if given); results in a stable
    order."""
    units = [u for arch in archs for u in collect(arch, shapes, dtypes, quick)
             if kernels is None or u.kernel in kernels]
    work = [(u.arch, u.module, u.kernel, u.specialization) for u in units]
    if jobs > 1:
        # spawn: the workers start clean instead of inheriting torch's threads.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            found = list(pool.map(_compile_job, work))
    else:
        found = [_compile_job(job) for job in work]
    rows = list(zip(units, found, strict=True))
    rows.sort(key=lambda r: (-r[0].arch, r[0].kernel, r[0].dtype, r[0].config, r[0].shapes))
    return rows


def print_table(rows: list[tuple[Unit, Resources]]) -> int:
    """Prints the report; returns the number of rows with problems."""
    header = (f"{'arch':<6} {'kernel':<27} {'config':<14} {'dtype':<9} {'regs':>4} "
              f"{'spill st+ld':>11} {'smem B':>7}  shapes / problems")
    print(header)
    print("-" * len(header))
    bad = 0
    for unit, found in rows:
        why = problems(unit, found)
        bad += bool(why)
        spills = f"{found.spill_stores}+{found.spill_loads}"
        note = ", ".join(unit.shapes) + (f"  <-- FAIL: {'; '.join(why)}" if why else "")
        print(f"sm_{unit.arch:<3} {unit.kernel:<27} {unit.config:<14} {unit.dtype:<9} "
              f"{found.registers:>4} {spills:>11} {found.shared:>7}  {note}")
    return bad


def _list(value: str, allowed: dict | list) -> list:
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="90",
                        type=lambda v: [int(a) for a in _list(v, [str(g) for g in GPUS])])
    parser.add_argument("--shapes", default=",".join(SHAPES), type=lambda v: _list(v, SHAPES))
    parser.add_argument("--dtypes", default=",".join(DTYPES), type=lambda v: _list(v, DTYPES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiling processes (default: one per CPU)")
    parser.add_argument("--kernels", type=lambda v: _list(v, KERNELS),
                        help=f"only these kernels (default: all of {', '.join(KERNELS)})")
    parser.add_argument("--quick", action="store_true",
                        help="only the first configuration the pruning keeps per kernel, dtype "
                             "and shape (a smoke test, not the check)")
    args = parser.parse_args(argv)
    if "nvidia" not in triton.backends.backends:
        print(f"triton {triton.__version__} has no NVIDIA backend to compile with", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        rows = run(args.archs, [SHAPES[s] for s in args.shapes], args.dtypes, args.jobs,
                   args.quick, args.kernels)
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
    bad = print_table(rows)
    print(f"triton {triton.__version__}, torch {torch.__version__}: {len(rows)} kernels compiled "
          f"for {', '.join(f'sm_{a}' for a in args.archs)} in {time.perf_counter() - start:.0f} s "
          f"with {args.jobs} processes; {bad} with problems")
    if not rows:
        print("nothing was compiled: the launchers did not reach Triton", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
