"""Tests of the prompt attention Triton kernels (``dpt_fast.kernels.prompt_attention``).

Every test runs on CPU tensors through Triton's interpreter (machines without a GPU; see
``prompt_attention_checks``) and on CUDA tensors compiled (the ``cuda`` parameters skip without a
GPU). Per device, the cases differ only in size and dtype: the interpreter is slow and has no
bfloat16, and every new CUDA shape autotunes, so the full-size ViT and text shapes run on CUDA in
bf16 only.
"""

from __future__ import annotations

import pytest
import torch
from prompt_attention_checks import (
    DEVICES,
    GRID,
    GRID_IDS,
    KERNEL_DTYPES,
    PROMPT_BATCH,
    assert_deterministic,
    check_against_ref,
    dtype_id,
    grad_out_for,
    kernels,
    make_case,
    require_triton,
    run,
)

from dpt_fast.ops import prompt_attention
from dpt_fast.ops.prompt_attention import TRITON_KERNELS

# Full-size shapes: ViT-B/16 at 224 with 10 deep prompts (B=4, H=12, N=197, P=10, D=64), and
# class-name suffixes over a shared causal prefix (B=100 classes, H=8, N=60, P=17, D=64).
VIT_B16 = (4, 12, 197, 197, 10, 64, False)
TEXT = (100, 8, 60, 60, 17, 64, True)


def _by_device(values: dict[str, list]) -> list:
    """pytest params (device, value) for every value of each device, with its device's marks."""
    params = []
    for device_param in DEVICES:
        device = device_param.values[0]
        for value in values[device]:
            name = dtype_id(value) if isinstance(value, torch.dtype) else str(value)
            params.append(pytest.param(device, value, marks=device_param.marks,
                                       id=f"{device}-{name}"))
    return params


# Strided views read in place: small shapes in the interpreter, the full-size ones on CUDA.
STRIDED = {
    "cpu": [(shape, dtype, pb)
            for shape in [(2, 2, 11, 11, 5, 32, True), (2, 3, 1, 13, 4, 64, False)]
            for dtype in KERNEL_DTYPES["cpu"] for pb in PROMPT_BATCH],
    "cuda": [(VIT_B16, torch.bfloat16, "shared"), (TEXT, torch.bfloat16, "shared")],
}
# Block shapes the autotuner would not pick (BLOCK_M != BLOCK_N: causal block skipping, several
# blocks per loop, tails), each with every shape of its device.
OTHER_BLOCKS = {"cpu": [(16, 32), (32, 16), (32, 32)], "cuda": [(64, 32), (32, 64)]}
OTHER_BLOCK_CASES = {
    "cpu": ([(2, 2, 45, 50, 7, 32, True), (1, 2, 37, 37, 33, 64, False)], torch.float32),
    "cuda": ([(2, 4, 100, 130, 17, 64, True)], torch.bfloat16),
}
DETERMINISM = {
    "cpu": [((3, 2, 20, 20, 17, 32, True), torch.float32)],
    "cuda": [(VIT_B16, torch.bfloat16), (TEXT, torch.bfloat16)],
}


@pytest.mark.usefixtures("triton_backend", "poisoned_buffers", "exact_fp32_matmul")
@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
@pytest.mark.parametrize("shape", GRID, ids=GRID_IDS)
@pytest.mark.parametrize(("device", "dtype"), _by_device(KERNEL_DTYPES))
def test_kernels_match_reference(device, dtype, shape, prompt_batch, kernel_calls):
    require_triton(device)
    case = make_case(shape, PROMPT_BATCH[prompt_batch](shape[0]), device=device)
    check_against_ref(case, dtype)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.usefixtures("triton_backend", "poisoned_buffers", "exact_fp32_matmul")
@pytest.mark.parametrize(("device", "setting"), _by_device(STRIDED))
def test_kernels_read_strided_views(device, setting):
    """q/k/v sliced from a fused qkv projection (and CLS-style Nq < Nk) are read in place."""
    require_triton(device)
    shape, dtype, prompt_batch = setting
    case = make_case(shape, PROMPT_BATCH[prompt_batch](shape[0]), fused=True, device=device)
    assert not case.views(case.leaves)[0].is_contiguous()
    check_against_ref(case, dtype)


