"""Seeding: the global RNGs of a run, and per-sample seeds for the augmentations.

Each sample's augmentation draws from torch's generator seeded with (run seed, epoch, sample
index), so it does not depend on the number of processes, the worker processes or what ran
before: a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

_SEED_STRIDE = 1_000_003  # separates the (seed, epoch, index) streams


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user transforms use)
    torch.manual_seed(seed)


class SeededSamples(Dataset):
    """A dataset whose random transforms are seeded per (run seed, epoch, sample index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        assert isinstance(self.dataset, Sized)  # a map-style dataset with a length
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample_seed = (self.seed * _SEED_STRIDE + self.epoch) * _SEED_STRIDE + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed % 2**63)
            return self.dataset[index]
