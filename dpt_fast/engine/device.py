"""Which device a run uses and in which precision it computes."""

from __future__ import annotations

import torch

from dpt_fast.engine.distributed import DistInfo

# Device types a run can compute on (when this machine has them); anything else torch parses
# (meta, xla, ...) is refused up front rather than failing somewhere inside a run.
_RUN_DEVICE_TYPES = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def available_devices() -> list[str]:
    """The devices this machine can run on: "cpu", and "cuda", "cuda:0" .. "cuda:N-1" and "mps"
    when present ("auto" picks one of them)."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if _mps_available():
        names.append("mps")
    return names


def _choices() -> str:
    return f"{', '.join(available_devices())} (or 'auto')"


def check_device(name: str) -> torch.device | None:
    """The device ``name`` names, checked against this machine without selecting it (cheap:
    call it before any heavy work); None for "auto".

    Raises:
        ValueError: not a device name, or a device this machine does not have; the message
            lists the devices it has.
    """
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {name!r} is not a device name; this machine's devices: "
                         f"{_choices()}") from None
    if device.type not in _RUN_DEVICE_TYPES:
        raise ValueError(f"device {name!r} cannot run dpt_fast; this machine's devices: "
                         f"{_choices()}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this "
                             f"machine; its devices: {_choices()}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s); its devices: {_choices()}")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} requested but MPS is not available on this machine; "
                         f"its devices: {_choices()}")
    return device


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """The device to run on, selected (``torch.cuda.set_device``) when it is a GPU: "auto" is
    CUDA when present, else the CPU; a bare "cuda" is the process's local rank's GPU.

    Raises:
        ValueError: see :func:`check_device`.
    """
    device = check_device(name)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info else 0)
        torch.cuda.set_device(device)
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None: no autocast, fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision in ("bf16", "fp16"):
        if device.type == "cpu" and precision == "fp16":
            raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        return torch.bfloat16 if precision == "bf16" else torch.float16
    raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
