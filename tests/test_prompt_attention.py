"""Tests of ``dpt_fast.ops.prompt_attention`` and its Triton kernels.

CPU: the kernels run through Triton's interpreter. In triton 3.6 / 3.8 the interpreter is chosen
when ``@triton.jit`` runs (module import), not at launch, and Triton's own library functions are
jitted when ``triton`` is imported; so setting ``TRITON_INTERPRET=1`` in a test is too late for an
already-imported kernel module. ``dpt_fast.kernels.prompt_attention`` therefore runs CPU tensors
through a private copy of itself loaded with ``TRITON_INTERPRET=1``, whatever the import order,
and the ``interpreted_triton`` fixture only sets the two switches the op reads at call time
(``DPT_FAST_BACKEND=triton`` and ``TRITON_INTERPRET=1``).

Oracle: ``prompt_attention_ref`` in float64 on the same (rounded) inputs. fp32 errors are bounded
relative to the reference's magnitude (shared/DESIGN.md §5); fp16 / bf16 errors relative to the
error of PyTorch's own SDPA path in the same precision (×2 outputs, ×3 gradients), with a floor
of a fraction of an ulp of the reference's magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from dpt_fast.kernels import prompt_attention as kernels
from torch import Tensor
from triton_interpreter import interpreter_problem

from dpt_fast.ops import prompt_attention, prompt_attention_ref, prompt_attention_torch

# (B, H, Nq, Nk, P, D, causal): tails everywhere (N, P not multiples of the blocks), P = 0,
# CLS-only queries (Nq = 1), causal with Nq < Nk, every head dim.
GRID = [
    (2, 2, 7, 7, 3, 32, False),
    (1, 3, 1, 13, 10, 64, False),
    (2, 1, 17, 17, 0, 32, False),
    (3, 2, 20, 20, 17, 32, True),
    (2, 2, 9, 9, 1, 128, False),
    (2, 2, 5, 12, 4, 32, True),
]
GRID_IDS = ["B{}H{}q{}k{}p{}d{}{}".format(*s[:6], "c" if s[6] else "") for s in GRID]
PROMPT_BATCH = {"shared": lambda b: 1, "per_batch": lambda b: b}

# Error bounds (max abs error): fractions of max(1, max|reference|) in fp32; in low precision,
# multiples of the SDPA path's own error plus a floor in ulps of max|reference| (for when SDPA
# happens to be exact).
FP32_REL_TOL = {"out": 1e-5, "grad": 1e-4}
LOW_PRECISION_FACTOR = {"out": 2.0, "grad": 3.0}
LOW_PRECISION_FLOOR_ULPS = 0.5
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

AttentionFn = Callable[..., Tensor]


# --- inputs -------------------------------------------------------------------------------------


@dataclass
class Case:
    """Leaf tensors (what gradients are taken of) and how to view them as (q, k, v, kp, vp)."""

    leaves: list[Tensor]
    views: Callable[[Sequence[Tensor]], tuple[Tensor, ...]]
    causal: bool
    out_shape: tuple[int, ...]

    def to(self, dtype: torch.dtype) -> Case:
        return Case([x.to(dtype) for x in self.leaves], self.views, self.causal, self.out_shape)


def _randn(*shape: int, device: str) -> Tensor:
    return torch.randn(*shape, device=device)


def make_case(
    shape: tuple, prompt_batch: int | None = None, *, fused: bool = False, device: str = "cpu"
) -> Case:
    """Random non-zero inputs for shape (B, H, Nq, Nk, P, D, causal).

    fused=True slices q, k, v out of one (B, N, 3, H, D) projection and the prompts out of one
    (Bp, P, 2, H, D) tensor, as a fused qkv linear layer would: strided, non-contiguous views.
    """
    b, h, n_q, n_k, p, d, causal = shape
    bp = b if prompt_batch is None else prompt_batch
    if not fused:
        leaves = [_randn(b, h, n_q, d, device=device), _randn(b, h, n_k, d, device=device),
                  _randn(b, h, n_k, d, device=device), _randn(bp, h, p, d, device=device),
                  _randn(bp, h, p, d, device=device)]
        return Case(leaves, tuple, causal, (b, h, n_q, d))
    assert n_q <= n_k

    def views(leaves: Sequence[Tensor]) -> tuple[Tensor, ...]:
        qkv, kvp = leaves
        return (qkv[:, :n_q, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2),
                qkv[:, :, 2].transpose(1, 2), kvp[:, :, 0].transpose(1, 2),
                kvp[:, :, 1].transpose(1, 2))

    leaves = [_randn(b, n_k, 3, h, d, device=device), _randn(bp, p, 2, h, d, device=device)]
    return Case(leaves, views, causal, (b, h, n_q, d))


def run(attn: AttentionFn, case: Case, grad_out: Tensor) -> tuple[Tensor, list[Tensor]]:
    """attn's output and the gradients of the case's leaves for the given output gradient."""
    leaves = [x.detach().clone().requires_grad_() for x in case.leaves]
    out = attn(*case.views(leaves), causal=case.causal)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad for x in leaves]


def grad_out_for(case: Case) -> Tensor:
    return torch.randn(case.out_shape, device=case.leaves[0].device)


# --- error checks -------------------------------------------------------------------------------


def _max_err(x: Tensor, ref: Tensor) -> float:
    return (x.double() - ref).abs().max().item() if ref.numel() else 0.0


def _scale(ref: Tensor) -> float:
    return ref.abs().max().item() if ref.numel() else 0.0


def assert_all_written(out: Tensor, grads: list[Tensor]) -> None:
    """No NaN/inf: with NaN-poisoned buffers this catches elements no program wrote."""
    for name, t in [("out", out)] + [(f"grad {i}", g) for i, g in enumerate(grads)]:
        assert torch.isfinite(t).all(), f"{name} has non-finite elements"


def check_against_ref(case: Case, dtype: torch.dtype) -> None:
    """prompt_attention (whatever backend is selected) vs the float64 reference."""
    low = case.to(dtype)
    grad_out = grad_out_for(case).to(dtype)
    ref_out, ref_grads = run(prompt_attention_ref, low.to(torch.float64), grad_out.double())
    out, grads = run(prompt_attention, low, grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert [g.shape for g in grads] == [g.shape for g in ref_grads]
    assert_all_written(out, grads)
    pairs = [("out", "out", out, ref_out)] + [
        ("grad", f"grad {i}", g, r) for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True))]
    if dtype == torch.float32:
        for kind, name, got, ref in pairs:
            bound = FP32_REL_TOL[kind] * max(_scale(ref), 1.0)
            assert _max_err(got, ref) <= bound, f"{name}: {_max_err(got, ref):.3g} > {bound:.3g}"
        return
    sdpa_out, sdpa_grads = run(prompt_attention_torch, low, grad_out)
    baseline = [sdpa_out, *sdpa_grads]
    for (kind, name, got, ref), sdpa in zip(pairs, baseline, strict=True):
        floor = LOW_PRECISION_FLOOR_ULPS * ULP[dtype] * _scale(ref)
        bound = LOW_PRECISION_FACTOR[kind] * _max_err(sdpa, ref) + floor
        assert _max_err(got, ref) <= bound, (
            f"{name}: {_max_err(got, ref):.3g} > {bound:.3g} (SDPA {_max_err(sdpa, ref):.3g})")


def assert_deterministic(case: Case) -> None:
    grad_out = grad_out_for(case)
    out_a, grads_a = run(prompt_attention, case, grad_out)
    out_b, grads_b = run(prompt_attention, case, grad_out)
    assert torch.equal(out_a, out_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def interpreted_triton(monkeypatch):
    """prompt_attention runs the Triton kernels on CPU tensors through the interpreter."""
    if (problem := interpreter_problem()) is not None:
        pytest.skip(problem)
    monkeypatch.setenv("DPT_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_buffers(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so unwritten elements show."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", nan_empty)
    if not kernels._INTERPRETED and interpreter_problem() is None:
        # CPU tensors run through the interpreted copy of the kernel module.
        monkeypatch.setattr(kernels._interpreted_copy(), "_empty", nan_empty)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the launcher calls made through the custom ops."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = kernels.prompt_attention_fwd, kernels.prompt_attention_bwd

    def counting_fwd(*args):
        calls["fwd"] += 1
        return fwd(*args)

    def counting_bwd(*args):
        calls["bwd"] += 1
        return bwd(*args)

    monkeypatch.setattr(kernels, "prompt_attention_fwd", counting_fwd)
    monkeypatch.setattr(kernels, "prompt_attention_bwd", counting_bwd)
    return calls


@pytest.fixture
def exact_fp32_matmul():
    """fp32 kernels use exact (IEEE) dots only under the "highest" matmul precision."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# --- Triton kernels on CPU (interpreter) --------------------------------------------------------


