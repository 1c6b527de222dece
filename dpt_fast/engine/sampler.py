"""The global-batch sampler: the same global batches for any number of processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's share of every training step, the same global batches for any number of
    processes.

    Each epoch draws one permutation of the n training samples (seeded by seed + epoch, as
    DistributedSampler draws it) and cuts it into global batches of ``batch_size``; process r
    takes the r-th contiguous slice of each. The last incomplete global batch is dropped when
    the set holds at least one full batch (Dassl's rule); a smaller set is one global batch,
    split as evenly as possible (then the slices may differ by one sample: see
    :meth:`batch_weight`). Nothing is padded or repeated.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        if n < world_size:
            raise ValueError(f"the training set holds {n} images, fewer than the {world_size} "
                             "processes: use fewer processes")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.seed, self.epoch = seed, 0
        self.global_batch = min(batch_size, n)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.global_batch

    def _slice(self) -> tuple[int, int]:
        """[start, end) of this process's part of a global batch."""
        base, extra = divmod(self.global_batch, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def batch_weight(self, local_size: int) -> float | None:
        """Factor on this process's mean cross-entropy so that DDP's average over processes is
        the global batch's mean (None when every process holds an equal share)."""
        if self.global_batch % self.world_size == 0:
            return None
        return local_size * self.world_size / self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        start, end = self._slice()
        for step in range(len(self)):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield batch[start:end]
