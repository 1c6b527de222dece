"""Training and evaluation of DPT on a dataset, on one device or many (torchrun / DDP).

Reproducibility: the data order comes from one permutation per epoch seeded with the run seed
and the epoch, cut into global batches that the processes split (GlobalBatchSampler), and each
sample's augmentation from a generator seeded with (seed, epoch, index). Neither depends on the
number of processes, the worker processes or what ran before, so a resumed run repeats the
uninterrupted one and a 2-process run sees the same global batches as a 1-process run with the
same global batch size.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from dpt_fast.base import DPTBase
from dpt_fast.data.pickling import atomic_write_bytes
from dpt_fast.engine import checkpoint as ckpt
from dpt_fast.engine.config import TrainConfig, config_to_dict
from dpt_fast.engine.distributed import DistInfo, all_reduce_sum, barrier, gather_objects
from dpt_fast.engine.metrics import classification_report
from dpt_fast.engine.schedule import build_scheduler
from dpt_fast.loss import layer_hits

log = logging.getLogger("dpt_fast")

LAST_CHECKPOINT = "checkpoint-last.safetensors"
TRAIN_LOG = "train_log.jsonl"
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

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        start, end = self._slice()
        for step in range(len(self)):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            yield batch[start:end]


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images_per_s: float
    lr: list[float]  # the learning rate of each parameter group during the epoch


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
        self.sampler = GlobalBatchSampler(len(self.train_set), config.batch_size, info.rank,
                                          info.world_size, config.seed)
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
        self._checkpoint_record: dict | None = None

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
        changed = config_changes(meta["config"], config_to_dict(self.config))
        if changed:
            raise ValueError(
                f"--resume: {path} was trained with other settings ({'; '.join(changed)}); "
                "resume with the checkpoint's settings, or start a new run in another "
                "output_dir")
        self.model.load_state_dict(ckpt.model_state(tensors))
        self.start_epoch = ckpt.restore_training_state(
            tensors, meta, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        # The last epoch's record, should the crash have come before it reached the log.
        self._checkpoint_record = {"epoch": self.start_epoch, **meta.get("train_stats", {})}
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ----------------------------------------------------------------------------- training
    def _loader(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.train_set.epoch = epoch
        return DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
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
                                       layer_denominator=self._layer_denominator(out, labels),
                                       batch_weight=self.sampler.batch_weight(len(labels)))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            batch = labels.shape[0]
            # Summed over processes, this is the global batch's loss (DDP's mean of the
            # processes' losses) times its size, however the batch was split.
            total_loss += loss.item() * self.sampler.global_batch / self.info.world_size
            total_correct += (out.logits.argmax(-1) == labels).sum().item()
            total_seen += batch
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{total_loss / total_seen:.4f}",
                            acc=f"{100 * total_correct / total_seen:.1f}",
                            img_s=f"{total_seen * self.info.world_size / elapsed:.1f}")
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scheduler.step()
        sums = all_reduce_sum(torch.tensor([total_loss, total_correct, total_seen],
                                           dtype=torch.float64, device=self.device), self.info)
        loss_sum, correct, seen = sums.tolist()
        return EpochStats(loss=loss_sum / max(seen, 1), accuracy=100 * correct / max(seen, 1),
                          images_per_s=seen / (time.perf_counter() - start), lr=lrs)

    def _layer_denominator(self, out, labels) -> torch.Tensor | None:
        """The global hit count / processes, so DDP's mean of gradients is the global mean."""
        if not self.info.enabled or out.layer_logits is None:
            return None
        hits = layer_hits(out.topk_indices, labels, out.layer_logits.shape[1]).sum()
        total = all_reduce_sum(hits.to(torch.float32), self.info)
        return total.clamp(min=1.0) / self.info.world_size

    def log_path(self) -> Path:
        return self.output_dir / TRAIN_LOG

    def fit(self, evaluate_fn: Callable[[], dict] | None = None) -> list[dict]:
        """Train from ``start_epoch`` to the end; returns the whole run's per-epoch records.

        Every ``eval_every`` epochs (not after the last: the caller evaluates then)
        ``evaluate_fn()``'s accuracy joins the epoch's record. A fresh run starts a new
        ``train_log.jsonl``; a resumed one appends to it, and the history returned is read back
        from it, so it covers the epochs before the resume too.
        """
        if self.info.is_main:
            if self.start_epoch == 0:
                self.log_path().unlink(missing_ok=True)
            else:
                repair_log(self.log_path(), self.start_epoch, self._checkpoint_record)
        every = self.config.eval_every
        for epoch in range(self.start_epoch, self.config.epochs):
            stats = self.train_epoch(epoch)
            self.save(epoch, stats)
            record = {"epoch": epoch + 1, **vars(stats)}
            if evaluate_fn is not None and every > 0 and (epoch + 1) % every == 0 \
                    and epoch + 1 < self.config.epochs:
                record["test_accuracy"] = evaluate_fn()["accuracy"]
            barrier(self.info)
            if self.info.is_main:
                log.info("epoch %d/%d loss %.4f acc %.2f %.1f img/s%s", epoch + 1,
                         self.config.epochs, stats.loss, stats.accuracy, stats.images_per_s,
                         f" test acc {record['test_accuracy']:.2f}"
                         if "test_accuracy" in record else "")
                with open(self.log_path(), "a") as f:
                    f.write(json.dumps(record) + "\n")
        barrier(self.info)
        return read_history(self.log_path(), self.config.epochs) if self.info.is_main else []


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


