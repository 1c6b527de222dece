"""Training and evaluation of DPT on a dataset, on one device or many (torchrun / DDP).

Reproducibility: the data order comes from a DistributedSampler seeded with the run seed and
the epoch, and each sample's augmentation from a generator seeded with (seed, epoch, index).
Neither depends on the number of processes, the worker processes or what ran before, so a
resumed run repeats the uninterrupted one and a 2-process run sees the same global batches as a
1-process run with the same global batch size.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from dpt_fast.base import DPTBase
from dpt_fast.engine import checkpoint as ckpt
from dpt_fast.engine.config import TrainConfig, config_to_dict
from dpt_fast.engine.distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from dpt_fast.engine.metrics import classification_report
from dpt_fast.engine.schedule import build_scheduler
from dpt_fast.loss import layer_hits

log = logging.getLogger("dpt_fast")

LAST_CHECKPOINT = "checkpoint-last.safetensors"
_SEED_STRIDE = 1_000_003  # separates the (seed, epoch, index) streams


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info else 0)
        torch.cuda.set_device(device)
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: no autocast, fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        if device.type == "cpu" and precision == "fp16":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.bfloat16 if precision == "bf16" else torch.float16
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the global RNG user transforms use)
    torch.manual_seed(seed)


class SeededSamples(Dataset):
    """A dataset whose random transforms are seeded per (run seed, epoch, sample index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * _SEED_STRIDE + self.epoch) * _SEED_STRIDE + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed % 2**63)
            return self.dataset[index]


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images_per_s: float


class Trainer:
    """Trains a DPT model with the authors' recipe (see :class:`TrainConfig`)."""

    def __init__(self, model: DPTBase, config: TrainConfig, train_set: Dataset,
                 device: torch.device, info: DistInfo, output_dir: Path) -> None:
        if config.batch_size % info.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                             f"number of processes {info.world_size}")
        check_schedule(config)
        self.model, self.config, self.device, self.info = model, config, device, info
        self.output_dir = output_dir
        self.train_set = SeededSamples(train_set, config.seed)
        self.sampler = DistributedSampler(self.train_set, num_replicas=info.world_size,
                                          rank=info.rank, shuffle=True, seed=config.seed)
        groups = model.parameter_groups()
        text = groups.get("text_prompts", [])
        visual = groups.get("visual_prompts", []) + groups.get("cavpt", [])
        param_groups, warmups = [], []
        if text:
            param_groups.append({"params": text, "lr": config.text_lr, "name": "text"})
            warmups.append((config.text_warmup_epochs, config.warmup_lr))
        if visual:
            param_groups.append({"params": visual, "lr": config.lr, "name": "visual"})
            warmups.append((config.warmup_epochs, config.warmup_lr))
        self.optimizer = torch.optim.SGD(param_groups, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, config.epochs, warmups)
        self.amp_dtype = autocast_dtype(config.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.forward_model = (
            DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                    else None, broadcast_buffers=False)
            if info.enabled else model
        )
        self.start_epoch = 0

    # ----------------------------------------------------------------------------- state
    def checkpoint_path(self) -> Path:
        return self.output_dir / LAST_CHECKPOINT

    def save(self, epoch: int, stats: EpochStats) -> None:
        if not self.info.is_main:
            return
        ckpt.save_checkpoint(
            self.checkpoint_path(), model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, epoch=epoch,
            info={"config": config_to_dict(self.config), "classnames": self.model.classnames,
                  "train_stats": vars(stats)},
        )

    def resume(self) -> None:
        path = self.checkpoint_path()
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        tensors, meta = ckpt.read_checkpoint(path)
        self.model.load_state_dict(ckpt.model_state(tensors))
        self.start_epoch = ckpt.restore_training_state(
            tensors, meta, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ----------------------------------------------------------------------------- training
    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.train_set.epoch = epoch
        workers = self.config.num_workers
        # Dassl drops the last incomplete batch whenever the set holds one full batch.
        drop_last = len(self.train_set) >= self.config.batch_size
        return DataLoader(
            self.train_set, batch_size=self.config.batch_size // self.info.world_size,
            sampler=self.sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            drop_last=drop_last, persistent_workers=False,
        )

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def train_epoch(self, epoch: int) -> EpochStats:
        self.model.train()
        loader = self._loader(epoch)
        total_loss = total_correct = total_seen = 0.0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   disable=not self.info.is_main, leave=False, dynamic_ncols=True)
        for images, labels in bar:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self._autocast():
                out = self.forward_model(images)
                loss = self.model.loss(out, labels, epoch,
                                       layer_denominator=self._layer_denominator(out, labels))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            batch = labels.shape[0]
            total_loss += loss.item() * batch
            total_correct += (out.logits.argmax(-1) == labels).sum().item()
            total_seen += batch
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{total_loss / total_seen:.4f}",
                            acc=f"{100 * total_correct / total_seen:.1f}",
                            img_s=f"{total_seen * self.info.world_size / elapsed:.1f}")
        self.scheduler.step()
        sums = all_reduce_sum(torch.tensor([total_loss, total_correct, total_seen],
                                           dtype=torch.float64, device=self.device), self.info)
        loss_sum, correct, seen = sums.tolist()
        return EpochStats(loss=loss_sum / max(seen, 1), accuracy=100 * correct / max(seen, 1),
                          images_per_s=seen / (time.perf_counter() - start))

    def _layer_denominator(self, out, labels) -> torch.Tensor | None:
        """The global hit count / processes, so DDP's mean of gradients is the global mean."""
        if not self.info.enabled or out.layer_logits is None:
            return None
        hits = layer_hits(out.topk_indices, labels, out.layer_logits.shape[1]).sum()
        total = all_reduce_sum(hits.to(torch.float32), self.info)
        return total.clamp(min=1.0) / self.info.world_size

    def fit(self) -> list[dict]:
        history = []
        for epoch in range(self.start_epoch, self.config.epochs):
            stats = self.train_epoch(epoch)
            self.save(epoch, stats)
            barrier(self.info)
            record = {"epoch": epoch + 1, **vars(stats),
                      "lr": [g["lr"] for g in self.optimizer.param_groups]}
            history.append(record)
            if self.info.is_main:
                log.info("epoch %d/%d loss %.4f acc %.2f %.1f img/s", epoch + 1,
                         self.config.epochs, stats.loss, stats.accuracy, stats.images_per_s)
                with open(self.output_dir / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        return history


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


def check_schedule(config: TrainConfig) -> None:
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if not math.isfinite(config.lr) or config.lr <= 0 or config.text_lr <= 0:
        raise ValueError("learning rates must be positive")
