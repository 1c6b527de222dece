"""Shared sizes for the benchmark suites: full sizes on a GPU, small ones on CPU.

On CPU the suites run single-threaded unless ``BENCH_CPU_THREADS`` says otherwise: on a shared
2-core machine, 2 intra-op threads made step times 10-40x slower and erratic whenever another
process held a core (OpenMP barriers wait on a preempted thread); 1 thread is stable.
"""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
CPU_THREADS = int(os.environ.get("BENCH_CPU_THREADS", "1"))
if not HAS_CUDA:
    torch.set_num_threads(CPU_THREADS)