@pytest.mark.usefixtures("interpreted_triton", "poisoned_buffers")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
@pytest.mark.parametrize("shape", GRID, ids=GRID_IDS)
def test_kernels_match_reference(shape, prompt_batch, dtype, kernel_calls):
    case = make_case(shape, PROMPT_BATCH[prompt_batch](shape[0]))
    check_against_ref(case, dtype)
    assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.usefixtures("interpreted_triton", "poisoned_buffers")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
def test_kernels_strided_views(prompt_batch, dtype):
    """q/k/v sliced from a fused qkv projection (and CLS-style Nq < Nk) are read in place."""
    for shape in [(2, 2, 11, 11, 5, 32, True), (2, 3, 1, 13, 4, 64, False)]:
        case = make_case(shape, PROMPT_BATCH[prompt_batch](shape[0]), fused=True)
        assert not case.views(case.leaves)[0].is_contiguous()
        check_against_ref(case, dtype)


@pytest.mark.usefixtures("interpreted_triton", "poisoned_buffers")
@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (32, 32)])
def test_kernels_other_block_shapes(blocks):
    """BLOCK_M != BLOCK_N: causal block skipping, several blocks per loop, tails."""
    with kernels.fixed_blocks(*blocks):
        # The interpreted copy that runs CPU tensors shares the launch settings.
        assert kernels._interpreted_copy()._SETTINGS["fixed_blocks"] == blocks
        check_against_ref(make_case((2, 2, 45, 50, 7, 32, True), 1), torch.float32)
        check_against_ref(make_case((1, 2, 37, 37, 33, 64, False), 1), torch.float32)


