"""One DPT training step (forward + loss + backward): reference vs fast.

GPU: ViT-B/16 at 224, batch 32, bf16 autocast, 100 and 1000 classes.
CPU: a 4-layer, width-128 ViT at 64 px (17 tokens), batch 8, fp32, 10 and 100 classes — small
enough that the suite runs in a minute on 2 cores; ratios, not absolute times, carry over.
Run: pytest benchmarks/test_bench_dpt.py --benchmark-only
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from bench_common import DEVICE, HAS_CUDA

from dpt_fast import DPT, DPTConfig
from dpt_fast.reference import DPT as ReferenceDPT
from dpt_fast.testing import tiny_clip, vit_b16_clip

CLASS_COUNTS = [100, 1000] if HAS_CUDA else [10, 100]
BATCH = 32 if HAS_CUDA else 8
IMPLS = {"reference": ReferenceDPT, "fast": DPT}


def _clip():
    if HAS_CUDA:
        return vit_b16_clip().to(DEVICE)
    return tiny_clip(image_size=64, patch_size=16, vision_layers=4, vision_width=128,
                     vision_head_width=32, text_layers=4, text_width=128, text_heads=4,
                     embed_dim=64)


@pytest.fixture(scope="module")
def clip():
    return _clip()


def _autocast():
    if HAS_CUDA:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_train_step(benchmark, clip, impl, n_classes):
    names = [f"class {i}" for i in range(n_classes)]
    model = IMPLS[impl](clip, names, DPTConfig())
    size = clip.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(BATCH, 3, size, size, device=DEVICE)
    labels = torch.randint(0, n_classes, (BATCH,), device=DEVICE)

    def step():
        with _autocast():
            out = model(images)
            loss = model.loss(out, labels, epoch=0)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if HAS_CUDA:
            torch.cuda.synchronize()

    benchmark.extra_info.update(impl=impl, n_classes=n_classes, batch=BATCH, device=DEVICE)
    benchmark.pedantic(step, warmup_rounds=1, rounds=3 if not HAS_CUDA else 10)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.mean