def _log_records(path: Path) -> list[dict]:
    """The records of a train log, skipping a line a crash left half-written."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
    return records


def read_history(path: Path, epochs: int) -> list[dict]:
    """The per-epoch records of ``train_log.jsonl`` for epochs 1..``epochs``, one each."""
    by_epoch = {r["epoch"]: r for r in _log_records(path)}
    return [by_epoch[e] for e in sorted(by_epoch) if e <= epochs]


def repair_log(path: Path, epochs_done: int, last_record: dict | None) -> None:
    """Before a resumed run appends to it: the log's records up to ``epochs_done`` (a torn last
    line dropped), plus ``last_record`` (from the checkpoint) if the crash lost that epoch's."""
    by_epoch = {r["epoch"]: r for r in _log_records(path) if r["epoch"] <= epochs_done}
    if last_record is not None and epochs_done not in by_epoch:
        by_epoch[epochs_done] = last_record
    text = "".join(json.dumps(by_epoch[e]) + "\n" for e in sorted(by_epoch))
    atomic_write_bytes(path, text.encode())


# Run settings that may change between a checkpoint and its resumption: where the data and the
# outputs are, how it is loaded and evaluated; everything else shapes the training itself.
RESUMABLE_CHANGES = frozenset({"root", "num_workers", "eval_batch_size", "eval_every", "device",
                               "output_dir", "resume"})


def config_changes(saved: dict, current: dict) -> list[str]:
    """``"name: saved -> current"`` for each training setting that differs (model fields too).
    A field an older checkpoint lacks counts as its default."""
    defaults = config_to_dict(TrainConfig())
    changes = []
    for name in sorted(set(saved) | set(current)):
        if name in RESUMABLE_CHANGES:
            continue
        old, new = saved.get(name, defaults.get(name)), current.get(name)
        if name == "model" and isinstance(old, dict) and isinstance(new, dict):
            model_defaults = defaults["model"]
            changes += [f"model.{k}: {old.get(k, model_defaults.get(k))!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new))
                        if old.get(k, model_defaults.get(k)) != new.get(k)]
        elif old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def check_schedule(config: TrainConfig) -> None:
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    if not math.isfinite(config.lr) or config.lr <= 0 or config.text_lr <= 0:
        raise ValueError("learning rates must be positive")
