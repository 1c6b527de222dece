"""One training DataLoader per run, with persistent workers, and the epoch carried in each index.

Persistent workers keep their processes (and the decoded-image caches of
:class:`~dpt_fast.data.decoded.DecodedImages`) from one epoch to the next. But each worker holds
its own copy of the dataset, made when the workers start, so ``train_set.epoch = epoch`` set in
the main process afterwards never reaches them: they would seed every epoch's augmentations
with the first epoch. Here the epoch travels with the indices instead. The batch sampler runs
in the main process (at ``iter(loader)``, after ``set_epoch``), so :class:`EpochIndices` turns
each batch ``[i, ...]`` into ``[(epoch, i), ...]`` and :class:`EpochSeededSamples` seeds sample
``i`` of that epoch exactly as :class:`~dpt_fast.seeding.SeededSamples` does:

>>> sampler = EpochIndices(GlobalBatchSampler(n, batch_size, rank, world, seed))  # doctest: +SKIP
>>> cache = default_cache_ram_bytes(workers)                                     # doctest: +SKIP
>>> images = DecodedImages(items, build_uint8_transforms(True), max_bytes=cache)  # doctest: +SKIP
>>> data = EpochSeededSamples(images, seed)                                     # doctest: +SKIP
>>> loader = train_loader(data, sampler, workers, pin_memory=True)             # doctest: +SKIP
>>> for epoch in range(epochs):                                                # doctest: +SKIP
...     sampler.set_epoch(epoch)
...     for images, labels in DeviceBatches(loader, device): ...
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from dpt_fast.seeding import SeededSamples

EpochIndex = tuple[int, int]  # (epoch, sample index)


class EpochIndices:
    """A batch sampler yielding ``[(epoch, index), ...]`` for the batches of ``batch_sampler``.

    ``set_epoch`` sets the epoch it adds and forwards it to ``batch_sampler`` (when that has a
    ``set_epoch``, as :class:`~dpt_fast.engine.sampler.GlobalBatchSampler` does); call it before
    ``iter(loader)``. The wrapped sampler stays reachable as ``.batch_sampler`` (e.g. for
    ``batch_weight``).
    """

    def __init__(self, batch_sampler: Iterable[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        set_inner = getattr(self.batch_sampler, "set_epoch", None)
        if set_inner is not None:
            set_inner(epoch)

    def __len__(self) -> int:
        if not isinstance(self.batch_sampler, Sized):
            raise TypeError(f"{type(self.batch_sampler).__name__} has no length")
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[EpochIndex]]:
        epoch = self.epoch  # fixed for the whole pass, even if set_epoch is called meanwhile
        for batch in self.batch_sampler:
            yield [(epoch, int(index)) for index in batch]


class EpochSeededSamples(Dataset):
    """``dataset[index]`` for the key ``(epoch, index)``, its random transforms seeded per (run
    seed, epoch, index) exactly as :class:`~dpt_fast.seeding.SeededSamples` seeds them
    (the same class does the seeding, with its epoch set from the key)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self._seeded = SeededSamples(dataset, seed)

    @property
    def seed(self) -> int:
        return self._seeded.seed

    def __len__(self) -> int:
        return len(self._seeded)

    def __getitem__(self, key: EpochIndex) -> Any:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"EpochSeededSamples takes (epoch, index) keys, got {key!r}: "
                            "batch with EpochIndices(batch_sampler)")
        epoch, index = key
        # Each process (worker) has its own copy and asks for one sample at a time, so setting
        # the epoch just before the access cannot race.
        self._seeded.epoch = epoch
        return self._seeded[index]


def train_loader(dataset: Dataset, batch_sampler: Iterable[list], num_workers: int,
                 pin_memory: bool) -> DataLoader:
    """The run's training DataLoader: build it once, change epochs with
    ``batch_sampler.set_epoch``; workers persist across epochs when ``num_workers > 0``.

    Args:
        dataset: indexed by the sampler's keys, e.g. :class:`EpochSeededSamples`.
        batch_sampler: e.g. :class:`EpochIndices`; run in the main process at each
            ``iter(loader)``.
        num_workers: worker processes (0: load in the main process).
        pin_memory: True when the batches go to a CUDA device (for non-blocking copies).

    Raises:
        TypeError: ``dataset`` keeps its epoch in an attribute (``SeededSamples``): with
            persistent workers that epoch would stay the one the workers started with.
    """
    if num_workers > 0 and isinstance(dataset, SeededSamples):
        raise TypeError("SeededSamples.epoch set in the main process does not reach persistent "
                        "workers: use EpochSeededSamples with EpochIndices(batch_sampler)")
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=num_workers > 0)
