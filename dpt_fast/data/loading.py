"""Image transforms and the torch Dataset of records.

The transforms are what Dassl builds from the authors' config (``configs/trainers/VPT``:
``INPUT.SIZE (224, 224)``, ``INTERPOLATION "bicubic"``, CLIP's mean/std and ``TRANSFORMS
["random_resized_crop", "random_flip", "normalize"]``):

* train: ``RandomResizedCrop(size, scale=(0.08, 1.0), bicubic)``, ``RandomHorizontalFlip()``,
  ``ToTensor()``, ``Normalize`` (no resize first: Dassl skips it when a random crop is chosen);
* test: ``Resize(size, bicubic)`` of the shorter side, ``CenterCrop(size)``, ``ToTensor()``,
  ``Normalize``.

:func:`build_uint8_transforms` is the same spatial pipeline (same PIL operations, same random
draws) ending in a uint8 ``(3, size, size)`` tensor instead: the float conversion and the
normalisation then run on the whole batch on the device
(:func:`dpt_fast.data.device_batches.normalize_uint8`, bit-identical to ``ToTensor`` +
``Normalize``), and the workers ship a quarter of the bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from dpt_fast.data.records import Datum
from dpt_fast.errors import ImageReadError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 224
# Dassl's INPUT.RRCROP_SCALE default (the authors' configs do not override it).
RANDOM_RESIZED_CROP_SCALE = (0.08, 1.0)
INTERPOLATION = InterpolationMode.BICUBIC


def build_transforms(train: bool, image_size: int = DEFAULT_IMAGE_SIZE) -> T.Compose:
    """Dassl's train or test pipeline for the authors' config, producing CLIP-normalised
    ``(3, image_size, image_size)`` float tensors from PIL images."""
    return T.Compose([*_spatial_transforms(train, image_size), T.ToTensor(),
                      T.Normalize(mean=CLIP_MEAN, std=CLIP_STD)])


def build_uint8_transforms(train: bool, image_size: int = DEFAULT_IMAGE_SIZE) -> T.Compose:
    """The spatial part of :func:`build_transforms` (same PIL operations, in the same order, so
    the same random draws under the same seed), producing uint8 ``(3, image_size, image_size)``
    tensors, values 0-255, from PIL images.

    ``normalize_uint8`` of a batch of these equals ``build_transforms``' output bit for bit.
    """
    return T.Compose([*_spatial_transforms(train, image_size), ToUint8Tensor()])


def _spatial_transforms(train: bool, image_size: int) -> list[Callable]:
    """Dassl's PIL-to-PIL steps: the random crop and flip for training, resize and centre crop
    for testing."""
    if train:
        return [
            T.RandomResizedCrop((image_size, image_size), scale=RANDOM_RESIZED_CROP_SCALE,
                                interpolation=INTERPOLATION),
            T.RandomHorizontalFlip(),
        ]
    return [
        T.Resize(image_size, interpolation=INTERPOLATION),
        T.CenterCrop((image_size, image_size)),
    ]


class ToUint8Tensor:
    """PIL RGB image (W x H) -> contiguous uint8 tensor (3, H, W): ``ToTensor`` without the
    division by 255 (the same pixel layout, so the float conversion can happen later)."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            raise ValueError(f"ToUint8Tensor expects an RGB image, got mode {image.mode!r}")
        # np.array copies into a writable array (np.asarray of a PIL image is read-only, which
        # torch.from_numpy warns about); contiguous() makes collation a plain copy.
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ImageDataset(Dataset):
    """``(transform(image), label)`` for each record, images read as RGB (Dassl's
    ``read_image``)."""

    def __init__(self, items: Sequence[Datum], transform: Callable | None = None) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        """(the transform's output, a PIL image without one; the label)."""
        item = self.items[index]
        image = load_rgb(item.impath)
        if self.transform is not None:
            image = self.transform(image)
        return image, item.label


def load_rgb(path: str) -> Image.Image:
    """Open ``path`` as an RGB image, decoding it fully now so that a truncated or corrupt file
    fails here, naming the file, rather than later inside a transform.

    Raises:
        ImageReadError: the file is missing, unreadable or not a decodable image.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {exc}") from exc
