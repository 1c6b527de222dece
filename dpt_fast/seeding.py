"""Every seed dpt_fast draws from, in one place.

* A run's global RNGs (:func:`seed_all`, from the run's seed): the prompts' initialisation.
* Each sample's augmentation draws from torch's generator seeded with (run seed, epoch, sample
  index) (:class:`SeededSamples`), so it does not depend on the number of processes, the worker
  processes or what ran before: a resumed run repeats the uninterrupted one.
* Random CLIP weights (``--pretrained none``: smoke runs, tests, benchmarks) come from
  :data:`RANDOM_WEIGHTS_SEED` (:func:`random_weights`), whatever the run's seed and whatever ran
  before in the process (torch seeds its default generator differently in every process), and
  leave the global generator as they found it: so ``train``, ``sweep`` and ``eval`` build the
  same CLIP, and a checkpoint is evaluated with the CLIP it was trained with.

Elsewhere: the few-shot draw is ``random.Random(run seed)`` (:mod:`dpt_fast.data.fewshot`), the
training order a generator seeded with (run seed + epoch) (:mod:`dpt_fast.engine.sampler`), the
image-folder validation split :data:`dpt_fast.data.datasets.FOLDER_VAL_SPLIT_SEED`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

_SEED_STRIDE = 1_000_003  # separates the (seed, epoch, index) streams
# The seed of random CLIP weights (--pretrained none), apart from any run's seed: a CLIP is
# shared by the runs of a sweep, so it cannot depend on one run's seed.
RANDOM_WEIGHTS_SEED = 0


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user transforms use)
    torch.manual_seed(seed)


@contextlib.contextmanager
def random_weights(seed: int = RANDOM_WEIGHTS_SEED) -> Iterator[None]:
    """Within: torch's CPU generator seeded with ``seed``, for initialising a model's weights
    (build models on the CPU in it: CUDA generators are not touched); after: the generator's
    state from before, so that nothing else a process draws depends on it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


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
