"""Shared sizes for the benchmark suites: full sizes on a GPU, small ones on CPU."""

from __future__ import annotations

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
