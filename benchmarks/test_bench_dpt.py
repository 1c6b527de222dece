"""DPT model-level benchmarks: training step and evaluation, reference vs fast, eager vs compiled.

Modes (one case = one mode, implementation, class count, batch and CLIP):

* ``train``: one training step, forward + loss + backward (``zero_grad`` included, no
  optimizer step);
* ``eval_pass``: one evaluation batch in eval mode under ``no_grad`` **with the text cache warm**
  (the fast model encodes the learned text once and reuses it; the reference has no cache and
  runs its text tower every batch);
* ``eval_epoch``: 4 evaluation batches from a **cold** text cache (``train()`` then ``eval()``
  before each round, as at the start of an evaluation), so the fast model's text encoding is
  paid once per round.

Implementations: ``reference`` (eager ``dpt_fast.reference.DPT``), ``reference_compiled``
(``torch.compile`` of it), ``fast`` (``dpt_fast.DPT``), ``fast_compiled``.

GPU (bf16 autocast, inductor): ViT-B/16 at 224 px, batch 32, 10 / 100 / 397 / 1000 classes eager,
compiled at 100 classes only (each compiled model costs ~30-60 s of compilation per graph);
a batch-256, 100-class training step (reference and fast, eager) for the utilisation target;
ViT-L/14 (``ViT-L-14-quickgelu``, random weights) at batch 32, 100 classes, eager.
Rounds (warm-up + timed): train 2 + 10, eval_pass 2 + 10, eval_epoch 1 + 5. GPU budget of this
suite, 38 cases: 30 ViT-B/16 batch-32 (24 eager, 6 compiled), 2 batch-256, 6 ViT-L/14; the
slowest eager call (reference, 1000 classes, ~23 model TFLOPs per step) takes ~0.1 s, so the
eager cases take < 1 min with model construction; the 2 compiled models (train graph, eval
graphs with a cold and a warm text cache) add ~1-2 min of compilation; ViT-L/14's random init
~15 s. About 3 min in all, leaving the kernel suites room in the 300 s ``benchmarks`` step.

CPU (fp32): a tiny CLIP (``tiny_clip``: 64 px images, 16 px patches -> 17 tokens; image and text
towers 4 layers, width 128, 4 heads; embed 64; text context 77), batch 8, 10 / 100 / 397 / 1000
classes, every implementation, 1 thread (``bench_common.CPU_THREADS``). ``torch.compile`` on CPU
uses ``backend="aot_eager"`` (recorded as ``compile_backend`` in extra_info): inductor's C++
compile of one model took ~150 s on the 2-core machine, which does not fit the 15-minute budget
of ``--benchmark-only``. Rounds: train 3, eval_pass 3, eval_epoch 2. Peak memory is recorded as
``None`` on CPU (``ru_maxrss`` is a process-wide high-water mark, meaningless per test;
``benchmarks/cpu_speed.py`` measures it in subprocesses).

extra_info: impl, mode, arch, n_classes, batch, images (per timed call), images_per_s,
model_flops and tflops (``benchmarks/flops.py``: the reference's work for every impl, so the fast
model's TFLOP/s is useful work per second), peak_mem_gib, compile_backend. The speed-up over the
eager reference of the same case is computed by ``benchmarks/report.py``.

Under ``--benchmark-disable`` (the CI smoke run) the grid shrinks to 10 and 100 classes eager and
10 classes compiled, each case running once.
Run: pytest benchmarks/test_bench_dpt.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from dataclasses import dataclass

import open_clip
import pytest
import torch
from bench_common import CPU_THREADS, DEVICE, HAS_CUDA
from flops import eval_flops, sizes_of, train_step_flops

from dpt_fast import DPT, DPTConfig
from dpt_fast.reference import DPT as ReferenceDPT
from dpt_fast.testing import tiny_clip, vit_b16_clip

IMPLS = ["reference", "reference_compiled", "fast", "fast_compiled"]
MODES = ["train", "eval_pass", "eval_epoch"]
CLASS_COUNTS = [10, 100, 397, 1000]
EVAL_EPOCH_BATCHES = 4
COMPILE_BACKEND = "inductor" if HAS_CUDA else "aot_eager"
# (warm-up rounds, timed rounds) per mode
ROUNDS = ({"train": (2, 10), "eval_pass": (2, 10), "eval_epoch": (1, 5)} if HAS_CUDA
          else {"train": (1, 3), "eval_pass": (1, 3), "eval_epoch": (0, 2)})


@dataclass(frozen=True)
class Case:
    """One benchmark: mode, implementation, class count, batch size and CLIP architecture."""

    mode: str
    impl: str
    n_classes: int
    batch: int
    arch: str

    @property
    def compiled(self) -> bool:
        return self.impl.endswith("_compiled")

    @property
    def id(self) -> str:
        return f"{self.arch}-b{self.batch}-c{self.n_classes}-{self.impl}-{self.mode}"


def gpu_cases() -> list[Case]:
    """Full sizes: ViT-B/16 batch 32 grid, batch-256 training, ViT-L/14 at 100 classes."""
    cases = []
    for impl in IMPLS:
        counts = [100] if impl.endswith("_compiled") else CLASS_COUNTS
        cases += [Case(m, impl, c, 32, "vit_b16") for c in counts for m in MODES]
    cases += [Case("train", impl, 100, 256, "vit_b16") for impl in ("reference", "fast")]
    cases += [Case(m, impl, 100, 32, "vit_l14") for impl in ("reference", "fast")
              for m in MODES]
    return cases


def cpu_cases(smoke: bool) -> list[Case]:
    """The tiny CLIP, batch 8; ``smoke``: the reduced grid of a --benchmark-disable run."""
    cases = []
    for impl in IMPLS:
        counts = CLASS_COUNTS
        if smoke:
            counts = [10] if impl.endswith("_compiled") else [10, 100]
        cases += [Case(m, impl, c, 8, "tiny") for c in counts for m in MODES]
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``case``, ordered so that cases sharing a model run back to back."""
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", default=False))
    cases = gpu_cases() if HAS_CUDA else cpu_cases(smoke)
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def build_clip(arch: str) -> torch.nn.Module:
    """The CLIP of an architecture name, random weights, on DEVICE."""
    if arch == "vit_b16":
        return vit_b16_clip().to(DEVICE)
    if arch == "vit_l14":
        torch.manual_seed(0)
        return open_clip.create_model("ViT-L-14-quickgelu", pretrained=None).eval().to(DEVICE)
    return tiny_clip(image_size=64, patch_size=16, vision_layers=4, vision_width=128,
                     vision_head_width=32, text_layers=4, text_width=128, text_heads=4,
                     embed_dim=64)


