"""Training checkpoints: one safetensors file, written atomically, holding everything to resume.

Tensors (safetensors): the model's ``state_dict`` (prompts + metadata, never the CLIP) under
``model.``, the optimizer's per-parameter state (momentum buffers) under ``optim.<index>.``,
and the torch/CUDA/numpy RNG states under ``rng.``. Everything else (epoch, optimizer
hyper-parameters, scheduler and grad-scaler state, Python's RNG state, the run config, metrics)
is JSON in the file's metadata. A write goes to a temporary file, is fsynced and renamed over
``path``, so neither a crash nor a power loss leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch.optim.lr_scheduler import LRScheduler

from dpt_fast.files import atomic_write_bytes, json_dumps

METADATA_KEY = "dpt_fast"
FORMAT_VERSION = 1


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    # the legacy global numpy RNG is the state user transforms draw from: save it as it is
    # legacy=True (the default): the global RandomState is an MT19937, whose state is this tuple
    np_state = cast(tuple[str, np.ndarray, int, int, float],
                    np.random.get_state())  # noqa: NPY002
    kind, keys, pos, has_gauss, cached = np_state
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss]}
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    # Only this process's device: touching the others would open a CUDA context on each of
    # them in every DDP process.
    if torch.cuda.is_available():
        state = tensors.get(f"rng.cuda.{torch.cuda.current_device()}")
        if state is not None:
            torch.cuda.set_rng_state(state)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss,  # noqa: NPY002
                         cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                    scaler: torch.amp.GradScaler | None, epoch: int,
                    info: dict) -> None:
    """Write the state after ``epoch`` (0-based, completed) to ``path`` atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone()
               for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    scalars: dict[str, dict] = {}
    for index, state in optim_state["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    rng, rng_meta = _rng_tensors()
    tensors.update(rng)
    meta = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        "optimizer_param_groups": optim_state["param_groups"],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_meta,
        **info,
    }
    # Temporary file, fsync, rename: neither a crash nor a power loss leaves a torn checkpoint.
    atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: json_dumps(meta)}))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint; a clear error for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if METADATA_KEY not in metadata:
                raise ValueError(f"{path} is a safetensors file but not a dpt_fast checkpoint")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}): a corrupt or "
                         "incomplete checkpoint") from err
    return tensors, json.loads(metadata[METADATA_KEY])


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state_dict inside checkpoint tensors."""
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def restore_training_state(tensors: dict[str, torch.Tensor], meta: dict, *,
                           optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                           scaler: torch.amp.GradScaler | None) -> int:
    """Load optimizer, scheduler, scaler and RNG states; returns the next epoch to run."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer_scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(meta["scaler"])
    _restore_rng(tensors, meta["rng"])
    return int(meta["epoch"]) + 1
