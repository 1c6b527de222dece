"""The test-crop cache: each test image decoded, resized and centre-cropped once, kept on disk.

The test transform is ``Resize(size, bicubic)`` of the shorter side, ``CenterCrop(size)``,
``ToTensor()``, ``Normalize`` (:func:`dpt_fast.data.loading.build_transforms`). The first two
steps depend on the image file only, and they are the expensive ones (JPEG decoding and bicubic
resampling). :func:`cached_test_crops` stores their output, uint8 (N, size, size, 3), in one
cache file (:mod:`dpt_fast.data.cache_file`); :class:`CropDataset` serves it as uint8 (3, H, W)
tensors, and :func:`dpt_fast.data.device_batches.normalize_uint8` of a batch of them equals the
uncached ``build_transforms(False, size)`` output bit for bit.

The crops are computed by the very transforms of ``build_transforms`` (PIL path), so they
follow it if it changes. An entry is keyed by the exact list of image paths (absolute), each
file's size and modification time (ns), the image size, the interpolation, the transforms'
repr, the Pillow and torchvision versions and :data:`CROPS_VERSION`. The file name depends on
the paths, the image size and the interpolation only, so a changed image or library version
replaces the entry (with a warning) while another test set or image size gets its own file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from dpt_fast.data.cache_file import CacheFileWriter, key_digest
from dpt_fast.data.disk_cache import CacheSettings, load_or_build
from dpt_fast.data.loading import INTERPOLATION, ImageReadError, build_transforms, load_rgb
from dpt_fast.data.records import Datum

# Bump when the stored crops change meaning: existing entries are then rebuilt.
CROPS_VERSION = 1
_WRITE_ROWS = 64  # crops per write
_MAX_ERROR_CHARS = 500  # of each unreadable image's message, in the file's meta


@dataclass(frozen=True)
class SkippedImage:
    """An image left out of the crops: its position in ``items``, path and the read error."""

    index: int
    path: str
    error: str


@dataclass(frozen=True, eq=False)
class TestCrops:
    """The cached crops of a test set.

    Attributes:
        crops: uint8 (N, H, W, 3) RGB, read-only (a memmap of ``path``); row r is image
            ``indices[r]`` of the items.
        labels: int64 (N,) the labels of those items.
        indices: int64 (N,) positions in the items; all of them unless images were skipped.
        skipped: the unreadable images left out (with ``skip_unreadable``), in item order.
        key_digest: SHA-256 of the entry's key (:func:`crops_key_digest`), for keys of caches
            derived from these crops.
        path: the cache file.
    """

    __test__ = False  # not a pytest test class, despite the name

    crops: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    skipped: tuple[SkippedImage, ...]
    key_digest: str
    path: Path


def spatial_transforms(image_size: int) -> list[Callable]:
    """The PIL-to-PIL steps of ``build_transforms(train=False, image_size)``: everything before
    ``ToTensor``/``Normalize``."""
    steps = build_transforms(train=False, image_size=image_size).transforms
    return [t for t in steps if not isinstance(t, (T.ToTensor, T.Normalize))]


def _file_stat(path: str) -> list[int | None]:
    try:
        st = os.stat(path)
    except OSError:  # missing or unreachable: keyed as such, reported when decoded
        return [None, None]
    return [st.st_size, st.st_mtime_ns]


def _identity(paths: list[str], image_size: int) -> dict[str, Any]:
    return {"kind": "test_crops", "image_size": image_size,
            "interpolation": INTERPOLATION.value, "paths": paths}


def crops_key(items: Sequence[Datum], image_size: int) -> dict[str, Any]:
    """The key of the crop cache entry for ``items`` at ``image_size`` (stats every file)."""
    paths = [os.path.abspath(item.impath) for item in items]
    return {**_identity(paths, image_size), "version": CROPS_VERSION,
            "transforms": [repr(t) for t in spatial_transforms(image_size)],
            "pillow": PIL.__version__, "torchvision": torchvision.__version__,
            "stats": [_file_stat(path) for path in paths]}


def crops_key_digest(items: Sequence[Datum], image_size: int) -> str:
    """Hex SHA-256 of :func:`crops_key`: changes whenever the cached crops would."""
    return key_digest(crops_key(items, image_size))


class _Decode(Dataset):
    """``(index, uint8 (H, W, 3) crop or None, error or None)`` per path, for the builder's
    DataLoader (its workers decode in parallel)."""

    def __init__(self, paths: list[str], image_size: int) -> None:
        self.paths = paths
        self.steps = spatial_transforms(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = load_rgb(self.paths[index])
        except ImageReadError as exc:
            return index, None, str(exc)[:_MAX_ERROR_CHARS]
        for step in self.steps:
            image = step(image)
        # np.array, as ToTensor does (a copy: np.asarray of a PIL image is read-only).
        return index, torch.from_numpy(np.array(image, dtype=np.uint8)), None


def _no_collate(sample: Any) -> Any:
    return sample


def _build(writer: CacheFileWriter, paths: list[str], image_size: int, skip_unreadable: bool,
           num_workers: int, progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Decode every path into ``writer``; returns the meta (the skipped images)."""
    writer.start(np.dtype(np.uint8), (image_size, image_size, 3), len(paths))
    loader = DataLoader(_Decode(paths, image_size), batch_size=None, num_workers=num_workers,
                        collate_fn=_no_collate)
    skipped: list[list[Any]] = []
    pending: list[np.ndarray] = []
    for done, (index, crop, error) in enumerate(loader, start=1):
        if error is not None:
            if not skip_unreadable:
                raise ImageReadError(error)
            skipped.append([index, paths[index], error])
        else:
            pending.append(crop.numpy())
        if len(pending) >= _WRITE_ROWS or (done == len(paths) and pending):
            writer.append(np.stack(pending))
            pending = []
        if progress is not None:
            progress(done, len(paths))
    return {"skipped": skipped}


