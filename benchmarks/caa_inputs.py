"""The class-aware attention benchmark case, shared by the pytest-benchmark suite and the
interleaved ratio script: DPT's CAVPT shapes (K=10 class queries over M=207 tokens, dk=32,
dv=768) and their random inputs."""

from __future__ import annotations

import torch

ROWS, KEYS, DK, DV = 10, 207, 32, 768


def caa_inputs(batch: int, device: str,
               dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Leaves (q (B, K, dk), k (B, M, dk), v (B, M, dv)) requiring grad, and grad_out (B, K, dv),
    drawn in that order from a generator seeded with 0."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    leaves = (rand(batch, ROWS, DK), rand(batch, KEYS, DK), rand(batch, KEYS, DV))
    return tuple(t.requires_grad_() for t in leaves), rand(batch, ROWS, DV)