@pytest.mark.usefixtures("triton_backend", "poisoned_buffers", "exact_fp32_matmul")
@pytest.mark.parametrize(("device", "blocks"), _by_device(OTHER_BLOCKS))
def test_kernels_other_block_shapes(device, blocks):
    require_triton(device)
    launchers = kernels()
    shapes, dtype = OTHER_BLOCK_CASES[device]
    with launchers.fixed_blocks(*blocks):
        assert launchers.SETTINGS["fixed_blocks"] == blocks
        for shape in shapes:
            check_against_ref(make_case(shape, 1, device=device), dtype)


@pytest.mark.usefixtures("triton_backend", "poisoned_buffers", "exact_fp32_matmul")
@pytest.mark.parametrize("dim", [8, 40, TRITON_KERNELS.max_head_dim])
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_other_head_dims(device, dim):
    """Head dims below the smallest block, not a power of two, or the table's largest run with
    a masked, padded head block (fixed blocks: one compilation per dim on CUDA)."""
    require_triton(device)
    block = TRITON_KERNELS.min_block
    with kernels().fixed_blocks(block, block):
        check_against_ref(make_case((2, 2, 9, 11, 3, dim, True), 1, device=device), torch.float32)


@pytest.mark.usefixtures("triton_backend")
@pytest.mark.parametrize(("device", "setting"), _by_device(DETERMINISM))
def test_kernels_deterministic(device, setting):
    require_triton(device)
    shape, dtype = setting
    assert_deterministic(make_case(shape, 1, device=device).to(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_launchers_direct(device):
    """The launchers' own contract: contiguous outputs, fp32 lse, prompt gradient summed."""
    require_triton(device)
    launchers = kernels()
    q, k, v = (torch.randn(2, 2, 9, 32, device=device) for _ in range(3))
    kp, vp = torch.randn(1, 2, 3, 32, device=device), torch.randn(1, 2, 3, 32, device=device)
    out, lse = launchers.prompt_attention_fwd(q, k, v, kp, vp, False, 0.25)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (2, 2, 9)
    keys = torch.cat([kp.expand(2, -1, -1, -1), k], dim=2)
    expected = torch.logsumexp(q.double() @ keys.double().transpose(-1, -2) * 0.25, -1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)
    grads = launchers.prompt_attention_bwd(torch.randn_like(out), q, k, v, kp, vp, out, lse,
                                           False, 0.25)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, kp.shape, vp.shape]


@pytest.mark.parametrize("device", DEVICES)
def test_launchers_reject_what_the_table_excludes(device):
    require_triton(device)
    launchers = kernels()
    interpreted = device == "cpu"
    excluded = [d for d in (torch.float64, torch.bfloat16)
                if d not in (TRITON_KERNELS.interpreter_dtypes if interpreted
                             else TRITON_KERNELS.dtypes)]
    for dtype in excluded:
        q, k, v, kp, vp = make_case(GRID[0], 1, device=device).to(dtype).leaves
        with pytest.raises(ValueError, match=f"not {dtype}"):
            launchers.prompt_attention_fwd(q, k, v, kp, vp, False, 0.25)
    dim = TRITON_KERNELS.max_head_dim + 1
    q, k, v, kp, vp = make_case((1, 1, 2, 2, 1, dim, False), 1, device=device).leaves
    with pytest.raises(ValueError, match=f"not {dim}"):
        launchers.prompt_attention_fwd(q, k, v, kp, vp, False, 0.25)
    with pytest.raises(ValueError, match="k_prompt and v_prompt"):
        launchers.prompt_attention_fwd(q, k, v, kp.expand(3, -1, -1, -1), vp, False, 0.25)


def _kept_specs(specs: list, dtype: torch.dtype, n_q: int, n_k: int, n_p: int, dim: int,
                precision: str = "ieee") -> list:
    """The GPU candidates the autotuner's early pruning keeps for this problem (fp32 dots in
    this precision: "ieee" or "tf32")."""
    from dpt_fast.kernels import prompt_attention_autotune as autotune

    args = autotune.autotune_args(specs, interpreted=False)
    prune = args["prune_configs_by"]["early_config_prune"]
    kept = prune(args["configs"], {"Q": torch.empty(0, dtype=dtype)}, N_Q=n_q, N_K=n_k, N_P=n_p,
                 HEAD_DIM=dim, CAUSAL=False,
                 DOT_PRECISION=precision if dtype == torch.float32 else "tf32")
    by_blocks = {(s.block_m, s.block_n, s.warps, s.stages): s for s in specs}
    return [by_blocks[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)]
            for c in kept]