@pytest.mark.usefixtures("interpreted_triton", "poisoned_buffers")
@pytest.mark.parametrize("dim", [8, 40])
def test_kernels_other_head_dims(dim):
    """Head dims below 16 or not a power of two run with a masked, padded head block."""
    check_against_ref(make_case((2, 2, 9, 11, 3, dim, True), 1), torch.float32)


@pytest.mark.usefixtures("interpreted_triton")
def test_kernels_deterministic():
    assert_deterministic(make_case((3, 2, 20, 20, 17, 32, True), 1))


@pytest.mark.usefixtures("interpreted_triton")
def test_kernel_launchers_direct():
    """The launchers' own contract: contiguous outputs, fp32 lse, prompt gradient summed."""
    q, k, v = (torch.randn(2, 2, 9, 32) for _ in range(3))
    kp, vp = torch.randn(1, 2, 3, 32), torch.randn(1, 2, 3, 32)
    out, lse = kernels.prompt_attention_fwd(q, k, v, kp, vp, False, 0.25)
    assert out.is_contiguous() and lse.dtype == torch.float32 and lse.shape == (2, 2, 9)
    keys = torch.cat([kp.expand(2, -1, -1, -1), k], dim=2)
    torch.testing.assert_close(lse, torch.logsumexp(q @ keys.transpose(-1, -2) * 0.25, -1))
    grads = kernels.prompt_attention_bwd(torch.randn_like(out), q, k, v, kp, vp, out, lse,
                                         False, 0.25)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, kp.shape, vp.shape]


def _kept_specs(specs: list, dtype: torch.dtype, n_q: int, n_k: int, n_p: int, dim: int) -> list:
    """The GPU candidates the autotuner's early pruning keeps for this problem."""
    args = kernels._autotune_args(specs, interpreted=False)
    prune = args["prune_configs_by"]["early_config_prune"]
    kept = prune(args["configs"], {"Q": torch.empty(0, dtype=dtype)}, N_Q=n_q, N_K=n_k, N_P=n_p,
                 HEAD_DIM=dim, CAUSAL=False)
    by_blocks = {(s.block_m, s.block_n, s.warps, s.stages): s for s in specs}
    return [by_blocks[(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)]
            for c in kept]


