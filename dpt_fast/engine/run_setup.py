"""What every run sets up the same way, whatever its method: the output folder check, the
model config for the dataset, the summary of the data it reads."""

from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from pathlib import Path

from dpt_fast.config import DPTConfig
from dpt_fast.data import DatasetSplits
from dpt_fast.engine.config import TrainConfig


def model_config_for(config: TrainConfig, splits: DatasetSplits,
                     template_explicit: bool) -> DPTConfig:
    """The run's model config: the dataset's template unless the template is fixed."""
    if template_explicit:
        return config.model
    return dataclasses.replace(config.model, template=splits.template)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure files can be written in it, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"cannot write to the output folder {folder} "
                              f"({err.strerror or err}); choose another --output-dir") from None


def data_summary(config: TrainConfig, splits: DatasetSplits) -> dict:
    """Sizes of the data a run uses, and the shots it really gets: a class with fewer
    training images than ``shots`` keeps all of them (Dassl's rule)."""
    per_class = Counter(item.label for item in splits.train)
    counts = [per_class.get(label, 0) for label in range(splits.num_classes)]
    return {"classes": splits.num_classes, "train_images": len(splits.train),
            "val_images": len(splits.val), "test_images": len(splits.test),
            "shots": config.shots, "effective_shots_min": min(counts, default=0),
            "effective_shots_max": max(counts, default=0)}


__all__ = ["check_writable", "data_summary", "model_config_for"]