@pytest.mark.parametrize("specs", ["FORWARD_SPECS", "DKDV_SPECS", "DQ_SPECS"])
def test_autotune_pruning(specs):
    """Head dim, dtype, dot precision and small N narrow the GPU candidates; at least one always
    remains for every dtype, precision and head dim of the capability table."""
    kernels()  # skips without triton
    from dpt_fast.kernels import prompt_attention_autotune as autotune

    specs = getattr(autotune, specs)
    vit = _kept_specs(specs, torch.bfloat16, 197, 197, 10, 64)
    assert vit == [s for s in specs if s.max_dim >= 64 and autotune.HALF in s.takes]
    assert all(s.max_dim >= 128 for s in _kept_specs(specs, torch.float16, 197, 197, 10, 128))
    for precision in ("ieee", "tf32"):
        for dim in (64, TRITON_KERNELS.max_head_dim):
            kept = _kept_specs(specs, torch.float32, 197, 197, 10, dim, precision)
            assert kept and all(precision in s.takes and s.min_dim <= dim <= s.max_dim
                                for s in kept)
        assert len(_kept_specs(specs, torch.float32, 9, 9, 1, TRITON_KERNELS.max_head_dim,
                               precision)) == 1
    cls_only = _kept_specs(specs, torch.bfloat16, 1, 197, 10, 64)
    assert cls_only and all(s.block_m == TRITON_KERNELS.min_block for s in cls_only)
    tiny = _kept_specs(specs, torch.bfloat16, 7, 7, 3, 32)
    assert len(tiny) == 1 and tiny[0].block_m == TRITON_KERNELS.min_block


@pytest.mark.parametrize("kernel", ["forward_kernel", "backward_dkdv_kernel",
                                    "backward_dq_kernel"])
def test_autotune_key_holds_what_changes_the_kernel(kernel):
    """The autotuner reuses a tuned config for calls with the same key (and input dtypes): every
    constexpr that changes the compiled kernel, besides the tuned blocks, must be in it; a config
    tuned with TF32 dots (which fit other candidates) is no pick for IEEE ones."""
    kernels()  # skips without triton
    from dpt_fast.kernels import prompt_attention_backward, prompt_attention_forward

    tuner = getattr(prompt_attention_forward if kernel == "forward_kernel"
                    else prompt_attention_backward, kernel)
    assert {"N_Q", "N_K", "N_P", "HEAD_DIM", "CAUSAL", "DOT_PRECISION"} <= set(tuner.keys)


def test_fixed_blocks_validates_sizes():
    launchers = kernels()
    for bad in [(TRITON_KERNELS.min_block // 2, 32), (48, 32)]:
        with pytest.raises(ValueError, match="powers of two"):
            with launchers.fixed_blocks(*bad):
                pass


@pytest.mark.parametrize("device", DEVICES)
def test_default_backend(device, monkeypatch, kernel_calls):
    """CPU tensors run the PyTorch path by default, CUDA tensors the kernels."""
    monkeypatch.delenv("DPT_FAST_BACKEND", raising=False)
    case = make_case(GRID[0], 1, device=device)
    run(prompt_attention, case, grad_out_for(case))
    expected = 1 if device == "cuda" else 0
    assert kernel_calls == {"fwd": expected, "bwd": expected}


# --- CUDA only: full-size shapes ----------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend", "poisoned_buffers")
@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
def test_cuda_vit_b16_shape(prompt_batch):
    """ViT-B/16 with 10 deep prompts, and its last layer, where only the CLS query is computed."""
    require_triton("cuda")
    for n_q in (197, 1):
        shape = (*VIT_B16[:2], n_q, *VIT_B16[3:])
        case = make_case(shape, PROMPT_BATCH[prompt_batch](4), device="cuda")
        check_against_ref(case, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.usefixtures("triton_backend", "poisoned_buffers")
def test_cuda_text_shape():
    require_triton("cuda")
    check_against_ref(make_case(TEXT, 1, device="cuda"), torch.bfloat16)
