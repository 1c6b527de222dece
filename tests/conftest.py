"""Shared test fixtures and device markers.

Device conditions are computed once at import, without touching CUDA state that could crash a
CPU-only collection: ``torch.cuda.is_available()`` is safe on every build.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
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


# --- a tiny CLIP on disk and small image-folder tasks, for the CLI tests ----------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TINY_CONFIG = {
    "embed_dim": 24,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16,
                   "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 2},
}


@pytest.fixture(scope="session")
def clip_files(tmp_path_factory) -> tuple[str, str]:
    """(open_clip config .json, weights .pt) of a tiny random CLIP."""
    from dpt_fast.testing import tiny_clip

    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-test-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    weights = folder / "tiny-test-clip.pt"
    torch.save(tiny_clip(seed=3).state_dict(), weights)
    return str(config), str(weights)


def write_colour_task(root: Path, train: int, test: int, seed: int) -> Path:
    """Noisy 32x32 squares of one colour per class: ``train`` and ``test`` images per class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (32, 32, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def colour_folder(tmp_path_factory) -> Path:
    """An easy 3-class task: noisy squares of one colour per class, train/ and test/."""
    return write_colour_task(tmp_path_factory.mktemp("colours"), train=8, test=4, seed=0)


@pytest.fixture(scope="session")
def odd_folder(tmp_path_factory) -> Path:
    """The colour task with 15 training images, an odd number: 6 per class in train/, of
    which the image-folder reader keeps one per class for validation."""
    return write_colour_task(tmp_path_factory.mktemp("odd_colours"), train=6, test=2, seed=1)