class ModelCache:
    """Keeps the current CLIP and DPT alive across the cases that share them.

    Only one compiled model lives at a time: ``torch._dynamo.reset()`` runs when the model
    changes, as every DPT shares ``DPTBase.forward``'s code object and would otherwise exhaust
    dynamo's recompile limit and fall back to eager silently.
    """

    def __init__(self) -> None:
        self.clips: dict[str, torch.nn.Module] = {}
        self.key: tuple | None = None
        self.model: torch.nn.Module | None = None
        self.runner: Callable | None = None

    def clip(self, arch: str) -> torch.nn.Module:
        if arch not in self.clips:
            self.clips.clear()  # one architecture at a time (ViT-L/14 is large)
            self.clips[arch] = build_clip(arch)
        return self.clips[arch]

    def get(self, case: Case) -> tuple[torch.nn.Module, Callable]:
        """(the DPT, the callable to run it: the compiled wrapper or the model itself)."""
        key = (case.arch, case.impl, case.n_classes)
        if key != self.key:
            self.model = self.runner = None
            gc.collect()
            torch._dynamo.reset()
            cls = DPT if case.impl.startswith("fast") else ReferenceDPT
            torch.manual_seed(0)
            names = [f"class {i}" for i in range(case.n_classes)]
            self.model = cls(self.clip(case.arch), names, DPTConfig())
            self.runner = (torch.compile(self.model, backend=COMPILE_BACKEND)
                           if case.compiled else self.model)
            self.key = key
        return self.model, self.runner


@pytest.fixture(scope="module")
def models():
    cache = ModelCache()
    yield cache
    torch._dynamo.reset()


def _autocast():
    if HAS_CUDA:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def make_step(case: Case, model: torch.nn.Module, runner: Callable) -> Callable[[], None]:
    """The timed function of a case (synchronised on GPU)."""
    size = model.geometry.image_size
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randn(case.batch, 3, *size, generator=gen, device=DEVICE)
    labels = torch.randint(0, case.n_classes, (case.batch,), generator=gen, device=DEVICE)

    def train() -> None:
        model.train()
        with _autocast():
            out = runner(images)
            loss = model.loss(out, labels, epoch=0)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync()

    def eval_pass() -> None:
        with torch.no_grad(), _autocast():
            runner(images)
        _sync()

    def eval_epoch() -> None:
        model.train()  # clears the fast model's text cache, as a new evaluation does
        model.eval()
        with torch.no_grad(), _autocast():
            for _ in range(EVAL_EPOCH_BATCHES):
                runner(images)
        _sync()

    if case.mode == "eval_pass":
        model.eval()
    return {"train": train, "eval_pass": eval_pass, "eval_epoch": eval_epoch}[case.mode]


def case_flops(case: Case, model: torch.nn.Module) -> tuple[float, int]:
    """(model FLOPs per timed call, images per timed call)."""
    sizes = sizes_of(model)
    if case.mode == "train":
        return train_step_flops(sizes, case.batch), case.batch
    n_batches = EVAL_EPOCH_BATCHES if case.mode == "eval_epoch" else 1
    return eval_flops(sizes, case.batch, n_batches), case.batch * n_batches


def test_dpt(benchmark, models: ModelCache, case: Case) -> None:
    model, runner = models.get(case)
    step = make_step(case, model, runner)
    flops, images = case_flops(case, model)
    benchmark.group = f"dpt-{case.mode}"
    benchmark.extra_info.update(
        impl=case.impl, mode=case.mode, arch=case.arch, n_classes=case.n_classes,
        batch=case.batch, images=images, device=DEVICE, model_flops=flops,
        compile_backend=COMPILE_BACKEND if case.compiled else None,
        dtype="bf16 autocast" if HAS_CUDA else "fp32",
        cpu_threads=None if HAS_CUDA else CPU_THREADS,
        text_cache="warm" if case.mode == "eval_pass" else
        ("cold, then warm" if case.mode == "eval_epoch" else "off (training)"),
    )
    if case.compiled and not benchmark.disabled:
        step()  # compile (a second call compiles the fast model's warm-cache graph)
        step()
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS[case.mode]
    benchmark.pedantic(step, warmup_rounds=warmup, rounds=rounds)
    if HAS_CUDA:
        benchmark.extra_info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        benchmark.extra_info["peak_mem_gib"] = None
        benchmark.extra_info["peak_mem_note"] = (
            "not measured on CPU: ru_maxrss is process-wide; see benchmarks/cpu_speed.py")
    if benchmark.stats is not None:
        mean = benchmark.stats.stats.mean
        benchmark.extra_info.update(images_per_s=images / mean, tflops=flops / mean / 1e12)
