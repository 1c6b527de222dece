"""What an evaluation reads, prepared once: the test crops and the frozen CLIP's features.

The test transform (resize, centre crop) is deterministic, and the frozen CLIP's feature of an
image never changes for a given backbone and weights, so both are computed once and kept on
disk (:mod:`dpt_fast.data.crop_cache`, :func:`dpt_fast.data.disk_cache.cached_features`):
a sweep evaluates each test set 15 times per method. Without caches (``--no-cache``, or a
cache folder that cannot be written) the images are decoded at each evaluation, as before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dpt_fast.data import ImageDataset, build_transforms
from dpt_fast.data.crop_cache import CropDataset, TestCrops, cached_test_crops
from dpt_fast.data.disk_cache import CacheSettings, cached_features
from dpt_fast.data.loading import ImageReadError, load_rgb
from dpt_fast.data.records import Datum
from dpt_fast.ops.prompt_attention.dispatch import BACKEND_ENV

if TYPE_CHECKING:
    from dpt_fast.base import DPTBase

log = logging.getLogger("dpt_fast")

FEATURE_BATCH = 100  # images per frozen-CLIP batch when the features are computed


@dataclass
class TestSet:
    """The images of a test split as evaluation reads them.

    Attributes:
        dataset: ``(image, label)`` pairs: uint8 (3, H, W) crops from the cache, or
            normalised float (3, H, W) images decoded now (no cache).
        labels: the label of each sample of ``dataset``.
        skipped: paths of the unreadable images left out (``--skip-unreadable``).
        crops: the cached crops (None without the cache): their key digest keys the features.
    """

    dataset: Dataset
    labels: list[int]
    skipped: list[str] = field(default_factory=list)
    crops: TestCrops | None = None
    _features: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)


def prepare_test_set(items: Sequence[Datum], image_size: int, settings: CacheSettings, *,
                     skip_unreadable: bool, num_workers: int) -> TestSet:
    """The test split ``items`` ready for evaluation: from the crop cache (built now when it
    is missing or stale), else decoded at each evaluation.

    Every image is read here, before any training, when the cache is on: an unreadable one
    stops the run now, naming the file (or, with ``skip_unreadable``, is left out and counted).

    Raises:
        ImageReadError: an unreadable image (without ``skip_unreadable``).
    """
    crops = cached_test_crops(items, image_size, settings, skip_unreadable=skip_unreadable,
                              num_workers=num_workers)
    if crops is not None:
        skipped = [s.path for s in crops.skipped]
        for path in skipped:
            log.warning("left out an unreadable test image: %s", path)
        return TestSet(CropDataset(crops), [int(label) for label in crops.labels], skipped,
                       crops)
    kept, skipped = list(items), []
    if skip_unreadable:
        kept, skipped = _readable(items)
    return TestSet(ImageDataset(kept, build_transforms(train=False, image_size=image_size)),
                   [item.label for item in kept], skipped)


def _readable(items: Sequence[Datum]) -> tuple[list[Datum], list[str]]:
    """Without the cache, ``--skip-unreadable`` still checks every image before training."""
    kept, skipped = [], []
    for item in items:
        try:
            load_rgb(item.impath)
        except ImageReadError as err:
            log.warning("left out an unreadable test image: %s (%s)", item.impath, err)
            skipped.append(item.impath)
            continue
        kept.append(item)
    return kept, skipped


def frozen_features(test_set: TestSet, model: DPTBase, clip_key: dict[str, Any],
                    device: torch.device,
                    amp_dtype: torch.dtype | None, settings: CacheSettings,
                    batch_size: int = FEATURE_BATCH) -> torch.Tensor | None:
    """The frozen CLIP's image features (N, E) of ``test_set`` (in its order), in the dtype the
    forward pass computes them in; None without the crop cache (nothing to key them by).

    ``clip_key``: what identifies the CLIP (backbone, weights file and a digest of its
    weights). The key also holds the crops' key, the device model (CPU instruction set), the
    autocast dtype, the torch version and the attention backend: what changes the rounding.
    The features are computed in contiguous batches of ``batch_size``; an evaluation that
    batches otherwise (another batch size, DDP's rank-strided share) may differ from them by
    rounding, as two uncached evaluations batched differently do.
    """
    if test_set.crops is None or not settings.enabled:
        return None
    dtype_name = "fp32" if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    key = {**clip_key, "crops": test_set.crops.key_digest, "device": _device_kind(device),
           "precision": dtype_name, "image_size": model.geometry.image_size[0],
           # what else changes the rounding of the frozen pass
           "torch": torch.__version__,
           # the frozen pass's code: models that run the same pass share the features
           "model": getattr(model, "frozen_pass_id", type(model).__name__),
           "backend": os.environ.get(BACKEND_ENV, "auto")}
    memo = tuple(sorted((k, str(v)) for k, v in key.items()))
    if memo not in test_set._features:
        computed_dtype: list[torch.dtype] = []

        def compute() -> torch.Tensor:
            values = compute_frozen_features(model, test_set.dataset, device, amp_dtype,
                                             batch_size)
            computed_dtype.append(values.dtype)
            return values.float()  # bfloat16 values are exact in float32

        array = cached_features(key, len(test_set.labels), compute, settings)
        test_set._features[memo] = np.asarray(array)
        log.debug("frozen features of %d test images: %s", len(test_set.labels),
                  "computed" if computed_dtype else "read from the cache")
    values = torch.from_numpy(np.array(test_set._features[memo]))
    # Back to the dtype the unprompted pass gives under this autocast (lossless from float32).
    return values.to(_frozen_dtype(model, test_set, device, amp_dtype))


def _device_kind(device: torch.device) -> str:
    """The device type and model: another GPU (or CPU instruction set) rounds differently."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    if device.type == "cpu":
        return f"cpu:{torch.backends.cpu.get_cpu_capability()}"
    return device.type


@torch.no_grad()
def _frozen_dtype(model: DPTBase, test_set: TestSet, device: torch.device,
                  amp_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of ``model.encode_image_frozen`` under this autocast (one image's pass)."""
    if amp_dtype is None:
        return torch.float32
    from dpt_fast.data.device_batches import normalize_uint8

    image, _ = test_set.dataset[0]
    image = image.unsqueeze(0).to(device)
    if image.dtype == torch.uint8:
        image = normalize_uint8(image)
    with torch.autocast(device.type, dtype=amp_dtype):
        return model.encode_image_frozen(image).dtype


@torch.no_grad()
def compute_frozen_features(model: DPTBase, dataset: Dataset[Any], device: torch.device,
                            amp_dtype: torch.dtype | None, batch_size: int) -> torch.Tensor:
    """(N, E) ``model.encode_image_frozen`` of every sample of ``dataset``, on the CPU."""
    from dpt_fast.data.device_batches import DeviceBatches

    model.eval()
    parts = []
    loader = DataLoader(dataset, batch_size=batch_size, pin_memory=device.type == "cuda")
    for images, _ in DeviceBatches(loader, device, overlap=False):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            parts.append(model.encode_image_frozen(images).cpu())
    return torch.cat(parts)
