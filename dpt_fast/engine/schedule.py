"""The authors' learning-rate schedule (Dassl's cosine with constant warm-up), per epoch.

Dassl wraps ``CosineAnnealingLR(T_max=max_epochs)`` in a constant warm-up: epochs
``0..warmup-1`` run at ``warmup_lr``; from epoch ``warmup`` on, the cosine starts counting at 0,
so epoch ``e`` runs at ``base · (1 + cos(π (e - warmup) / max_epochs)) / 2``. (The cosine is not
shortened by the warm-up: it never reaches 0 when warmup > 0, as in the authors' runs.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def dassl_lr(epoch: int, base_lr: float, max_epochs: int, warmup_epochs: int,
             warmup_lr: float) -> float:
    """Learning rate used during ``epoch`` (0-based)."""
    if epoch < warmup_epochs:
        return warmup_lr
    step = epoch - warmup_epochs
    return base_lr * (1 + math.cos(math.pi * step / max_epochs)) / 2


def build_scheduler(optimizer: torch.optim.Optimizer, max_epochs: int,
                    warmups: list[tuple[int, float]]) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per epoch; ``warmups[i]`` = (epochs, lr) of param group i."""
    lambdas: list[Callable[..., float]] = []
    for group, (warmup_epochs, warmup_lr) in zip(optimizer.param_groups, warmups, strict=True):
        base = group["lr"]
        lambdas.append(
            lambda epoch, base=base, w=warmup_epochs, wl=warmup_lr:
            dassl_lr(epoch, base, max_epochs, w, wl) / base
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
