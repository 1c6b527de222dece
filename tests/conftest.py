"""Shared test fixtures and device markers.

Device conditions are computed once at import, without touching CUDA state that could crash a
CPU-only collection: ``torch.cuda.is_available()`` is safe on every build.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Set on a GPU machine (benchmarks/gpu_check.sh): there, a missing GPU is a failure, not skips.
REQUIRE_CUDA = os.environ.get("DPT_FAST_REQUIRE_CUDA", "0") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    if REQUIRE_CUDA and not HAS_CUDA:
        raise pytest.UsageError(
            "DPT_FAST_REQUIRE_CUDA=1 but torch.cuda.is_available() is False: the CUDA tests "
            "would all skip. Run them where torch sees a GPU, or unset DPT_FAST_REQUIRE_CUDA.")
    # Tests marked `cuda` skip with the device reason on machines without a GPU.
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


# Small threads budget keeps the 2-core CI machine responsive; respects a user override.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, torch.get_num_threads()))


CLASSNAMES = ["cat", "dog", "sea_lion", "red panda", "golden retriever", "tree", "airliner"]


@pytest.fixture(scope="session")
def tiny_clip_model():
    """A 3-layer ViT CLIP with random weights (32x32 images, 4x4 patches of 8 px)."""
    from dpt_fast.testing import tiny_clip

    return tiny_clip()


@pytest.fixture
def classnames():
    return list(CLASSNAMES)


@pytest.fixture
def images():
    """(4, 3, 32, 32) random normalised images for tiny_clip_model."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels():
    return torch.tensor([0, 2, 5, 3])
