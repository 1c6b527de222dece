"""What the runs of one process share: the process group, the device, the CLIP, the datasets.

``dpt-fast train`` opens a session for its one run; ``dpt-fast sweep`` opens one for all the
runs it does. What a session holds never changes a run's numbers: the CLIP is frozen (no run
writes to it), a dataset's index is the file list its layout gives, and each run draws its own
few-shot split and seeds its own prompts (:mod:`dpt_fast.engine.run`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpt_fast.backbone import clip_record, load_clip
from dpt_fast.data import DatasetSplits, build_dataset, image_folder_dataset
from dpt_fast.data.datasets import DatasetIndex, read_dataset_index
from dpt_fast.data.disk_cache import CacheSettings
from dpt_fast.data.fewshot import Subsample
from dpt_fast.engine.device import resolve_device
from dpt_fast.engine.distributed import (
    DistInfo,
    broadcast_object,
    close_distributed,
    init_distributed,
)
from dpt_fast.engine.eval_split import TestSet, prepare_test_set

log = logging.getLogger("dpt_fast")


@dataclass
class LoadedClip:
    module: nn.Module  # the frozen open_clip CLIP, in eval mode on the session's device
    record: dict  # clip_record(): backbone, weights and activation, for results and checkpoints
    _digest: str | None = None

    def cache_key(self) -> dict:
        """What identifies this CLIP for the frozen-feature cache: its record and a SHA-256
        of its weights (computed once)."""
        if self._digest is None:
            from dpt_fast.data.disk_cache import module_weights_digest

            self._digest = module_weights_digest(self.module)
        return {"backbone": self.record["backbone"], "pretrained": self.record["pretrained"],
                "weights_sha256": self._digest}


class Session:
    """The process group (torchrun's, when there is one), the device, and caches of the CLIPs
    and dataset indexes the runs of this process read. Use as a context manager: leaving it
    closes the process group.

    Args:
        device_name: "auto", "cpu", "cuda", "cuda:N" (as ``--device``).
        indexes: dataset indexes read before, by (dataset, root) (a sweep's checks read them).
    """

    def __init__(self, device_name: str, *,
                 indexes: dict[tuple[str, str], DatasetIndex] | None = None) -> None:
        self.device_name = device_name
        self.info: DistInfo = _join_process_group(device_name)
        try:
            self.device: torch.device = resolve_device(device_name, self.info)
        except BaseException:
            close_distributed()
            raise
        self._clip_key: tuple[str, str] | None = None
        self._clip: LoadedClip | None = None
        self._indexes: dict[tuple[str, str], DatasetIndex] = dict(indexes or {})
        self._test_sets: dict[tuple, TestSet] = {}

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._clip = None
        self._indexes.clear()
        self._test_sets.clear()
        close_distributed()

    def broadcast(self, value: Any) -> Any:
        """Process 0's ``value`` on every process of the group (decisions only it can make,
        such as whether it took a run folder's lock)."""
        return broadcast_object(value, self.info)

    def clip(self, backbone: str, pretrained: str) -> LoadedClip:
        """The CLIP ``backbone`` with weights ``pretrained``, built once: the last one built is
        kept (a sweep orders its runs by backbone, so each is built once)."""
        key = (backbone, pretrained)
        if self._clip is None or self._clip_key != key:
            self._clip = None  # free the previous CLIP before building the next
            module = load_clip(backbone, pretrained, self.device)
            record = clip_record(backbone, pretrained, module)
            log.info("CLIP %s (%s): %s activation", record["backbone"], record["pretrained"],
                     record["activation"])
            self._clip, self._clip_key = LoadedClip(module, record), key
        return self._clip

    def splits(self, dataset: str, root: str, shots: int, seed: int,
               subsample: Subsample) -> DatasetSplits:
        """A CoOp dataset by name (its index read once per session), or ``dataset="folder"``:
        a root/{train,val,test}/<class> tree."""
        if dataset == "folder":
            if subsample != "all":
                raise ValueError("base/new subsampling needs a named dataset, not an image "
                                 "folder")
            return image_folder_dataset(root, shots=shots, seed=seed)
        key = (dataset, root)
        if key not in self._indexes:
            self._indexes[key] = read_dataset_index(dataset, root)
        return build_dataset(dataset, root, shots=shots, seed=seed, subsample=subsample,
                             index=self._indexes[key])

    def test_set(self, splits: DatasetSplits, subsample: str, image_size: int,
                 settings: CacheSettings, *, skip_unreadable: bool,
                 num_workers: int) -> TestSet:
        """The test split of ``splits`` ready for evaluation (:func:`prepare_test_set`), kept
        for the session: every run on the dataset evaluates the same images."""
        key = (splits.name, tuple(d.impath for d in splits.test), subsample, image_size,
               settings, skip_unreadable)
        if key not in self._test_sets:
            self._test_sets[key] = prepare_test_set(
                splits.test, image_size, settings, skip_unreadable=skip_unreadable,
                num_workers=num_workers)
        return self._test_sets[key]


def _join_process_group(device_name: str) -> DistInfo:
    """torchrun's process group, on NCCL when the run will use CUDA, else gloo."""
    wants_cuda = device_name.startswith("cuda") or (
        device_name == "auto" and torch.cuda.is_available())
    return init_distributed(torch.device("cuda" if wants_cuda else "cpu"))