def _validate(image_size: int, n_items: int) -> Callable[[np.ndarray, dict[str, Any]],
                                                         str | None]:
    def validate(array: np.ndarray, meta: dict[str, Any]) -> str | None:
        skipped = meta.get("skipped")
        if (array.dtype != np.uint8 or array.shape[1:] != (image_size, image_size, 3)
                or not isinstance(skipped, list) or len(array) + len(skipped) != n_items
                or not all(isinstance(s, list) and len(s) == 3 and isinstance(s[0], int)
                           and 0 <= s[0] < n_items for s in skipped)):
            return f"holds {array.dtype} {array.shape}, not the crops of {n_items} images"
        return None

    return validate


def cached_test_crops(items: Sequence[Datum], image_size: int, settings: CacheSettings, *,
                      skip_unreadable: bool = False, num_workers: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> TestCrops | None:
    """The resized, centre-cropped RGB test images of ``items``, from the cache or decoded now.

    Args:
        skip_unreadable: leave unreadable images out (listed in ``TestCrops.skipped``) instead
            of raising.
        num_workers: DataLoader worker processes decoding the images when the entry is built.
        progress: called with ``(images done, total)`` while building.

    Returns:
        The crops, or None when caching is off (``settings.enabled`` False) or the cache can be
        neither read nor written (full disk, read-only folder, lock timeout; one warning): the
        caller then loads the images as without a cache.

    Raises:
        ImageReadError: an image cannot be read (without ``skip_unreadable``); names the file.
    """
    if not settings.enabled:
        return None
    key = crops_key(items, image_size)
    paths = key["paths"]
    name = f"crops-{image_size}px-{len(paths)}-{key_digest(_identity(paths, image_size))[:32]}"
    path = settings.directory / "test_crops" / f"{name}.bin"

    def build(writer: CacheFileWriter) -> dict[str, Any]:
        return _build(writer, paths, image_size, skip_unreadable, num_workers, progress)

    cached = load_or_build(path, key, build, settings, _validate(image_size, len(paths)))
    if cached is None:
        return None
    skipped = tuple(SkippedImage(i, p, e) for i, p, e in cached.meta["skipped"])
    if skipped and not skip_unreadable:  # built by a run that skipped them
        raise ImageReadError(skipped[0].error)
    left_out = {s.index for s in skipped}
    indices = np.array([i for i in range(len(paths)) if i not in left_out], dtype=np.int64)
    labels = np.array([items[i].label for i in indices], dtype=np.int64)
    return TestCrops(cached.array, labels, indices, skipped, key_digest(key), cached.path)


class CropDataset(Dataset):
    """``(uint8 (3, H, W) tensor, label)`` per cached crop, so a DataLoader yields uint8
    (B, 3, H, W) batches for :func:`~dpt_fast.data.device_batches.normalize_uint8`.

    Pickled for spawned workers as the file's name and layout, never as the pixels: each
    worker maps the file itself.
    """

    def __init__(self, crops: TestCrops) -> None:
        self.crops = crops.crops
        self.labels = crops.labels
        # The file's identity now: a worker that maps the file again by name (spawn,
        # forkserver) must find this file, not an entry another process rebuilt since.
        self._file_id = _file_identity(getattr(crops.crops, "filename", None))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A contiguous copy in CHW order: writable (the memmap is not) and cheap to collate.
        image = np.ascontiguousarray(self.crops[index].transpose(2, 0, 1))
        return torch.from_numpy(image), int(self.labels[index])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        crops = self.crops
        if isinstance(crops, np.memmap) and crops.filename is not None:
            state["crops"] = (crops.filename, crops.offset, crops.shape, crops.dtype.str)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["crops"], tuple):
            filename, offset, shape, dtype = state["crops"]
            if _file_identity(filename) != state.get("_file_id"):
                raise RuntimeError(
                    f"the test-crop cache file {filename} was replaced (rebuilt by another "
                    "process) while this evaluation used it; run the evaluation again")
            state["crops"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r",
                                       offset=offset, shape=shape)
        self.__dict__.update(state)


def _file_identity(filename: str | os.PathLike[str] | None) -> tuple[int, int, int] | None:
    """(inode, size, mtime ns) of a file, or None: os.replace gives a rebuilt entry a new one."""
    if filename is None:
        return None
    try:
        stat = os.stat(filename)
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns
