"""The fused ops of dpt_fast, one package per op.

* ``prompt_attention/``: attention over prompt and self keys (Triton kernels in
  ``dpt_fast.kernels``, PyTorch elsewhere);
* ``class_aware_attention/``: the CAVPT attention (C++/CUDA kernels of ``dpt_fast._C``);
* ``cpu_block_cache``: controls of the extension's CPU block cache;
* ``_extension``: loads ``dpt_fast._C``; ``_common``: conventions both ops share.

Each op falls back to PyTorch when its kernels are missing (no triton, no compiled extension)
or have nothing for the tensors' device, so models run (more slowly) everywhere.
"""

from dpt_fast.ops.class_aware_attention import class_aware_attention, class_aware_attention_ref
from dpt_fast.ops.cpu_block_cache import (
    cpu_block_cache_bytes,
    cpu_block_cache_limit,
    empty_cpu_block_cache,
    set_cpu_block_cache_limit,
)
from dpt_fast.ops.prompt_attention import (
    prompt_attention,
    prompt_attention_ref,
    prompt_attention_torch,
)

__all__ = [
    "class_aware_attention",
    "class_aware_attention_ref",
    "cpu_block_cache_bytes",
    "cpu_block_cache_limit",
    "empty_cpu_block_cache",
    "prompt_attention",
    "prompt_attention_ref",
    "prompt_attention_torch",
    "set_cpu_block_cache_limit",
]
