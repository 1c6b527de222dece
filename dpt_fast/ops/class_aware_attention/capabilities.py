"""What the class-aware attention kernels of ``dpt_fast._C`` take: one table for Python.

The C++/CUDA kernels read the same limits from ``csrc/class_aware_attention.h``, and the
extension reports them (``dpt_fast._C._class_aware_attention_limits()``);
``extension_disagreements`` compares the two and a test requires that they agree, so no limit
lives in two places unchecked. The op's dispatch and the tests read this table.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from types import ModuleType

import torch


@dataclass(frozen=True)
class ClassAwareAttentionCapabilities:
    """Inputs the fused kernels take, and which CUDA kernels run for which shapes.

    Attributes:
        dtypes: input dtypes of the CPU and CUDA kernels (q, k and v share one).
        min_keys: M, the number of keys, must be at least this (a softmax over no keys is
            undefined).
        cuda_fused_max_rows: the CUDA kernels' row tile. The forward pass tiles any K with it;
            the fused backward kernel takes K up to it, larger K runs the general backward
            (cuBLAS products).
        cuda_fused_vector: the CUDA fused kernels load dv in vectors of this many elements, so
            they need dv % cuda_fused_vector == 0 and v, out, grad_out, grad_v starting at a
            multiple of it; other inputs take the general path.
        cuda_fused_dtypes: dtypes of the CUDA fused kernels (float32 accumulation); float64
            takes the general path.
        cuda_backward_key_tile: keys per block of the CUDA fused backward kernel.
    """

    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16,
                                       torch.float16)
    min_keys: int = 1
    cuda_fused_max_rows: int = 16
    cuda_fused_vector: int = 4
    cuda_fused_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    cuda_backward_key_tile: int = 32

    def dtype_names(self) -> str:
        """"float32, float64, bfloat16 or float16": the dtypes for error messages."""
        names = [str(d).removeprefix("torch.") for d in self.dtypes]
        return ", ".join(names[:-1]) + " or " + names[-1]


CLASS_AWARE_ATTENTION = ClassAwareAttentionCapabilities()


def extension_disagreements(
    module: ModuleType, table: ClassAwareAttentionCapabilities = CLASS_AWARE_ATTENTION
) -> list[str]:
    """The fields on which the loaded extension's limits differ from the table (empty: none).

    The extension reports dtypes by name ("float32") and the other limits as integers.
    """
    reported = module._class_aware_attention_limits()
    problems = []
    for field in fields(table):
        ours = getattr(table, field.name)
        theirs = reported.get(field.name)
        if isinstance(ours, tuple):
            theirs = tuple(getattr(torch, name) for name in theirs or ())
        if theirs != ours:
            problems.append(f"{field.name}: Python {ours!r}, C++ {theirs!r}")
    names = {field.name for field in fields(table)}
    problems += [f"{name}: only in C++" for name in reported.keys() - names]
    return problems
