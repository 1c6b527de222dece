"""What prompt attention accepts: the shape contract of every backend and the Triton kernels' table.

The op's dispatch, the kernel launchers' own input checks and the tests all read this module, so
a limit changes in one place. Importing it never imports triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TritonKernelCapabilities:
    """What the fused Triton kernels (``dpt_fast.kernels.prompt_attention``) take.

    Attributes:
        dtypes: input dtypes the compiled (GPU) kernels take; all five inputs share one.
        interpreter_dtypes: the subset Triton's CPU interpreter computes correctly (it runs the
            kernels in NumPy, which has no bfloat16).
        min_head_dim, max_head_dim: head dims D the kernels take. One (BLOCK, D) tile per
            operand lives in registers or shared memory, so D is bounded: above 128 even the
            smallest tile spills registers (fp32 most), so those head dims run on the PyTorch
            path. D below 16 or not a power of two runs in a padded, masked head block. Every
            launch configuration the autotuner may pick within these bounds compiles without
            spills for sm_90 (checked by ``.ci/triton_aot_check.py``).
        min_block: the smallest block size along queries or keys (``tl.dot`` needs 16 rows);
            block sizes are powers of two.
    """

    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    interpreter_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16)
    min_head_dim: int = 1
    max_head_dim: int = 128
    min_block: int = 16

    def unsupported(self, dtype: torch.dtype, head_dim: int, interpreted: bool) -> str | None:
        """Why the kernels cannot take inputs of this dtype and head dim, or None if they can.

        interpreted: whether the kernels would run in Triton's interpreter (CPU tensors).
        """
        dtypes = self.interpreter_dtypes if interpreted else self.dtypes
        if dtype not in dtypes:
            where = "in Triton's interpreter " if interpreted else ""
            names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            return f"the Triton kernels {where}take {names}, not {dtype}"
        if not self.min_head_dim <= head_dim <= self.max_head_dim:
            return (f"the Triton kernels take head dims {self.min_head_dim}..{self.max_head_dim}, "
                    f"not {head_dim}")
        return None


TRITON_KERNELS = TritonKernelCapabilities()


def check_shapes(q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor) -> None:
    """The op's shape contract, shared by every backend; a ValueError names the mismatch.

    q (B, H, Nq, D); k, v (B, H, Nk, D); k_prompt, v_prompt (Bp, H, P, D) with Bp ∈ {1, B};
    at least one key (Nk + P > 0). The kernels index by these shapes, so a mismatch would read
    out of bounds.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, Nq, D), got shape {tuple(q.shape)}")
    batch, heads, _, dim = q.shape
    if (k.dim() != 4 or k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads
            or k.shape[3] != dim):
        raise ValueError(f"k and v must both be ({batch}, {heads}, Nk, {dim}), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if (k_prompt.dim() != 4 or k_prompt.shape != v_prompt.shape
            or k_prompt.shape[0] not in (1, batch) or k_prompt.shape[1] != heads
            or k_prompt.shape[3] != dim):
        raise ValueError(f"k_prompt and v_prompt must both be (1 or {batch}, {heads}, P, {dim}), "
                         f"got {tuple(k_prompt.shape)} and {tuple(v_prompt.shape)}")
    if k.shape[2] + k_prompt.shape[2] == 0:
        raise ValueError("prompt_attention needs at least one key: Nk + P > 0")
