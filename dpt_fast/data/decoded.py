"""Training images decoded once per process and kept in memory, within a byte bound.

Few-shot training visits the same few thousand images every epoch, and decoding a JPEG costs
more than the random crop that follows it. :class:`DecodedImages` decodes each image once (as
:func:`~dpt_fast.data.loading.load_rgb` does: fully, converted to RGB), keeps the pixels as a
uint8 numpy array (H, W, 3) and, on every access, rebuilds the PIL image from them and applies
the transform. The transform sees the same RGB image as today's
:class:`~dpt_fast.data.loading.ImageDataset` gives it, so under the same seed it draws the same
crop and flip: with :func:`~dpt_fast.data.loading.build_uint8_transforms` and
:func:`~dpt_fast.data.device_batches.normalize_uint8` the batches equal today's bit for bit.

Where the memory goes: the cache lives in the process that calls ``__getitem__``. With
DataLoader workers that is each worker, and each worker fills its own copy (every worker sees
most images over a few epochs), so the RAM used is up to ``max_bytes`` *per worker*. The
workers must be persistent (:func:`dpt_fast.data.loaders.train_loader`): a worker that ends
with the epoch takes its cache with it.

A worker only hits the images it was given in an earlier epoch, so with W workers the hit rate
of epoch e (0-based) is about ``1 - (1 - 1/W)^e``: 2 workers reach 75 % at epoch 2, 16 workers
only 28 % at epoch 5. :meth:`DecodedImages.prefill` decodes the set once in the main process
before the workers start; forked workers share those pixels (one copy in RAM) and hit from the
first epoch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dpt_fast.data.loading import ImageReadError, load_rgb
from dpt_fast.data.records import Datum

GIB = 1024**3
# The default bound per process: a few-shot set (16 shots x 100 classes ~ 0.5 GiB of pixels)
# fits whole; ImageNet's 16 shots (~6 GiB) fit in part.
DEFAULT_MAX_CACHE_BYTES = 4 * GIB
# At most this share of the machine's RAM goes to the caches of all workers together.
RAM_SHARE = 4


def default_cache_ram_bytes(num_workers: int) -> int:
    """The default per-process cache bound: ``min(4 GiB, RAM / 4 / processes)``.

    ``num_workers`` is the DataLoader's worker count; 0 means the main process decodes (one
    cache). RAM is the physical memory (``os.sysconf``); where it cannot be read, 4 GiB.
    """
    processes = max(num_workers, 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX, or the names are unknown
        return DEFAULT_MAX_CACHE_BYTES
    if ram <= 0:
        return DEFAULT_MAX_CACHE_BYTES
    return min(DEFAULT_MAX_CACHE_BYTES, ram // RAM_SHARE // processes)


class DecodedImages(Dataset):
    """``(transform(image), label)`` for each record, each image decoded once per process while
    the cache has room.

    Cache rule: first come, kept while under the bound. An image is kept when its pixels
    (H * W * 3 bytes) fit in what is left of ``max_bytes``; once the cache is full, nothing is
    evicted and the images that did not fit are decoded on every access, as without a cache.
    Which images are kept therefore depends on the order a process first sees them; the
    *values* returned never do (cached or not, the transform sees the same pixels).

    The cache is per process and is not pickled: a DataLoader worker started by spawn or
    forkserver begins with an empty cache of its own (a forked one with a copy-on-write view of
    what its parent held), bounded by ``max_bytes``; so the RAM used is up to ``max_bytes``
    times the number of workers (see :func:`default_cache_ram_bytes`).

    Args:
        items: the records; ``label`` is returned with each image.
        transform: applied to the RGB PIL image on every access (e.g.
            ``build_uint8_transforms(train=True)``, which returns uint8 (3, S, S) tensors).
        max_bytes: the bound on the cached pixels of this process, in bytes; 0 caches nothing.
    """

    def __init__(self, items: Sequence[Datum], transform: Callable | None, *,
                 max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.items = list(items)
        self.transform = transform
        self.max_bytes = max_bytes
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def cached_bytes(self) -> int:
        """Bytes of pixels this process holds now."""
        return self._cached_bytes

    @property
    def cached_count(self) -> int:
        """Images this process holds now."""
        return len(self._cache)

    def pixels(self, index: int) -> np.ndarray:
        """The decoded RGB pixels of record ``index``: uint8 (H, W, 3), read-only (shared by
        every later access). Decodes on a miss and keeps the result if it fits.

        Raises:
            ImageReadError: the file is missing or not a decodable image.
        """
        array = self._cache.get(index)
        if array is not None:
            return array
        array = self._decode(index)
        if self._cached_bytes + array.nbytes <= self.max_bytes:
            self._cache[index] = array
            self._cached_bytes += array.nbytes
        return array

    def prefill(self, threads: int = 1) -> int:
        """Decode now, in this process, the images that fit the bound; returns how many are
        cached.

        Call it before the DataLoader starts its workers: forked workers then share these
        pixels copy-on-write (one copy in RAM for all of them, and every access is a hit from
        the first epoch), whereas lazily filled caches are one per worker and a worker only
        hits images it has already been given (about 1 - (1 - 1/workers)^epochs of them).
        Workers started by spawn or forkserver do not inherit the pixels (they are not
        pickled), so there it only costs time.

        The same rule as lazy filling: records in index order, each kept if it fits what is
        left; sizes come from the file headers, so images that do not fit are not decoded.

        Args:
            threads: decoding threads (Pillow releases the GIL while it decodes).

        Raises:
            ImageReadError: a file is missing or not a decodable image.
        """
        chosen, planned = [], self._cached_bytes
        for index, item in enumerate(self.items):
            if index in self._cache:
                continue
            size = _rgb_bytes(item.impath)
            if planned + size <= self.max_bytes:
                chosen.append(index)
                planned += size
        with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
            # pixels() is not thread-safe (check-then-insert): threads only decode, this
            # thread inserts, in index order.
            for index, array in zip(chosen, pool.map(self._decode, chosen), strict=True):
                if self._cached_bytes + array.nbytes <= self.max_bytes:
                    self._cache[index] = array
                    self._cached_bytes += array.nbytes
        return len(self._cache)

    def _decode(self, index: int) -> np.ndarray:
        array = np.array(load_rgb(self.items[index].impath), dtype=np.uint8)
        # A transform that wrote into the cached pixels would change every later epoch.
        array.setflags(write=False)
        return array

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        # Image.fromarray of an (H, W, 3) uint8 array is mode "RGB" with the same pixels as the
        # image load_rgb decoded, so the transform's random draws and results are the same.
        image = Image.fromarray(self.pixels(index))
        if self.transform is not None:
            image = self.transform(image)
        return image, self.items[index].label

    def __getstate__(self) -> dict:
        # Workers get the records, not this process's pixels: pickling GiBs to each spawned
        # worker would cost more than decoding, and the bound is per process.
        state = self.__dict__.copy()
        state["_cache"], state["_cached_bytes"] = {}, 0
        return state


def _rgb_bytes(path: str) -> int:
    """H * W * 3: the bytes of the image's RGB pixels, from its header (nothing decoded).

    Raises:
        ImageReadError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
    return width * height * 3
