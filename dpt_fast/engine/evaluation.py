"""Evaluation of a DPT model on a dataset, split over the processes of a DDP run."""

from __future__ import annotations

import logging
import time
from collections.abc import Sized

import torch
from torch.utils.data import DataLoader, Dataset

from dpt_fast.base import DPTBase
from dpt_fast.data.device_batches import DeviceBatches
from dpt_fast.engine.distributed import DistInfo, gather_objects
from dpt_fast.engine.metrics import classification_report
from dpt_fast.engine.progress import ProgressSettings, format_duration, track

log = logging.getLogger("dpt_fast")


@torch.no_grad()
def evaluate(model: DPTBase, dataset: Dataset, labels: list[int], *, device: torch.device,
             info: DistInfo, batch_size: int, num_workers: int,
             amp_dtype: torch.dtype | None, desc: str = "eval",
             progress: ProgressSettings | None = None,
             frozen: torch.Tensor | None = None) -> dict:
    """Accuracy, macro-F1 and per-class accuracy of ``model`` on ``dataset``.

    Each process evaluates every world_size-th sample; the predictions are gathered, so every
    process returns the same report. ``progress``: how the batches are reported (a bar on a
    terminal, log lines otherwise by default); the end is one INFO line.

    ``dataset`` yields float images (normalised) or uint8 crops (normalised here, on the
    device: bit-identical to normalising on the CPU). ``frozen``: (N, E) the frozen CLIP's
    features of the N samples (an evaluation cache), so the model runs one prompted pass.
    """
    model.eval()
    assert isinstance(dataset, Sized)  # a map-style dataset with a length
    indices = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    predictions = []
    start = time.perf_counter()
    # On the device, uint8 crops normalised there (DeviceBatches); labels are not needed here.
    batches = track(DeviceBatches(loader, device, overlap=False), len(loader), desc,
                    progress or ProgressSettings(), enabled=info.is_main)
    done = 0
    for images, _ in batches:
        features = None
        if frozen is not None:
            batch_indices = indices[done:done + images.shape[0]]
            features = frozen[batch_indices].to(device, non_blocking=True)
        done += images.shape[0]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images, frozen_features=features).logits
        predictions.extend(logits.argmax(-1).tolist())
    gathered = gather_objects(list(zip(indices, predictions, strict=True)), info)
    merged = sorted(pair for part in gathered for pair in part)
    preds = torch.tensor([p for _, p in merged], dtype=torch.long)
    truth = torch.tensor([labels[i] for i, _ in merged], dtype=torch.long)
    report = classification_report(preds, truth, model.classnames)
    if info.is_main:
        seconds = time.perf_counter() - start
        log.info("%s: accuracy %.2f%% on %d images | %s, %.1f img/s", desc, report["accuracy"],
                 len(dataset), format_duration(seconds), len(dataset) / max(seconds, 1e-9))
    return report
