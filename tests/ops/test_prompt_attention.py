"""Tests of the op ``dpt_fast.ops.prompt_attention``: its PyTorch path, backend selection, input
validation and the custom op registrations (opcheck, gradcheck, torch.compile).

The Triton kernels themselves: ``test_prompt_attention_kernels.py``. Oracle and tolerances:
``prompt_attention_checks``.
"""

from __future__ import annotations

import pytest
import torch
from prompt_attention_checks import (
    GRID,
    GRID_IDS,
    PROMPT_BATCH,
    check_against_ref,
    grad_out_for,
    make_case,
    require_triton,
    run,
)
from torch import Tensor

from dpt_fast.ops import prompt_attention, prompt_attention_ref
from dpt_fast.ops.prompt_attention import TRITON_KERNELS

# The custom op on each backend: (backend, device, dtype of its inputs).
OP_BACKENDS = [
    pytest.param("torch", "cpu", torch.float32, id="torch-cpu"),
    pytest.param("triton", "cpu", torch.float32, id="triton-cpu"),
    pytest.param("triton", "cuda", torch.bfloat16, id="triton-cuda", marks=pytest.mark.cuda),
]


@pytest.fixture
def backend_for(monkeypatch: pytest.MonkeyPatch):
    """Forces a backend for the test; skips the Triton one where it cannot run."""

    def force(backend: str, device: str) -> None:
        if backend == "triton":
            require_triton(device)
        monkeypatch.setenv("DPT_FAST_BACKEND", backend)

    return force


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


def test_backend_env_errors(monkeypatch):
    q, k, v, kp, vp = make_case(GRID[0], 1).leaves
    monkeypatch.setenv("DPT_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prompt_attention(q, k, v, kp, vp)
    monkeypatch.setenv("DPT_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DPT_FAST_BACKEND"):
        prompt_attention(q, k, v, kp, vp)


@pytest.mark.usefixtures("triton_backend")
def test_forced_triton_rejects_what_the_table_excludes(monkeypatch):
    """DPT_FAST_BACKEND=triton names the limit of the kernels' table instead of running them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter's table on CPU tensors
    excluded = [d for d in (torch.float64, torch.bfloat16)
                if d not in TRITON_KERNELS.interpreter_dtypes]
    assert excluded, "the test needs a dtype the interpreter does not take"
    for dtype in excluded:
        q, k, v, kp, vp = make_case(GRID[0], 1).to(dtype).leaves
        with pytest.raises(ValueError, match=f"not {dtype}"):
            prompt_attention(q, k, v, kp, vp)
    dim = TRITON_KERNELS.max_head_dim + 1
    q, k, v, kp, vp = make_case((1, 1, 2, 2, 1, dim, False), 1).leaves
    with pytest.raises(ValueError, match=f"head dims {TRITON_KERNELS.min_head_dim}.."):
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


def _op_args(device: str, dtype: torch.dtype, requires_grad: bool) -> tuple:
    case = make_case((2, 2, 5, 6, 3, 32, True), 1, device=device).to(dtype)
    return (*[x.requires_grad_(requires_grad) for x in case.leaves], True, 0.3)


@pytest.mark.parametrize(("backend", "device", "dtype"), OP_BACKENDS)
def test_opcheck_forward_op(backend, device, dtype, backend_for):
    backend_for(backend, device)
    for requires_grad in (True, False):
        torch.library.opcheck(torch.ops.dpt_fast.prompt_attention_fwd.default,
                              _op_args(device, dtype, requires_grad))


@pytest.mark.parametrize(("backend", "device", "dtype"), OP_BACKENDS)
def test_opcheck_backward_op(backend, device, dtype, backend_for):
    backend_for(backend, device)
    q, k, v, kp, vp, causal, scale = _op_args(device, dtype, False)
    out, lse = torch.ops.dpt_fast.prompt_attention_fwd(q, k, v, kp, vp, causal, scale)
    torch.library.opcheck(torch.ops.dpt_fast.prompt_attention_bwd.default,
                          (torch.randn_like(out), q, k, v, kp, vp, out, lse, causal, scale))


def test_gradcheck_forward_op():
    """The op's autograd formula (its PyTorch math in float64) against finite differences."""
    case = make_case((2, 1, 3, 4, 2, 16, True), 1).to(torch.float64)
    leaves = [x.requires_grad_() for x in case.leaves]

    def fn(*xs: Tensor) -> Tensor:
        return torch.ops.dpt_fast.prompt_attention_fwd(*xs, True, 0.4)[0]

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend, backend_for):
    backend_for(backend, "cpu")
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
