"""Shared test fixtures and device markers.

Device conditions are computed once at import, without touching CUDA state that could crash a
CPU-only collection: ``torch.cuda.is_available()`` is safe on every build.

Without a CUDA device the Triton kernels are tested on CPU tensors through Triton's interpreter,
which must be chosen before anything imports triton (open_clip and torch.compile do): hence
``TRITON_INTERPRET=1`` here, before the test modules are imported. ``import torch`` alone does
not import triton. With a GPU the kernels compile, and their CPU cases skip.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

HAS_CUDA = torch.cuda.is_available()
# Set on a GPU machine (benchmarks/gpu_check.sh): there, a missing GPU is a failure, not skips.
REQUIRE_CUDA = os.environ.get("DPT_FAST_REQUIRE_CUDA", "0") == "1"

if not HAS_CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The disk caches of the runs the tests make go to a folder of this session (the CLI
# subprocesses inherit it), never to the user's ~/.cache/dpt_fast.
os.environ["DPT_FAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="dpt_fast_test_cache_")
atexit.register(shutil.rmtree, os.environ["DPT_FAST_CACHE_DIR"], ignore_errors=True)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # The test suite holds no benchmarks: with pytest-benchmark installed, turn it off here rather
    # than let it warn, in every xdist worker, that it turns itself off.
    if hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


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


# Small threads budget keeps the 2-core CI machine responsive; respects a user override. The
# pytest-xdist workers (pyproject's addopts) share the cores.
if "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, torch.get_num_threads() // _workers)))


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
# --- the compiled extension --------------------------------------------------------------------


def has_cxx_compiler() -> bool:
    return any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++"))


@pytest.fixture
def extension() -> None:
    """Fails when dpt_fast._C is missing on a machine that could have built it, else skips.

    A silent fallback to PyTorch would hide a broken build.
    """
    from dpt_fast.ops import _extension

    if _extension.extension_available():
        return
    message = f"dpt_fast._C is not loaded: {_extension.load_error()}"
    if has_cxx_compiler():
        pytest.fail(message + " (a C++ compiler is present, so the build should have worked)")
    pytest.skip(message)


@pytest.fixture
def nan_filled_memory() -> Iterator[None]:
    """Every new tensor starts as NaN, so an output element a kernel never writes shows up.

    PyTorch's deterministic mode fills uninitialised memory (``at::empty``, including the
    kernels' own outputs and temporaries, and the CPU block cache's blocks) with NaN; warn_only
    keeps ops without a deterministic implementation (cuBLAS without CUBLAS_WORKSPACE_CONFIG)
    running. Restored afterwards.
    """
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


# --- prompt attention's Triton kernels (helpers: prompt_attention_checks.py) ------------------


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """prompt_attention runs the Triton kernels (through the interpreter on CPU tensors)."""
    monkeypatch.setenv("DPT_FAST_BACKEND", "triton")


@pytest.fixture
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the launchers allocate starts as NaN, so unwritten elements show."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    from prompt_attention_checks import kernels

    monkeypatch.setattr(kernels(), "_empty", nan_empty)


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the launcher calls made through the custom ops."""
    from prompt_attention_checks import kernels

    calls = {"fwd": 0, "bwd": 0}
    launchers = kernels()
    fwd, bwd = launchers.prompt_attention_fwd, launchers.prompt_attention_bwd

    def counting_fwd(*args):
        calls["fwd"] += 1
        return fwd(*args)

    def counting_bwd(*args):
        calls["bwd"] += 1
        return bwd(*args)

    monkeypatch.setattr(launchers, "prompt_attention_fwd", counting_fwd)
    monkeypatch.setattr(launchers, "prompt_attention_bwd", counting_bwd)
    return calls


@pytest.fixture
def exact_fp32_matmul():
    """fp32 kernels use exact (IEEE) dots only under the "highest" matmul precision."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)
