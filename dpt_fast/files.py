"""Writing files so that nothing is ever half-written, and JSON that is always valid JSON.

Every file dpt_fast writes (checkpoints, few-shot caches, logs, results) goes through
:func:`atomic_write_bytes`: a temporary sibling, fsynced, then renamed over the target, so a
crash, a kill or a power loss leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

# Temporary siblings are named ".<target name>.<random>.tmp": see orphan_temporaries.
_TMP_SUFFIX = ".tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it owner-only; a plain write would not
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # the rename itself survives a power loss too


def orphan_temporaries(folder: str | os.PathLike[str], name: str) -> list[Path]:
    """Temporary files that an interrupted :func:`atomic_write_bytes` of ``folder / name``
    left behind (a kill between the write and the rename)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f".{name}.*{_TMP_SUFFIX}") if p.is_file())


def is_finite_number(value: object) -> bool:
    """A JSON number that is a real value: int or float (not bool), finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by None, recursively, so that
    ``json.dumps(..., allow_nan=False)`` succeeds: bare ``NaN`` is not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(value) for value in obj]
    return obj


def json_dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj``; non-finite numbers are written as ``null``."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON (``null`` for non-finite numbers), atomically."""
    atomic_write_bytes(path, json_dumps(obj, indent=2).encode())
