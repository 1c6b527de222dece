"""Batches of uint8 images normalised on the device, bit-identical to torchvision's CPU path.

The workers send uint8 (B, 3, H, W) crops (a quarter of the bytes of float32) and the device
converts and normalises the whole batch at once. :func:`normalize_uint8` performs the
operations of ``ToTensor`` and ``Normalize`` (torchvision 0.29: ``img.to(float32).div(255)``,
then ``tensor.sub_(mean[:, None, None]).div_(std[:, None, None])``), in the same order and in
float32, so each value is the same IEEE result as the CPU transforms give.

One trap: on CUDA, dividing by a Python number is computed as ``x * (1 / 255)``
(PyTorch's ``div_true_kernel_cuda`` optimisation for CPU scalars), which rounds differently
for 126 of the 256 pixel values. The divisor is therefore a tensor on the batch's device, which
takes the true-division path on every device.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

import torch

from dpt_fast.data.loading import CLIP_MEAN, CLIP_STD

_PIXEL_MAX = 255.0


def normalize_uint8(batch: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """``Normalize(mean, std)(ToTensor()(image))`` for a batch of uint8 images, on their device.

    Args:
        batch: uint8 (B, C, H, W) (or (C, H, W)), values 0-255, on any device.
        mean, std: C per-channel values (CLIP's by default).

    Returns:
        float32 tensor of the batch's shape and device, equal bit for bit to torchvision's
        ``ToTensor`` + ``Normalize`` of each image on the CPU.
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize_uint8 expects a uint8 tensor, got {batch.dtype}")
    if batch.ndim < 3 or batch.shape[-3] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected (..., {len(mean)}, H, W) images and as many std values, got "
                         f"shape {tuple(batch.shape)}, {len(mean)} means, {len(std)} stds")
    pixel_max, mean_t, std_t = _constants(tuple(mean), tuple(std), batch.device)
    return batch.to(torch.float32).div_(pixel_max).sub_(mean_t).div_(std_t)


@functools.cache  # never evicted: a freed tensor could still be read by queued work
def _constants(mean: tuple[float, ...], std: tuple[float, ...],
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """255, mean (C, 1, 1) and std (C, 1, 1) as float32 tensors on ``device``.

    Made once per device: building them per batch would be a synchronous host-to-device copy
    that stalls the host until the device has finished its queued work.
    """
    if any(s == 0 for s in std):
        raise ValueError(f"std has a zero entry: {std}")
    # The same float32 constants as Normalize builds (torch.as_tensor of the Python floats).
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    # A 0-dim tensor divisor on the device, not the number 255: see the module docstring.
    pixel_max = torch.tensor(_PIXEL_MAX, dtype=torch.float32, device=device)
    return pixel_max, mean_t, std_t


Batch = tuple[torch.Tensor, torch.Tensor]


class DeviceBatches:
    """Iterates a DataLoader of ``(images, labels)``, yielding them on ``device`` with uint8
    images normalised there (float images pass through unchanged, only moved).

    Copies are ``non_blocking``: build the DataLoader with ``pin_memory=True`` when the device
    is CUDA, else the copies are synchronous (still correct). With ``overlap`` on CUDA, batch
    i+1 is copied and normalised on a side stream while the caller computes on batch i; the
    caller's stream waits for that work before it receives the batch, and the tensors are
    recorded on the caller's stream so the allocator does not reuse their memory early. On
    other devices there are no streams: each batch is moved and normalised when it is asked
    for.

    Args:
        loader: any iterable of (images, labels): uint8 (B, 3, H, W) or float (B, 3, H, W)
            images, (B,) labels.
        device: where the batches go.
        mean, std: for the uint8 batches (CLIP's by default).
        overlap: use a side stream on CUDA (ignored elsewhere).
    """

    def __init__(self, loader: Iterable[Batch], device: torch.device | str, *,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 overlap: bool = True) -> None:
        self.loader = loader
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.overlap = overlap and self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # a DataLoader has one

    def _to_device(self, batch: Batch) -> Batch:
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = normalize_uint8(images, self.mean, self.std)
        elif not images.is_floating_point():
            raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
        return images, labels

    def __iter__(self) -> Iterator[Batch]:
        if not self.overlap:
            for batch in self.loader:
                yield self._to_device(batch)
            return
        yield from self._overlapped()

    def _overlapped(self) -> Iterator[Batch]:
        stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)

        def prepare() -> Batch | None:
            batch = next(batches, None)
            if batch is None:
                return None
            with torch.cuda.stream(stream):
                return self._to_device(batch)

        upcoming = prepare()
        while upcoming is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(stream)  # the copy and normalisation of `upcoming` are done
            for tensor in upcoming:
                # Made on the side stream, used on the caller's: keep the memory until the
                # caller's queued work on it has run.
                tensor.record_stream(current)
            ready, upcoming = upcoming, prepare()
            yield ready
