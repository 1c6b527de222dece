"""Fused ops of dpt_fast, backed by the compiled extension ``dpt_fast._C`` when it is available.

Each op falls back to an equivalent PyTorch composition when the extension is missing or has no
kernel for the tensors' device, so models run (more slowly) everywhere.
"""

from dpt_fast.ops.class_aware_attention import (
    class_aware_attention,
    class_aware_attention_ref,
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
