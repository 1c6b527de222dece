"""The training data path without repeated decoding: decoded-image cache, uint8 transforms,
normalisation on the device, and persistent workers with the epoch carried in the indices.

Every check compares against today's path (``ImageDataset`` + ``build_transforms`` under
``SeededSamples``) bit for bit, on small odd-sized images.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as F

from dpt_fast.data import decoded
from dpt_fast.data.decoded import DecodedImages, default_cache_ram_bytes
from dpt_fast.data.device_batches import DeviceBatches, normalize_uint8
from dpt_fast.data.loaders import EpochIndices, EpochSeededSamples, train_loader
from dpt_fast.data.loading import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDataset,
    ImageReadError,
    build_transforms,
    build_uint8_transforms,
)
from dpt_fast.data.records import Datum
from dpt_fast.engine.sampler import GlobalBatchSampler
from dpt_fast.seeding import SeededSamples

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)]
# (width, height): odd sizes, portrait and landscape, one smaller than the crop
SIZES = [(113, 203), (203, 113), (64, 300), (250, 90), (97, 97), (300, 131), (150, 151)]
SEED = 7


def _write_images(folder: Path, sizes=SIZES) -> list[Datum]:
    """Smooth gradients plus noise (natural-ish), JPEG and PNG alternately; label = position."""
    rng = np.random.default_rng(0)
    items = []
    for i, (w, h) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(pixels).save(path)
        items.append(Datum(impath=str(path), label=i, classname=f"c{i}"))
    return items


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread, as in a DataLoader worker: on a busy 2-core machine ToTensor of one
    crop took 24 ms with 2 threads (OpenMP waiting on a preempted thread), 0.6 ms with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def items(tmp_path: Path) -> list[Datum]:
    return _write_images(tmp_path)


def _pixel_bytes(item: Datum) -> int:
    with Image.open(item.impath) as image:
        return image.width * image.height * 3


# ------------------------------------------------------------------- transforms, normalisation
@pytest.mark.parametrize("train", [True, False])
def test_uint8_transforms_then_normalize_equal_float_transforms(items, train: bool) -> None:
    image = Image.open(items[0].impath).convert("RGB")
    for seed in range(5):
        torch.manual_seed(seed)
        expected = build_transforms(train)(image)
        torch.manual_seed(seed)
        crop = build_uint8_transforms(train)(image)
        assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
        assert crop.is_contiguous()
        assert torch.equal(normalize_uint8(crop[None])[0], expected)


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_uint8_is_torchvision_bit_for_bit(device: str) -> None:
    # every pixel value in every channel, odd spatial size
    values = torch.arange(256, dtype=torch.uint8).repeat(4 * 3 * 17 * 23 // 256 + 1)
    batch = values[torch.randperm(values.numel())][:4 * 3 * 17 * 23].view(4, 3, 17, 23)
    expected = torch.stack([
        F.normalize(F.to_tensor(image.permute(1, 2, 0).numpy()), CLIP_MEAN, CLIP_STD)
        for image in batch
    ])
    out = normalize_uint8(batch.to(device))
    assert out.dtype == torch.float32 and out.device.type == device
    assert torch.equal(out.cpu(), expected)


def test_normalize_uint8_rejects_wrong_inputs() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize_uint8(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="H, W"):
        normalize_uint8(torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="zero"):
        normalize_uint8(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), std=(1.0, 0.0, 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("overlap", [True, False])
def test_device_batches_normalise_uint8_and_pass_float(device: str, overlap: bool) -> None:
    uint8 = [torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8) for _ in range(3)]
    floats = [torch.randn(2, 3, 5, 7) for _ in range(2)]
    batches = [(images, torch.tensor([i, i + 1])) for i, images in enumerate(uint8 + floats)]
    out = list(DeviceBatches(batches, device, overlap=overlap))
    assert len(out) == len(batches)
    for (images, labels), (got, got_labels) in zip(batches, out, strict=True):
        assert got.device.type == device and got_labels.device.type == device
        expected = normalize_uint8(images) if images.dtype == torch.uint8 else images
        assert torch.equal(got.cpu(), expected)
        assert torch.equal(got_labels.cpu(), labels)


def test_device_batches_reject_integer_images() -> None:
    with pytest.raises(TypeError, match="uint8 or floating"):
        list(DeviceBatches([(torch.zeros(1, 3, 2, 2, dtype=torch.int32), torch.zeros(1))],
                           "cpu"))


# ----------------------------------------------------------------------- decoded-image cache
@pytest.mark.parametrize("max_bytes", [0, 60_000, 10**9])
def test_decoded_images_equal_image_dataset_bit_for_bit(items, max_bytes: int) -> None:
    today = SeededSamples(ImageDataset(items, build_transforms(train=True)), SEED)
    cached = SeededSamples(DecodedImages(items, build_uint8_transforms(train=True),
                                         max_bytes=max_bytes), SEED)
    for epoch in (0, 1):
        today.epoch = cached.epoch = epoch
        for index in [*range(len(items)), 3, 0]:  # the repeats read the cache when it holds them
            expected, label = today[index]
            crop, cached_label = cached[index]
            assert crop.dtype == torch.uint8
            assert torch.equal(normalize_uint8(crop[None])[0], expected), (epoch, index)
            assert cached_label == label


def test_cache_keeps_first_images_while_under_the_bound(items) -> None:
    sizes = [_pixel_bytes(item) for item in items]
    bound = sizes[0] + sizes[1] + sizes[2] - 1  # the first two fit, the third does not
    data = DecodedImages(items, None, max_bytes=bound)
    for index in range(len(items)):
        data[index]
    kept = [i for i in range(len(items)) if i in data._cache]
    # first come, kept while under the bound: a later, smaller image may still fit
    expected, total = [], 0
    for i, size in enumerate(sizes):
        if total + size <= bound:
            expected.append(i)
            total += size
    assert kept == expected and kept[:2] == [0, 1] and 2 not in kept
    assert data.cached_bytes == total <= bound and data.cached_count == len(expected)
    # a hit returns the same (read-only) array; a miss decodes again, equal pixels
    assert data.pixels(0) is data.pixels(0)
    assert not data.pixels(0).flags.writeable
    assert np.array_equal(data.pixels(2), np.asarray(Image.open(items[2].impath).convert("RGB")))
    assert data.pixels(2) is not data.pixels(2)


def test_prefill_keeps_what_lazy_filling_keeps(items) -> None:
    sizes = [_pixel_bytes(item) for item in items]
    bound = sizes[0] + sizes[1] + sizes[2] - 1
    lazy = DecodedImages(items, None, max_bytes=bound)
    for index in range(len(items)):
        lazy.pixels(index)
    filled = DecodedImages(items, None, max_bytes=bound)
    assert filled.prefill(threads=2) == lazy.cached_count == 3
    assert sorted(filled._cache) == sorted(lazy._cache) == [0, 1, 4]
    assert filled.cached_bytes == lazy.cached_bytes
    assert all(np.array_equal(filled.pixels(i), lazy.pixels(i)) for i in range(len(items)))
    assert filled.prefill() == 3  # nothing more fits: idempotent


class _CachedCount(torch.utils.data.Dataset):
    """How many images the worker's copy of ``images`` holds when it is asked."""

    def __init__(self, images: DecodedImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return self.images.cached_count


def test_forked_workers_inherit_the_prefilled_cache(items) -> None:
    images = DecodedImages(items, None, max_bytes=10**9)
    assert images.prefill() == len(items)
    loader = DataLoader(_CachedCount(images), num_workers=1, multiprocessing_context="fork")
    assert [int(count) for count in loader] == [len(items)]


def test_cache_is_not_pickled(items) -> None:
    data = DecodedImages(items, None, max_bytes=10**9)
    data[0]
    assert data.cached_count == 1
    copy = pickle.loads(pickle.dumps(data))
    assert copy.cached_count == 0 and copy.cached_bytes == 0 and copy.max_bytes == 10**9
    assert copy.items == data.items
    assert data.cached_count == 1  # the original keeps its pixels


def test_decoded_images_report_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    data = DecodedImages([Datum(str(bad), 0, "c")], None, max_bytes=10**9)
    with pytest.raises(ImageReadError, match=r"bad\.jpg"):
        data[0]
    with pytest.raises(ValueError, match="max_bytes"):
        DecodedImages([], None, max_bytes=-1)


def test_default_cache_ram_bytes(monkeypatch) -> None:
    gib = 1024**3
    assert 0 < default_cache_ram_bytes(0) <= 4 * gib
    assert default_cache_ram_bytes(8) <= default_cache_ram_bytes(1)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 8 * gib // 4096}  # an 8 GiB machine
    monkeypatch.setattr(decoded.os, "sysconf", lambda name: pages[name])
    assert default_cache_ram_bytes(0) == default_cache_ram_bytes(1) == 2 * gib
    assert default_cache_ram_bytes(2) == gib
    pages["SC_PHYS_PAGES"] = 128 * gib // 4096  # 128 GiB: capped at 4 GiB per process
    assert default_cache_ram_bytes(1) == 4 * gib
    assert default_cache_ram_bytes(16) == 2 * gib


# ---------------------------------------------------------------- epoch in the indices, loader
def test_epoch_indices_carry_the_epoch_and_forward_set_epoch() -> None:
    inner = GlobalBatchSampler(7, 3, rank=0, world_size=1, seed=SEED)
    sampler = EpochIndices(inner)
    sampler.set_epoch(4)
    assert inner.epoch == 4 and len(sampler) == len(inner) == 2
    assert list(sampler) == [[(4, i) for i in batch] for batch in inner]


def test_epoch_seeded_samples_seed_as_seeded_samples(items) -> None:
    transform = build_transforms(train=True)
    today = SeededSamples(ImageDataset(items, transform), SEED)
    keyed = EpochSeededSamples(ImageDataset(items, transform), SEED)
    assert len(keyed) == len(items) and keyed.seed == SEED
    for epoch, index in [(0, 1), (3, 1), (3, 4), (0, 1)]:
        today.epoch = epoch
        assert torch.equal(keyed[(epoch, index)][0], today[index][0])
    with pytest.raises(TypeError, match="EpochIndices"):
        keyed[1]


def _today_batches(items, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Today's trainer: a fresh non-persistent loader per epoch, SeededSamples' epoch set."""
    data = SeededSamples(ImageDataset(items, build_transforms(train=True)), SEED)
    sampler = GlobalBatchSampler(len(items), 3, rank=0, world_size=1, seed=SEED)
    sampler.set_epoch(epoch)
    data.epoch = epoch
    return list(DataLoader(data, batch_sampler=sampler, num_workers=0))


def test_persistent_loader_equals_fresh_loader_per_epoch(items) -> None:
    sampler = EpochIndices(GlobalBatchSampler(len(items), 3, rank=0, world_size=1, seed=SEED))
    data = EpochSeededSamples(DecodedImages(items, build_uint8_transforms(train=True),
                                            max_bytes=10**9), SEED)
    loader = train_loader(data, sampler, num_workers=2, pin_memory=False)
    assert loader.persistent_workers
    seen = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        got = list(DeviceBatches(loader, "cpu"))
        expected = _today_batches(items, epoch)
        assert len(got) == len(expected) == 2
        for (images, labels), (want, want_labels) in zip(got, expected, strict=True):
            assert torch.equal(images, want) and torch.equal(labels, want_labels)
        seen.append(got)
    # the epochs draw different crops of the same images, so a stale epoch would show
    first = {int(l): img for imgs, ls in seen[0] for img, l in zip(imgs, ls, strict=True)}
    second = {int(l): img for imgs, ls in seen[1] for img, l in zip(imgs, ls, strict=True)}
    common = set(first) & set(second)
    assert common and all(not torch.equal(first[i], second[i]) for i in common)


def test_persistent_workers_do_not_see_the_epoch_attribute(items) -> None:
    """Why the epoch travels in the indices: the attribute set in the main process stays
    behind in persistent workers, which then repeat epoch 0's augmentations."""
    data = SeededSamples(ImageDataset(items, build_transforms(train=True)), SEED)
    sampler = GlobalBatchSampler(len(items), 3, rank=0, world_size=1, seed=SEED)
    with pytest.raises(TypeError, match="EpochSeededSamples"):
        train_loader(data, sampler, num_workers=1, pin_memory=False)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=1, persistent_workers=True)
    list(loader)
    sampler.set_epoch(1)
    data.epoch = 1
    stale = list(loader)
    data.epoch = 0  # what the worker still uses: epoch 1's order, epoch 0's seeds
    assert all(torch.equal(images, torch.stack([data[i][0] for i in batch]))
               for (images, _), batch in zip(stale, sampler, strict=True))


def test_train_loader_without_workers(items) -> None:
    sampler = EpochIndices(GlobalBatchSampler(len(items), 3, rank=0, world_size=1, seed=SEED))
    data = EpochSeededSamples(ImageDataset(items, build_transforms(train=True)), SEED)
    loader = train_loader(data, sampler, num_workers=0, pin_memory=False)
    assert not loader.persistent_workers
    sampler.set_epoch(1)
    for (images, labels), (want, want_labels) in zip(loader, _today_batches(items, 1),
                                                      strict=True):
        assert torch.equal(images, want) and torch.equal(labels, want_labels)
