"""Evaluation of a DPT model on a dataset, split over the processes of a DDP run."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dpt_fast.base import DPTBase
from dpt_fast.engine.distributed import DistInfo, gather_objects
from dpt_fast.engine.metrics import classification_report


@torch.no_grad()
def evaluate(model: DPTBase, dataset: Dataset, labels: list[int], *, device: torch.device,
             info: DistInfo, batch_size: int, num_workers: int,
             amp_dtype: torch.dtype | None, desc: str = "eval") -> dict:
    """Accuracy, macro-F1 and per-class accuracy of ``model`` on ``dataset``.

    Each process evaluates every world_size-th sample; the predictions are gathered, so every
    process returns the same report.
    """
    model.eval()
    indices = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    predictions = []
    bar = tqdm(loader, desc=desc, disable=not info.is_main, leave=False, dynamic_ncols=True)
    for images, _ in bar:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images.to(device, non_blocking=True)).logits
        predictions.extend(logits.argmax(-1).tolist())
    gathered = gather_objects(list(zip(indices, predictions, strict=True)), info)
    merged = sorted(pair for part in gathered for pair in part)
    preds = torch.tensor([p for _, p in merged], dtype=torch.long)
    truth = torch.tensor([labels[i] for i, _ in merged], dtype=torch.long)
    return classification_report(preds, truth, model.classnames)
