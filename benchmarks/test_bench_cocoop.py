"""CoCoOp model-level benchmarks: training step and evaluation batch, reference vs fast.

Modes: ``train``, one training step (forward, cross-entropy, backward; ``zero_grad``
included, no optimizer step); ``eval``, one evaluation batch in eval mode under ``no_grad``,
the image features computed in the pass. Implementations: ``reference``
(``dpt_fast.reference.CoCoOp``, the authors' per-image loop over 77-token prompts) and
``fast`` (``dpt_fast.CoCoOp``). 100 classes ("class 0".."class 99"), the authors' defaults.

GPU (bf16 autocast): ViT-B/16 at 224 px, training at batch 1 (the authors' recipe) and 8,
evaluation at batch 100 (the authors' test batch). Rounds: 2 warm-up + 10 timed; the
reference's batch-100 evaluation runs 100 × 100 prompts of 77 tokens, ~60 TFLOPs, a few
seconds a call.

CPU (fp32, ``bench_common.CPU_THREADS`` threads): the tiny CLIP of ``test_bench_dpt.py``
(64 px, 16 px patches, 4-layer width-128 towers, embed 64, context 77), training at batch 1 and
8, evaluation at batch 8; rounds 1 warm-up + 3 timed. The ViT-B/16-shaped CPU comparison with
peak activation memory is ``benchmarks/cocoop_speed.py`` (its JSON under ``results/``).

Under ``--benchmark-disable`` (the CI smoke run) the CPU grid shrinks to 10 classes, each case
running once. extra_info: impl, mode, arch, n_classes, batch, images_per_s, peak_mem_gib (CUDA).
Run: pytest benchmarks/test_bench_cocoop.py --benchmark-only
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass

import pytest
import torch
from bench_common import CPU_THREADS, DEVICE, HAS_CUDA
from test_bench_dpt import build_clip

from dpt_fast import CoCoOp
from dpt_fast.reference import CoCoOp as ReferenceCoCoOp

IMPLS = ["reference", "fast"]
# (warm-up rounds, timed rounds)
ROUNDS = (2, 10) if HAS_CUDA else (1, 3)


@dataclass(frozen=True)
class Case:
    """One benchmark: mode, implementation, class count, batch size and CLIP architecture."""

    mode: str
    impl: str
    n_classes: int
    batch: int
    arch: str

    @property
    def id(self) -> str:
        return f"{self.arch}-b{self.batch}-c{self.n_classes}-{self.impl}-{self.mode}"


def cases(smoke: bool) -> list[Case]:
    """The grid of this device; ``smoke``: the reduced CPU grid of a --benchmark-disable run."""
    if HAS_CUDA:
        shapes = [("train", 1), ("train", 8), ("eval", 100)]
        return [Case(m, i, 100, b, "vit_b16") for m, b in shapes for i in IMPLS]
    n_classes = 10 if smoke else 100
    shapes = [("train", 1), ("train", 8), ("eval", 8)]
    return [Case(m, i, n_classes, b, "tiny") for m, b in shapes for i in IMPLS]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    smoke = bool(metafunc.config.getoption("benchmark_disable", default=False))
    grid = cases(smoke)
    metafunc.parametrize("case", grid, ids=[c.id for c in grid])


@pytest.fixture(scope="module")
def clips() -> dict[str, torch.nn.Module]:
    return {}


def _autocast():
    if HAS_CUDA:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def test_cocoop(benchmark, clips: dict, case: Case) -> None:
    if case.arch not in clips:
        clips.clear()
        gc.collect()
        clips[case.arch] = build_clip(case.arch)
    cls = CoCoOp if case.impl == "fast" else ReferenceCoCoOp
    torch.manual_seed(0)
    model = cls(clips[case.arch], [f"class {i}" for i in range(case.n_classes)])
    size = model.geometry.image_size
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randn(case.batch, 3, *size, generator=gen, device=DEVICE)
    labels = torch.randint(0, case.n_classes, (case.batch,), generator=gen, device=DEVICE)

    def train() -> None:
        with _autocast():
            loss = model.loss(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync()

    def evaluate() -> None:
        with torch.no_grad(), _autocast():
            model(images)
        _sync()

    model.train(case.mode == "train")
    benchmark.group = f"cocoop-{case.mode}"
    benchmark.extra_info.update(
        impl=case.impl, mode=case.mode, arch=case.arch, n_classes=case.n_classes,
        batch=case.batch, device=DEVICE, dtype="bf16 autocast" if HAS_CUDA else "fp32",
        cpu_threads=None if HAS_CUDA else CPU_THREADS,
    )
    if HAS_CUDA:
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS
    benchmark.pedantic(train if case.mode == "train" else evaluate, warmup_rounds=warmup,
                       rounds=rounds)
    if HAS_CUDA:
        benchmark.extra_info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = case.batch / benchmark.stats.stats.mean
