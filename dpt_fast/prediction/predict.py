"""``dpt-fast predict``: the top-k classes of image files under trained prompts.

Images are read and transformed as for evaluation, in batches by a DataLoader; an image that
cannot be read becomes a :class:`~dpt_fast.prediction.predictions.Prediction` with its error, never
a silent gap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from dpt_fast.base import DPTBase
from dpt_fast.data.loading import ImageReadError, build_transforms, load_rgb
from dpt_fast.engine.progress import ProgressSettings, track
from dpt_fast.prediction.predictions import Prediction

log = logging.getLogger("dpt_fast")


class _ImageFiles(Dataset):
    """``(image tensor or None, index, error or None)`` of each path."""

    def __init__(self, paths: list[str], transform: Callable) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            return self.transform(load_rgb(self.paths[index])), index, None
        except ImageReadError as err:
            return None, index, str(err.__cause__ or err)


def _collate(items: list[tuple[torch.Tensor | None, int, str | None]],
             ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str | None]]]:
    """Stack the images that were read; keep the indices of all and the errors of the rest."""
    images = [image for image, _, _ in items if image is not None]
    read = [index for image, index, _ in items if image is not None]
    failed = [(index, error) for image, index, error in items if image is None]
    return (torch.stack(images) if images else None), read, failed


@torch.no_grad()
def predict_files(model: DPTBase, paths: list[str], *, top_k: int, batch_size: int,
                  num_workers: int, device: torch.device,
                  amp_dtype: torch.dtype | None,
                  progress: ProgressSettings | None = None) -> list[Prediction]:
    """The top ``top_k`` classes (capped at the number of classes) of each file, in the order
    of ``paths``; unreadable files carry their error instead."""
    model.eval()
    k = min(top_k, model.n_classes)
    transform = build_transforms(train=False, image_size=model.geometry.image_size[0])
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    predictions = [Prediction(path) for path in paths]
    for images, read, failed in track(loader, len(loader), "predict",
                                      progress or ProgressSettings()):
        for index, error in failed:
            predictions[index].error = error
            log.warning("cannot read %s: %s", paths[index], error)
        if images is None:
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs = model.predict(images.to(device, non_blocking=True))
        values, classes = probs.topk(k, dim=-1)
        for row, index in enumerate(read):
            predictions[index].top = [(model.classnames[c], float(v)) for v, c in
                                      zip(values[row].tolist(), classes[row].tolist(),
                                          strict=True)]
    return predictions


def predict_checkpoint(checkpoint: str, paths: list[str], *, top_k: int, batch_size: int,
                       num_workers: int, device: str, precision: str,
                       pretrained: str | None = None,
                       progress: ProgressSettings | None = None) -> list[Prediction]:
    """Rebuild the fast model of ``checkpoint`` (on the CLIP it records, or its weights
    replaced by ``pretrained``) and predict ``paths`` with it."""
    from dpt_fast.engine.device import autocast_dtype, resolve_device
    from dpt_fast.model import DPT

    target = resolve_device(device)
    amp_dtype = autocast_dtype(precision, target)
    model = DPT.from_checkpoint(checkpoint, device=target, pretrained=pretrained)
    return predict_files(model, paths, top_k=top_k, batch_size=batch_size,
                         num_workers=num_workers, device=target, amp_dtype=amp_dtype,
                         progress=progress)
