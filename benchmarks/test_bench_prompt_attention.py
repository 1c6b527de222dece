"""Prompt attention: the fused Triton kernels vs SDPA over the concatenated K/V vs naive.

Implementations, all on the same inputs (prompt K/V shared by the batch, Bp = 1):

* ``triton``: ``prompt_attention`` (the fused kernels; CUDA only);
* ``sdpa``: ``prompt_attention_torch``, SDPA over ``[k_prompt.expand(B); k]``;
* ``naive``: matmul, mask, fp32 softmax, matmul over the concatenated K/V;
* ``xformers``: ``xformers.ops.memory_efficient_attention`` and ``flash_attn``:
  ``flash_attn_func`` over the concatenated K/V, when those packages are installed (skipped
  with the reason otherwise). Their causal masks are aligned to the bottom right, so query i
  sees the P prompt keys and self keys j <= i, as ``prompt_attention`` does.

GPU: bf16; ViT-B/16 layers (B = 32 and 256 images, H=12, N=197, P=10 deep prompts, D=64) and
the text encoder's class-name suffixes over a shared prefix (B = 100 and 1000 classes, H=8,
N=60 suffix tokens, P=17 prefix tokens, D=64, causal).
CPU: fp32, the torch paths only, B=8, so that the suite runs in seconds.
Run: pytest benchmarks/test_bench_prompt_attention.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch
from bench_common import DEVICE, HAS_CUDA
from torch import Tensor

from dpt_fast.ops import prompt_attention, prompt_attention_torch

# name -> (B, H, Nq = Nk, P, D, causal)
if HAS_CUDA:
    SHAPES = {
        "vit_b32": (32, 12, 197, 10, 64, False),
        "vit_b256": (256, 12, 197, 10, 64, False),
        "text_c100": (100, 8, 60, 17, 64, True),
        "text_c1000": (1000, 8, 60, 17, 64, True),
    }
    DTYPE = torch.bfloat16
    ROUNDS, ITERATIONS = 20, 5
else:
    SHAPES = {"vit_b8": (8, 12, 197, 10, 64, False), "text_b8": (8, 8, 60, 17, 64, True)}
    DTYPE = torch.float32
    ROUNDS, ITERATIONS = 3, 1


def naive_attention(
    q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor, causal: bool = False
) -> Tensor:
    """matmul · mask · softmax (fp32) · matmul over the concatenated K/V: (B, H, Nq, D)."""
    batch, n_q, n_k, n_p = q.shape[0], q.shape[2], k.shape[2], k_prompt.shape[2]
    keys = torch.cat([k_prompt.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([v_prompt.expand(batch, -1, -1, -1), v], dim=2)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        rows = torch.arange(n_q, device=q.device)[:, None]
        cols = torch.arange(n_p + n_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols - n_p > rows, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), values)


def _concat_bnhd(q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """q and the concatenated keys/values in the (B, N, H, D) layout of xformers/flash-attn."""
    batch = q.shape[0]
    keys = torch.cat([k_prompt.expand(batch, -1, -1, -1), k], dim=2)
    values = torch.cat([v_prompt.expand(batch, -1, -1, -1), v], dim=2)
    return q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
                       causal: bool = False) -> Tensor:
    import xformers.ops as xops

    bias = xops.fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    out = xops.memory_efficient_attention(*_concat_bnhd(q, k, v, k_prompt, v_prompt),
                                          attn_bias=bias)
    return out.transpose(1, 2)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, k_prompt: Tensor, v_prompt: Tensor,
                    causal: bool = False) -> Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(*_concat_bnhd(q, k, v, k_prompt, v_prompt), causal=causal
                           ).transpose(1, 2)


IMPLS = {"triton": prompt_attention, "sdpa": prompt_attention_torch, "naive": naive_attention,
         "xformers": xformers_attention, "flash_attn": flash_attention}
# Third-party kernels: benchmarked only where installed, and only on CUDA.
OPTIONAL = {"xformers": "xformers", "flash_attn": "flash_attn"}


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def forward_flops(batch: int, heads: int, n: int, n_p: int, dim: int) -> float:
    """Matmul flops of the forward: q kᵀ and p v, 2 flops per multiply-add each,
    4·B·H·Nq·(Nk + P)·D, counted dense (the blocks a causal mask skips still count)."""
    return 4.0 * batch * heads * n * (n + n_p) * dim


# The backward recomputes q kᵀ and runs dv = pᵀ do, dp = do vᵀ, dq = ds k, dk = dsᵀ q: 5 matmuls
# to the forward's 2, i.e. 2.5x the forward flops (the FlashAttention convention), so forward +
# backward counts 1 + 2.5 = 3.5x the forward flops.
FWD_BWD_FLOP_FACTOR = 3.5


def _inputs(shape: tuple, requires_grad: bool) -> list[Tensor]:
    batch, heads, n, n_p, dim, _ = shape
    sizes = [(batch, heads, n, dim)] * 3 + [(1, heads, n_p, dim)] * 2
    return [torch.randn(s, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)
            for s in sizes]


def _sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_prompt_attention(benchmark, shape_name, impl, mode, monkeypatch):
    if impl == "triton" and not HAS_CUDA:
        pytest.skip("the Triton kernels need CUDA (on CPU they only run in the interpreter)")
    if impl in OPTIONAL:
        if not _installed(OPTIONAL[impl]):
            pytest.skip(f"{OPTIONAL[impl]} is not installed")
        if not HAS_CUDA:
            pytest.skip(f"{OPTIONAL[impl]} kernels need CUDA")
    # The environment must not redirect prompt_attention to another backend mid-benchmark.
    monkeypatch.delenv("DPT_FAST_BACKEND", raising=False)
    shape = SHAPES[shape_name]
    causal = shape[5]
    fn = IMPLS[impl]
    inputs = _inputs(shape, requires_grad=mode == "fwd_bwd")
    grad_out = torch.randn(shape[0], shape[1], shape[2], shape[4], device=DEVICE, dtype=DTYPE)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(*inputs, causal=causal)
        else:
            for x in inputs:
                x.grad = None
            fn(*inputs, causal=causal).backward(grad_out)
        _sync()

    batch, heads, n, n_p, dim, _ = shape
    benchmark.extra_info.update(
        impl=impl, mode=mode, shape=dict(B=batch, H=heads, N=n, P=n_p, D=dim, causal=causal),
        dtype=str(DTYPE).removeprefix("torch."), device=DEVICE)
    # One warm-up round: autotuning and compilation happen there, not in the timings.
    benchmark.pedantic(step, warmup_rounds=1, rounds=ROUNDS, iterations=ITERATIONS)
    if benchmark.stats is not None:
        flops = forward_flops(batch, heads, n, n_p, dim)
        if mode == "fwd_bwd":
            flops *= FWD_BWD_FLOP_FACTOR
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.mean / 1e12
