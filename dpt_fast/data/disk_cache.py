"""On-disk caches for the deterministic part of evaluation: where they live, how they are
built safely, and the frozen-feature cache.

Two caches share this machinery: the test crops (:mod:`dpt_fast.data.crop_cache`) and the
frozen CLIP features (:func:`cached_features`). Each entry is one file in the container format
of :mod:`dpt_fast.data.cache_file`, under :attr:`CacheSettings.directory` (``--cache-dir``,
else ``$DPT_FAST_CACHE_DIR``, else ``~/.cache/dpt_fast``).

Rules, the same for every cache (:func:`load_or_build`):

* a cache is an optimisation only: whenever it cannot be used, the caller computes the values
  as if caching were off, with one :class:`CacheWarning` per cause and folder (full disk,
  read-only folder, lock timeout) per process;
* a file that is outdated (other key, other format version) or damaged (truncated, overwritten)
  is never used: it is rebuilt, with one warning;
* one process builds an entry while the others wait on a lock file next to it (``fcntl.flock``;
  the lock is released if the builder dies); after :attr:`CacheSettings.lock_timeout_s` a waiter
  stops waiting and computes the values itself.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpt_fast.data.cache_file import (
    CachedArray,
    CacheFileWriter,
    CacheIOError,
    InvalidCacheFile,
    Validator,
    canonical_json,
    key_digest,
    read_cache_file,
)

CACHE_DIR_ENV = "DPT_FAST_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/dpt_fast"
# A waiter gives up after this long; building the crops of a large test set takes minutes.
DEFAULT_LOCK_TIMEOUT_S = 1800.0
_LOCK_POLL_S = 0.05
# Bump when what cached_features stores changes meaning (the file name stays, the entry is
# rebuilt with a warning).
FEATURES_VERSION = 1

# (cause, cache root) pairs already warned about in this process: "once per cause".
_WARNED: set[tuple[str, str]] = set()


class CacheWarning(UserWarning):
    """A disk cache could not be used as is (rebuilt, or skipped for this run)."""


def default_cache_dir() -> Path:
    """``$DPT_FAST_CACHE_DIR`` when set and not empty, else ``~/.cache/dpt_fast``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


@dataclass(frozen=True)
class CacheSettings:
    """Where and whether the evaluation caches are used.

    Attributes:
        enabled: False (``--no-cache``) computes everything as without caches and never touches
            ``directory``.
        directory: the cache root (``--cache-dir``; default :func:`default_cache_dir`). Entries
            go to its ``test_crops/`` and ``features/`` subfolders, created when first needed.
        lock_timeout_s: how long a process waits for another one building the same entry before
            computing the values itself.
    """

    enabled: bool = True
    directory: Path = field(default_factory=default_cache_dir)
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S

    @classmethod
    def from_options(cls, cache_dir: str | os.PathLike[str] | None,
                     no_cache: bool = False) -> CacheSettings:
        """Settings from the command line: ``--cache-dir`` (None: the default) and
        ``--no-cache``."""
        directory = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        return cls(enabled=not no_cache, directory=directory)


def warn_once(cause: str, folder: Path, message: str) -> None:
    """Issue ``message`` as a CacheWarning unless ``cause`` for the cache root ``folder`` was
    already warned about in this process (a sweep evaluates 15 times: one warning, not 15)."""
    if (cause, str(folder)) in _WARNED:
        return
    _WARNED.add((cause, str(folder)))
    warnings.warn(message, CacheWarning, stacklevel=3)


