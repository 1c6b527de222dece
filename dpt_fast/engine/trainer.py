"""The training loop: the authors' recipe on one device or many (torchrun / DDP).

The data order comes from :class:`~dpt_fast.engine.sampler.GlobalBatchSampler` and each
sample's augmentation from :class:`~dpt_fast.seeding.SeededSamples`; with the optimizer,
scheduler and RNG states in every checkpoint, a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from dpt_fast import checkpoint as ckpt
from dpt_fast.base import DPTBase
from dpt_fast.config_fields import RESUMABLE, config_diff
from dpt_fast.data.device_batches import DeviceBatches
from dpt_fast.data.loaders import EpochIndices, EpochSeededSamples, train_loader
from dpt_fast.engine.config import TrainConfig, config_to_dict, progress_settings
from dpt_fast.engine.device import autocast_dtype
from dpt_fast.engine.distributed import DistInfo, all_reduce_sum, barrier
from dpt_fast.engine.progress import Progress, elapsed_and_eta
from dpt_fast.engine.run_folder import LAST_CHECKPOINT, TRAIN_LOG
from dpt_fast.engine.sampler import GlobalBatchSampler
from dpt_fast.engine.schedule import build_scheduler
from dpt_fast.engine.tensorboard import RunSummaries
from dpt_fast.engine.train_log import append_record, read_history, repair_log
from dpt_fast.errors import TrainingDiverged
from dpt_fast.loss import layer_hits
from dpt_fast.methods import get_method
from dpt_fast.output import DPTOutput

log = logging.getLogger("dpt_fast")

__all__ = ["LAST_CHECKPOINT", "EpochStats", "Trainer"]


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images_per_s: float
    lr: list[float]  # the learning rate of each parameter group during the epoch


class Trainer:
    """Trains a DPT model with the authors' recipe (see :class:`TrainConfig`)."""

    def __init__(self, model: DPTBase, config: TrainConfig, train_set: Dataset,
                 device: torch.device, info: DistInfo, output_dir: Path, *,
                 clip_info: dict | None = None, summaries: RunSummaries | None = None) -> None:
        if config.batch_size % info.world_size:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                             f"number of processes {info.world_size}")
        self.model, self.config, self.device, self.info = model, config, device, info
        self.output_dir = output_dir
        # The CLIP the prompts are trained on (backbone, weights, activation), kept in every
        # checkpoint so that the prompts can be used again on the same CLIP.
        self.clip_info = clip_info
        # The epoch travels with each index (EpochIndices), so that the loader's worker
        # processes can persist across epochs and still seed each epoch's augmentations.
        self.train_set = EpochSeededSamples(train_set, config.seed)
        self.sampler = GlobalBatchSampler(len(self.train_set), config.batch_size, info.rank,
                                          info.world_size, config.seed)
        self.batches = EpochIndices(self.sampler)
        self._train_loader: DataLoader | None = None
        # The groups the method declares (name, model parts, which lr and warm-up apply).
        parts = model.parameter_groups()
        param_groups, warmups = [], []
        for group in get_method(config.model.method).param_groups:
            params = [p for part in group.parts for p in parts.get(part, [])]
            if params:
                param_groups.append({"params": params, "lr": getattr(config, group.lr_field),
                                     "name": group.name})
                warmups.append((getattr(config, group.warmup_field), config.warmup_lr))
        grouped = {part for group in get_method(config.model.method).param_groups
                   for part in group.parts}
        left = sorted(set(parts) - grouped)
        if left:
            raise ValueError(f"method {config.model.method!r} declares no parameter group for "
                             f"the model's parts {left}: add them to its param_groups")
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
        # TensorBoard (a no-op writer without --tensorboard); the caller owns and closes it.
        self.summaries = summaries or RunSummaries(output_dir, enabled=False)

    # ----------------------------------------------------------------------------- state
    def checkpoint_path(self) -> Path:
        return self.output_dir / LAST_CHECKPOINT

    def save(self, epoch: int, record: dict) -> None:
        """Checkpoint after ``epoch`` (0-based); ``record`` is the epoch's log record, kept in
        the checkpoint so that a resume can restore it if the log lost it."""
        if not self.info.is_main:
            return
        ckpt.save_checkpoint(
            self.checkpoint_path(), model=self.model, optimizer=self.optimizer,
            scheduler=self.scheduler, scaler=self.scaler, epoch=epoch,
            info={"config": config_to_dict(self.config), "classnames": self.model.classnames,
                  "clip": self.clip_info, "train_stats": record},
        )

    def resume(self) -> None:
        path = self.checkpoint_path()
        tensors, meta = ckpt.read_checkpoint(path)
        changed = config_diff(TrainConfig, meta["config"], config_to_dict(self.config),
                              skip_roles=(RESUMABLE,))
        if changed:
            raise ValueError(
                f"--resume: {path} was trained with other settings "
                f"({'; '.join(map(str, changed))}); "
                "resume with the checkpoint's settings, or start a new run in another "
                "output_dir")
        self.model.load_state_dict(ckpt.model_state(tensors))
        self.start_epoch = ckpt.restore_training_state(
            tensors, meta, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler)
        # The last epoch's record (with its test accuracy when it was evaluated), should the
        # crash have come before it reached the log.
        self._checkpoint_record = {"epoch": self.start_epoch, **meta.get("train_stats", {})}
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ----------------------------------------------------------------------------- training
    def _loader(self, epoch: int) -> DeviceBatches:
        """The epoch's batches on the device (uint8 images normalised there). One DataLoader
        serves the whole run: its workers, and the images they decoded, persist."""
        self.batches.set_epoch(epoch)
        if self._train_loader is None:
            self._train_loader = train_loader(self.train_set, self.batches,
                                              self.config.num_workers,
                                              pin_memory=self.device.type == "cuda")
        # No side stream: the pinned, non-blocking copy already overlaps with the compute.
        return DeviceBatches(self._train_loader, self.device, overlap=False)

    def close(self) -> None:
        """Stop the loader's worker processes (the run is over)."""
        self._train_loader = None

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def train_epoch(self, epoch: int) -> EpochStats:
        self.model.train()
        loader = self._loader(epoch)
        total_loss = total_correct = total_seen = 0.0
        start = time.perf_counter()
        steps = len(self.sampler)

        def describe() -> dict[str, str]:
            return {"loss": f"{total_loss / max(total_seen, 1):.4f}",
                    "acc": f"{100 * total_correct / max(total_seen, 1):.1f}",
                    "img/s": f"{total_seen * self.info.world_size / elapsed():.1f}"}

        def elapsed() -> float:
            return max(time.perf_counter() - start, 1e-9)

        progress = Progress(steps, f"epoch {epoch + 1}/{self.config.epochs}",
                            progress_settings(self.config), enabled=self.info.is_main,
                            describe=describe)
        with progress:
            for step, (images, labels) in enumerate(loader):
                with self._autocast():
                    out = self.forward_model(images)
                    loss = self.model.loss(out, labels, epoch,
                                           layer_denominator=self._layer_denominator(out, labels),
                                           batch_weight=self.sampler.batch_weight(len(labels)))
                self._check_finite(loss, epoch, step)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                batch = labels.shape[0]
                # Summed over processes, this is the global batch's loss (DDP's mean of the
                # processes' losses) times its size, however the batch was split.
                step_loss = loss.item() * self.sampler.global_batch / self.info.world_size
                step_correct = (out.logits.argmax(-1) == labels).sum().item()
                total_loss += step_loss
                total_correct += step_correct
                total_seen += batch
                self.summaries.scalars({"train/loss": step_loss / max(batch, 1),
                                        "train/accuracy": 100 * step_correct / max(batch, 1)},
                                       epoch * steps + step + 1)
                progress.update()
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.scheduler.step()
        sums = all_reduce_sum(torch.tensor([total_loss, total_correct, total_seen],
                                           dtype=torch.float64, device=self.device), self.info)
        loss_sum, correct, seen = sums.tolist()
        return EpochStats(loss=loss_sum / max(seen, 1), accuracy=100 * correct / max(seen, 1),
                          images_per_s=seen / (time.perf_counter() - start), lr=lrs)

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        """Stop before a non-finite loss reaches the prompts (on every process at once).

        The checkpoint of the last finished epoch stays as it is: the last good state.
        """
        bad = (~torch.isfinite(loss.detach())).to(torch.float32)
        if all_reduce_sum(bad, self.info).item() == 0:
            return
        last = (f"the last good state is the checkpoint of epoch {epoch} "
                f"({self.checkpoint_path()})" if epoch > 0 else "no epoch finished")
        raise TrainingDiverged(
            f"training diverged: the loss is {loss.item()} at epoch {epoch + 1}, step "
            f"{step + 1}/{len(self.sampler)}; {last}. Lower --lr / --text-lr (or raise "
            "--warmup-epochs) and start again with --overwrite")

    def _layer_denominator(self, out: DPTOutput, labels: torch.Tensor) -> torch.Tensor | None:
        """The global hit count / processes, so DDP's mean of gradients is the global mean."""
        if not self.info.enabled or out.layer_logits is None or out.topk_indices is None:
            return None
        hits = layer_hits(out.topk_indices, labels, out.layer_logits.shape[1]).sum()
        total = all_reduce_sum(hits.to(torch.float32), self.info)
        return total.clamp(min=1.0) / self.info.world_size

    def _epoch_line(self, record: dict, fit_start: float, epoch: int) -> str:
        """``epoch 3/12 loss 1.2345 acc 56.25 412.3 img/s lr text 0.01 visual 0.01 | 42s
        elapsed, ETA 3m05s [test acc 61.20]``: one line per epoch, for the log file."""
        names = [group.get("name", str(i)) for i, group in
                 enumerate(self.optimizer.param_groups)]
        lrs = " ".join(f"{name} {lr:.3g}" for name, lr in zip(names, record["lr"], strict=True))
        timing = elapsed_and_eta(time.perf_counter() - fit_start, epoch + 1 - self.start_epoch,
                                 self.config.epochs - epoch - 1)
        line = (f"epoch {epoch + 1}/{self.config.epochs} loss {record['loss']:.4f} "
                f"acc {record['accuracy']:.2f} {record['images_per_s']:.1f} img/s lr {lrs} | "
                f"{timing}")
        if "test_accuracy" in record:
            line += f" | test acc {record['test_accuracy']:.2f}"
        return line

    def _epoch_summaries(self, stats: EpochStats, step: int) -> None:
        values = {"epoch/loss": stats.loss, "epoch/accuracy": stats.accuracy,
                  "epoch/images_per_s": stats.images_per_s}
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, stats.lr,
                                            strict=True)):
            values[f"lr/{group.get('name', i)}"] = lr
        self.summaries.scalars(values, step)
        self.summaries.flush()

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
        fit_start = time.perf_counter()
        for epoch in range(self.start_epoch, self.config.epochs):
            stats = self.train_epoch(epoch)
            record = {"epoch": epoch + 1, **vars(stats)}
            step = (epoch + 1) * self.steps_per_epoch()
            if evaluate_fn is not None and every > 0 and (epoch + 1) % every == 0 \
                    and epoch + 1 < self.config.epochs:
                # Before the checkpoint, which keeps the record: a crash after the checkpoint
                # write cannot lose the evaluation, a crash before it repeats the epoch.
                report = evaluate_fn()
                record["test_accuracy"] = report["accuracy"]
                self.summaries.evaluation("test", report, step)
            self.save(epoch, record)
            barrier(self.info)
            if self.info.is_main:
                log.info("%s", self._epoch_line(record, fit_start, epoch))
                append_record(self.log_path(), record)
                self._epoch_summaries(stats, step)
        barrier(self.info)
        return read_history(self.log_path(), self.config.epochs) if self.info.is_main else []