@pytest.mark.parametrize("specs", ["_FWD_SPECS", "_DKDV_SPECS", "_DQ_SPECS"])
def test_autotune_pruning(specs):
    """Head dim, dtype and small N narrow the GPU candidates; at least one always remains."""
    specs = getattr(kernels, specs)
    vit = _kept_specs(specs, torch.bfloat16, 197, 197, 10, 64)
    assert vit == [s for s in specs if s.max_dim >= 64]
    assert all(s.max_dim >= 128 for s in _kept_specs(specs, torch.float16, 197, 197, 10, 128))
    assert all(s.fp32 for s in _kept_specs(specs, torch.float32, 197, 197, 10, 64))
    cls_only = _kept_specs(specs, torch.bfloat16, 1, 197, 10, 64)
    assert cls_only and all(s.block_m == 16 for s in cls_only)
    tiny = _kept_specs(specs, torch.bfloat16, 7, 7, 3, 32)
    assert len(tiny) == 1 and tiny[0].block_m == 16
    assert len(_kept_specs(specs, torch.float32, 9, 9, 1, 256)) == 1


# --- the PyTorch path, backend selection, validation --------------------------------------------


@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
@pytest.mark.parametrize("shape", GRID, ids=GRID_IDS)
def test_torch_path_matches_reference(shape, prompt_batch, monkeypatch):
    monkeypatch.setenv("DPT_FAST_BACKEND", "torch")
    check_against_ref(make_case(shape, PROMPT_BATCH[prompt_batch](shape[0])), torch.float32)


def test_torch_path_float64_exact():
    case = make_case((2, 2, 6, 9, 3, 32, True), 1).to(torch.float64)
    grad_out = grad_out_for(case).double()
    out, grads = run(prompt_attention, case, grad_out)
    ref_out, ref_grads = run(prompt_attention_ref, case, grad_out)
    torch.testing.assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_cpu_default_is_torch_path(monkeypatch, kernel_calls):
    monkeypatch.delenv("DPT_FAST_BACKEND", raising=False)
    run(prompt_attention, make_case(GRID[0], 1), torch.randn(GRID[0][0], 2, 7, 32))
    assert kernel_calls == {"fwd": 0, "bwd": 0}