def _io_cause(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "full disk"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "read-only folder"
    return f"I/O error {exc.errno}"


def _open_lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


@contextmanager
def _build_lock(path: Path, timeout_s: float) -> Iterator[bool]:
    """Hold the lock of cache file ``path`` (``<path>.lock``, kept afterwards: removing a lock
    file others may hold open breaks the lock); yields False if it stayed busy ``timeout_s``.

    Raises:
        CacheIOError: the folder or the lock file cannot be created.
    """
    try:
        fd = _open_lock_file(path.with_name(path.name + ".lock"))
    except OSError as exc:
        raise CacheIOError(exc) from exc
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(_LOCK_POLL_S)
            except OSError as exc:  # a file system without flock (Lustre, NFS without lockd)
                raise CacheIOError(exc) from exc
        # Only the lock holder writes temporaries of this entry: any left are a killed
        # build's (a full-size file reserved up front), never anyone's work in progress.
        for orphan in path.parent.glob(f".{path.name}.*.tmp"):
            orphan.unlink(missing_ok=True)
        yield True
    finally:
        os.close(fd)  # releases the flock


def load_or_build(path: Path, key: Any, build: Callable[[CacheFileWriter], dict[str, Any]],
                  settings: CacheSettings, validate: Validator | None = None
                  ) -> CachedArray | None:
    """The valid cache file at ``path`` for ``key``, building it with ``build`` if needed.

    Args:
        build: ``writer -> meta``: calls ``writer.start(...)``, appends the rows, returns the
            meta to store. Its own exceptions (e.g. ImageReadError) propagate, leaving no file.
        validate: the kind's extra checks of a file, see
            :func:`~dpt_fast.data.cache_file.read_cache_file`.

    Returns:
        The cached array (read-only memmap) and meta, or None when caching is off or the cache
        cannot be written or waited for (the caller computes without it; one warning).
    """
    if not settings.enabled:
        return None
    try:
        return read_cache_file(path, key, validate)
    except (OSError, InvalidCacheFile):
        pass  # missing or unusable: decided again under the lock, where it may be rebuilt
    try:
        with _build_lock(path, settings.lock_timeout_s) as held:
            if not held:
                warn_once("lock timeout", settings.directory,
                          f"dpt_fast cache: another process has been building {path} for "
                          f"{settings.lock_timeout_s:g} s; computing without the cache")
                return None
            try:
                return read_cache_file(path, key, validate)  # built while we waited?
            except FileNotFoundError:
                pass
            except (OSError, InvalidCacheFile) as exc:
                what = "outdated" if getattr(exc, "stale", False) else "unusable"
                warnings.warn(f"dpt_fast cache: {path} is {what} ({exc}); rebuilding it",
                              CacheWarning, stacklevel=2)
            writer = CacheFileWriter(path, key)
            try:
                writer.commit(build(writer))
            finally:
                writer.abort()
            return read_cache_file(path, key, validate)
    except CacheIOError as exc:
        warn_once(_io_cause(exc.cause), settings.directory,
                  f"dpt_fast cache: cannot write {path} ({exc.cause.strerror or exc.cause}); "
                  "going on without the cache")
        return None


def _as_feature_array(values: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            values = values.float()
        values = values.numpy()
    values = np.asarray(values)
    if values.dtype.kind != "f" or values.ndim < 1 or len(values) != n:
        raise ValueError(f"compute() must return a float array with {n} rows, got "
                         f"{values.dtype} of shape {values.shape}")
    return values


def cached_features(key: Mapping[str, Any], n: int,
                    compute: Callable[[], np.ndarray | torch.Tensor], settings: CacheSettings,
                    *, name_fields: Sequence[str] | None = None) -> np.ndarray:
    """``compute()`` (a float array of ``n`` rows), stored under ``key`` and read back from
    disk next time.

    Args:
        key: JSON-serialisable description of everything the values depend on (for frozen CLIP
            features: backbone name, :func:`module_weights_digest`, image size,
            :func:`~dpt_fast.data.crop_cache.crops_key_digest`).
        name_fields: the fields of ``key`` that name the file (default: all). An entry that
            agrees on these but not on the other fields is outdated: replaced, with a warning,
            rather than kept beside the new one.

    Returns:
        (n, ...) float array, the dtype ``compute`` gave (bfloat16 as float32): a read-only
        memmap when cached, else ``compute()``'s values.
    """
    key = dict(key)
    identity = key if name_fields is None else {name: key[name] for name in name_fields}
    full_key = {"kind": "features", "version": FEATURES_VERSION, "n": n, "key": key}
    path = settings.directory / "features" / f"features-{n}-{key_digest(identity)[:32]}.bin"
    computed: list[np.ndarray] = []

    def build(writer: CacheFileWriter) -> dict[str, Any]:
        values = _as_feature_array(compute(), n)
        computed.append(values)  # kept in case the file cannot be written
        writer.start(values.dtype, values.shape[1:], n, meta_slack=0)
        writer.append(values)
        return {}

    def validate(array: np.ndarray, meta: dict[str, Any]) -> str | None:
        if array.dtype.kind != "f" or array.ndim < 1 or len(array) != n:
            return f"holds {array.dtype} of shape {array.shape}, not {n} float rows"
        return None

    cached = load_or_build(path, full_key, build, settings, validate)
    if cached is not None:
        return cached.array
    return computed[0] if computed else _as_feature_array(compute(), n)


def module_weights_digest(module: torch.nn.Module) -> str:
    """Hex SHA-256 of ``module.state_dict()``: names, dtypes, shapes and tensor bytes, in
    sorted-name order (the same weights give the same digest on any device)."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):  # extra state: hashed by its repr
            digest.update(canonical_json([name, repr(value)]).encode())
            continue
        tensor = value.detach().cpu().contiguous()
        digest.update(canonical_json([name, str(tensor.dtype), list(tensor.shape)]).encode())
        # Bytes via a uint8 view: works for dtypes numpy lacks (bfloat16).
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
