"""The interface of dpt_fast.ops.class_aware_attention: the extension and its capability table,
the registrations (opcheck, torch.compile, autocast), dtype handling, the PyTorch fallback and
the errors for bad inputs. Numerics: ``test_class_aware_attention.py``.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from class_aware_attention_checks import (
    DEVICES,
    DTYPES,
    assert_close_to_oracle,
    random_inputs,
    require_kernels,
)

from dpt_fast.ops import _extension
from dpt_fast.ops.class_aware_attention import (
    CLASS_AWARE_ATTENTION,
    class_aware_attention,
    class_aware_attention_ref,
)
from dpt_fast.ops.class_aware_attention.capabilities import extension_disagreements

# The package's dispatch module (dpt_fast.ops re-exports the function under the package's name).
caa_api = importlib.import_module("dpt_fast.ops.class_aware_attention.api")


# --- extension availability and the capability table ---------------------------------------


def test_extension_is_built(extension: None) -> None:
    """The C++ extension loads wherever a compiler could build it (else ``extension`` fails)."""
    assert _extension.extension_available()
    assert _extension.load_error() is None


def test_missing_extension_warns_once_with_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(_extension.importlib, "import_module", fail)
    with pytest.warns(RuntimeWarning, match=r"pip install --no-build-isolation \.") as record:
        module, reason = _extension._load()
    assert module is None
    assert "ImportError" in reason
    assert len(record) == 1


def test_ops_are_registered(extension: None) -> None:
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dpt_fast::class_aware_attention", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "dpt_fast::class_aware_attention_backward", "CPU"
    )
    assert _extension.cuda_kernels_available() == torch._C._dispatch_has_kernel_for_dispatch_key(
        "dpt_fast::class_aware_attention", "CUDA"
    )


def test_capability_table_matches_the_extension(extension: None) -> None:
    """The Python table and csrc/class_aware_attention.h state the same limits."""
    assert extension_disagreements(_extension.extension_module()) == []


def test_capability_check_sees_a_disagreement(extension: None) -> None:
    rows = CLASS_AWARE_ATTENTION.cuda_fused_max_rows
    other = dataclasses.replace(CLASS_AWARE_ATTENTION, cuda_fused_max_rows=rows + 1,
                                dtypes=DTYPES[:-1])
    problems = extension_disagreements(_extension.extension_module(), other)
    assert [p.split(":")[0] for p in problems] == ["dtypes", "cuda_fused_max_rows"]


# --- registrations: opcheck, torch.compile, autocast -----------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(extension: None, device: str) -> None:
    require_kernels(device)
    q, k, v, grad_out = random_inputs((2, 3, 40, 8, 16), torch.float32, device)
    torch.library.opcheck(torch.ops.dpt_fast.class_aware_attention.default, (q, k, v, 0.5))
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.dpt_fast.class_aware_attention.default, (*leaves, 0.5))
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.5)
    torch.library.opcheck(
        torch.ops.dpt_fast.class_aware_attention_backward.default,
        (grad_out, q, k, v, out, lse, 0.5),
    )


def _compiled_loss_and_grads(backend: str) -> None:
    q, k, v, grad_out = random_inputs((2, 3, 5, 8, 6), torch.float32)

    def loss(q, k, v):
        return (class_aware_attention(q, k, v) * grad_out).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*got).backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    (class_aware_attention_ref(*ref) * grad_out).sum().backward()
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_torch_compile_fullgraph(extension: None) -> None:
    """Dynamo + AOT autograd trace the op through its fake kernels without graph breaks."""
    _compiled_loss_and_grads("aot_eager")


@pytest.mark.slow
def test_torch_compile_fullgraph_inductor(extension: None) -> None:
    """Same with inductor (about 20 s on a cold compile cache)."""
    _compiled_loss_and_grads("inductor")


def test_mixed_dtypes_promote() -> None:
    q, k, v, _ = random_inputs((2, 3, 5, 4, 6), torch.float32)
    out = class_aware_attention(q.bfloat16(), k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, class_aware_attention(q.bfloat16().float(), k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_uses_autocast_dtype(extension: None, device: str) -> None:
    require_kernels(device)
    q, k, v, _ = random_inputs((2, 10, 207, 32, 768), torch.float32, device)
    leaves = [q.requires_grad_(), k.half().requires_grad_(), v.requires_grad_()]
    with torch.autocast(device, dtype=torch.bfloat16):
        out = class_aware_attention(*leaves)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(leaf.grad is not None and leaf.grad.dtype == leaf.dtype for leaf in leaves)
    expected = class_aware_attention_ref(q.double(), k.half().bfloat16().double(), v.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_raw_op_ignores_autocast(extension: None, device: str) -> None:
    """The kernels' internal products keep their dtypes when the caller has autocast on."""
    require_kernels(device)
    # dv = 7 takes the CUDA general path, whose cuBLAS products must stay in float32.
    for shape in [(2, 10, 207, 32, 768), (2, 5, 9, 7, 7)]:
        q, k, v, grad_out = random_inputs(shape, torch.float32, device)
        with torch.autocast(device, dtype=torch.bfloat16):
            out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 0.5)
            grads = torch.ops.dpt_fast.class_aware_attention_backward(
                grad_out, q, k, v, out, lse, 0.5
            )
        assert out.dtype == lse.dtype == torch.float32
        assert all(grad.dtype == torch.float32 for grad in grads)
        expected = class_aware_attention_ref(q.double(), k.double(), v.double(), 0.5)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_fallback_without_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the extension the wrapper runs the PyTorch path, differentiably."""
    monkeypatch.setattr(_extension, "extension_available", lambda: False)
    assert not caa_api.has_fused_kernel(torch.empty(1))
    assert_close_to_oracle(class_aware_attention, (2, 3, 5, 4, 6), torch.float32)
    assert_close_to_oracle(class_aware_attention, (2, 3, 5, 4, 6), torch.bfloat16)


# --- bad inputs --------------------------------------------------------------------------------


def _good_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, _ = random_inputs((2, 3, 5, 8, 6), torch.float32)
    return q, k, v


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda q, k, v: (q[0], k, v), r"q must have rank 3 with shape \(B, K, dk\), got rank 2"),
        (lambda q, k, v: (q, k[..., None], v), r"k must have rank 3 with shape \(B, M, dk\)"),
        (
            lambda q, k, v: (q, torch.cat([k, k]), v),
            r"k must have shape \(B, M, dk\) = \(2, \?, 8\) matching q, got \(4, 5, 8\)",
        ),
        (
            lambda q, k, v: (q, k[..., :4], v),
            r"k must have shape \(B, M, dk\) = \(2, \?, 8\) matching q, got \(2, 5, 4\)",
        ),
        (
            lambda q, k, v: (q, k, v[:, :4]),
            r"v must have shape \(B, M, dv\) = \(2, 5, \?\) matching q and k, got \(2, 4, 6\)",
        ),
        (lambda q, k, v: (q, k.double(), v), r"q, k and v must have the same dtype"),
        (
            lambda q, k, v: (q, k[:, :0], v[:, :0]),
            rf"at least {CLASS_AWARE_ATTENTION.min_keys} key "
            rf"\(M >= {CLASS_AWARE_ATTENTION.min_keys}\)",
        ),
        (
            lambda q, k, v: (q.int(), k.int(), v.int()),
            rf"must be {CLASS_AWARE_ATTENTION.dtype_names()}, got Int",
        ),
    ],
    ids=["q-rank", "k-rank", "batch", "dk", "M", "dtype", "M0", "int"],
)
def test_forward_rejects_bad_inputs(extension: None, change, match: str) -> None:
    q, k, v = change(*_good_inputs())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dpt_fast.class_aware_attention(q, k, v, 1.0)


def test_wrapper_rejects_bad_inputs(extension: None) -> None:
    q, k, v = _good_inputs()
    with pytest.raises(RuntimeError, match=r"v must have shape \(B, M, dv\)"):
        class_aware_attention(q, k, v[:, :4])
    with pytest.raises(RuntimeError, match=r"at least 1 key"):
        class_aware_attention(q, k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match=rf"takes {CLASS_AWARE_ATTENTION.dtype_names()}"):
        class_aware_attention(q.int(), k.int(), v.int())


def test_backward_rejects_bad_inputs(extension: None) -> None:
    q, k, v = _good_inputs()
    out, lse = torch.ops.dpt_fast.class_aware_attention(q, k, v, 1.0)
    backward = torch.ops.dpt_fast.class_aware_attention_backward
    with pytest.raises(RuntimeError, match=r"grad_out must have shape \(B, K, dv\) = \(2, 3, 6\)"):
        backward(out[:, :2], q, k, v, out, lse, 1.0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \(B, K\) = \(2, 3\)"):
        backward(out, q, k, v, out, lse[:, :2], 1.0)
    with pytest.raises(RuntimeError, match=r"lse must be Float for Float inputs, got Double"):
        backward(out, q, k, v, out, lse.double(), 1.0)
    with pytest.raises(RuntimeError, match=r"grad_out and out must have q's dtype"):
        backward(out.double(), q, k, v, out, lse, 1.0)


# --- CUDA only -------------------------------------------------------------------------------


@pytest.mark.cuda
def test_cuda_dispatches_to_cuda_kernels(extension: None) -> None:
    require_kernels("cuda")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("dpt_fast::class_aware_attention", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        "dpt_fast::class_aware_attention_backward", "CUDA"
    )
    q, k, v, grad_out = random_inputs((2, 10, 207, 32, 768), torch.bfloat16, "cuda")
    leaves = [t.requires_grad_() for t in (q, k, v)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = class_aware_attention(*leaves)
        out.backward(grad_out)
        torch.cuda.synchronize()
    assert out.device.type == "cuda"
    kernels = {event.name for event in prof.events()}
    for name in ("caa_softmax_lse_kernel", "caa_pv_kernel", "caa_backward_fused_kernel"):
        assert any(name in kernel for kernel in kernels), f"{name} not in {sorted(kernels)}"


@pytest.mark.cuda
def test_cuda_rejects_mixed_devices(extension: None) -> None:
    require_kernels("cuda")
    q, k, v = _good_inputs()
    with pytest.raises(RuntimeError, match=r"q, k and v must be on the same device"):
        torch.ops.dpt_fast.class_aware_attention(q.cuda(), k, v.cuda(), 1.0)