def test_backend_env_errors(monkeypatch):
    q, k, v, kp, vp = make_case(GRID[0], 1).leaves
    monkeypatch.setenv("DPT_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prompt_attention(q, k, v, kp, vp)
    monkeypatch.setenv("DPT_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DPT_FAST_BACKEND"):
        prompt_attention(q, k, v, kp, vp)


@pytest.mark.parametrize("bad", ["k_heads", "prompt_batch", "prompt_dim", "v_shape", "no_keys"])
def test_shape_errors(bad):
    q, k, v = torch.randn(2, 2, 5, 32), torch.randn(2, 2, 6, 32), torch.randn(2, 2, 6, 32)
    kp, vp = torch.randn(1, 2, 3, 32), torch.randn(1, 2, 3, 32)
    if bad == "k_heads":
        k = torch.randn(2, 3, 6, 32)
    elif bad == "prompt_batch":
        kp = vp = torch.randn(3, 2, 3, 32)
    elif bad == "prompt_dim":
        kp = vp = torch.randn(1, 2, 3, 16)
    elif bad == "v_shape":
        v = torch.randn(2, 2, 7, 32)
    else:
        k = v = torch.randn(2, 2, 0, 32)
        kp = vp = torch.randn(1, 2, 0, 32)
    with pytest.raises(ValueError):
        prompt_attention(q, k, v, kp, vp)


def test_mixed_dtypes_promote():
    q, k, v, kp, vp = make_case(GRID[0], 1).leaves
    out = prompt_attention(q, k, v, kp.double(), vp.double())
    assert out.dtype == torch.float64


# --- custom op registration: opcheck, gradcheck, torch.compile ----------------------------------


def _op_args(requires_grad: bool) -> tuple:
    case = make_case((2, 2, 5, 6, 3, 32, True), 1)
    return (*[x.requires_grad_(requires_grad) for x in case.leaves], True, 0.3)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_forward_op(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted_triton")
    torch.library.opcheck(torch.ops.dpt_fast.prompt_attention_fwd.default, _op_args(True))
    torch.library.opcheck(torch.ops.dpt_fast.prompt_attention_fwd.default, _op_args(False))


def test_opcheck_backward_op():
    q, k, v, kp, vp, causal, scale = _op_args(False)
    out, lse = torch.ops.dpt_fast.prompt_attention_fwd(q, k, v, kp, vp, causal, scale)
    torch.library.opcheck(torch.ops.dpt_fast.prompt_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, kp, vp, out, lse, causal, scale))


def test_gradcheck_forward_op():
    """The op's autograd formula (its CPU math path in float64) against finite differences."""
    case = make_case((2, 1, 3, 4, 2, 16, True), 1).to(torch.float64)
    leaves = [x.requires_grad_() for x in case.leaves]

    def fn(*xs: Tensor) -> Tensor:
        return torch.ops.dpt_fast.prompt_attention_fwd(*xs, True, 0.4)[0]

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreted_triton")
    graphs: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def block(q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor) -> Tensor:
        return torch.tanh(prompt_attention(q * 1.5, k, v, kp, vp, causal=True)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=recording_backend)
    case = make_case((2, 2, 5, 6, 3, 32, True), 1)
    leaves_eager = [x.clone().requires_grad_() for x in case.leaves]
    leaves_compiled = [x.clone().requires_grad_() for x in case.leaves]
    expected = block(*leaves_eager)
    expected.backward()
    got = compiled(*leaves_compiled)
    got.backward()
    torch.testing.assert_close(got, expected)
    for a, b in zip(leaves_compiled, leaves_eager, strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    assert len(graphs) == 1
    assert ("prompt_attention_fwd" in graphs[0]) == (backend == "triton")


# --- CUDA ---------------------------------------------------------------------------------------

CUDA_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.cuda
@pytest.mark.usefixtures("poisoned_buffers", "exact_fp32_matmul")
@pytest.mark.parametrize("dtype", list(CUDA_DTYPES))
@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
@pytest.mark.parametrize("shape", GRID, ids=GRID_IDS)
def test_cuda_grid(shape, prompt_batch, dtype, kernel_calls):
    case = make_case(shape, PROMPT_BATCH[prompt_batch](shape[0]), device="cuda")
    check_against_ref(case, CUDA_DTYPES[dtype])
    assert kernel_calls == {"fwd": 1, "bwd": 1}


# The full-size shapes autotune (compiling every candidate once), in bf16 only to keep the GPU
# check short; fp16 and fp32 run through the grid above.
VIT_B16 = (4, 12, 197, 197, 10, 64, False)
TEXT = (100, 8, 60, 60, 17, 64, True)


@pytest.mark.cuda
@pytest.mark.usefixtures("poisoned_buffers")
@pytest.mark.parametrize("prompt_batch", list(PROMPT_BATCH))
def test_cuda_vit_b16_shape(prompt_batch):
    """ViT-B/16 at 224 with 10 deep prompts: B=4, H=12, N=197, P=10, D=64; and its last layer,
    where only the CLS query is computed."""
    for n_q in (197, 1):
        shape = (*VIT_B16[:2], n_q, *VIT_B16[3:])
        case = make_case(shape, PROMPT_BATCH[prompt_batch](4), device="cuda")
        check_against_ref(case, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.usefixtures("poisoned_buffers")
def test_cuda_text_shape():
    """Class-name suffixes over a shared causal prefix: B=100 classes, H=8, N=60, P=17, D=64."""
    check_against_ref(make_case(TEXT, 1, device="cuda"), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.usefixtures("poisoned_buffers")
def test_cuda_strided_views():
    for shape in (VIT_B16, TEXT):
        check_against_ref(make_case(shape, 1, fused=True, device="cuda"), torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.usefixtures("poisoned_buffers")
@pytest.mark.parametrize("blocks", [(64, 32), (32, 64)])
def test_cuda_other_block_shapes(blocks):
    with kernels.fixed_blocks(*blocks):
        check_against_ref(make_case((2, 4, 100, 130, 17, 64, True), 1, device="cuda"),
                          torch.bfloat16)


@pytest.mark.cuda
def test_cuda_deterministic():
    for shape in (VIT_B16, TEXT):
        assert_deterministic(make_case(shape, 1, device="cuda").to(torch.bfloat16))


@pytest.mark.cuda
def test_cuda_default_is_triton(monkeypatch, kernel_calls):
    monkeypatch.delenv("DPT_FAST_BACKEND", raising=False)
    case = make_case(GRID[0], 1, device="cuda")
    run(prompt_attention, case, grad_out_for(case))
    assert kernel_calls == {"fwd": 1, "bwd": 1}


@pytest.mark.cuda
def test_cuda_opcheck():
    case = make_case((2, 2, 5, 6, 3, 32, True), 1, device="cuda").to(torch.bfloat16)
    args = (*[x.requires_grad_() for x in case.leaves], True, 0.3)
    torch.library.opcheck(torch.ops.dpt_fast.prompt_attention_fwd.default, args)
