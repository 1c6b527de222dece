"""The cache-file container: a checked header, then one raw array, read back as a read-only memmap.

Layout (integers little-endian; no pickle anywhere, so a cache file can never run code):

* bytes 0-7: the magic ``b"DPTFCACH"``;
* 8-11: the format version (:data:`FORMAT_VERSION`);
* 12-15: the length J of the JSON header;
* 16-23: the data offset D, a multiple of :data:`ALIGNMENT` (so the array is page-aligned);
* 24-55: the SHA-256 of the JSON header bytes;
* 56 to 56+J: the JSON header ``{"key", "key_sha256", "dtype", "shape", "meta"}`` (``dtype``
  is numpy's ``dtype.str``, ``meta`` an object the cache kind defines, e.g. skipped images);
* then zero bytes up to D, then the array in C order, exactly ``prod(shape) * itemsize`` bytes.

:func:`read_cache_file` checks every one of these; anything off raises :class:`InvalidCacheFile`,
whose ``stale`` flag tells an outdated file (other key or format version) from a damaged one.
:class:`CacheFileWriter` builds a file in a temporary sibling and renames it into place, so
readers see the old file or the new one, never a partial one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpt_fast.files import _fsync_dir, _umask

MAGIC = b"DPTFCACH"
FORMAT_VERSION = 1
ALIGNMENT = 4096
# magic, format version, JSON length, data offset, SHA-256 of the JSON.
_PREFIX = struct.Struct("<8sIIQ32s")
# Room reserved for "meta" (known only once the array is written) before the data starts;
# a larger meta moves the data once, at commit (see CacheFileWriter._relocate).
META_SLACK = 64 * 1024
_COPY_CHUNK = 16 * 1024 * 1024
# Plain numeric dtypes only: an object dtype would make numpy unpickle, a structured one is
# never written by dpt_fast.
_NUMERIC_KINDS = "biuf"

Validator = Callable[[np.ndarray, dict[str, Any]], "str | None"]


class InvalidCacheFile(Exception):
    """A cache file that must not be used; ``str(exc)`` says why.

    Attributes:
        stale: True when the file is intact but outdated (another key or format version),
            False when it is damaged (truncated, overwritten, not a cache file).
    """

    def __init__(self, reason: str, stale: bool = False) -> None:
        super().__init__(reason)
        self.stale = stale


class CacheIOError(Exception):
    """Writing the cache failed at the file-system level (full disk, read-only folder, ...);
    ``cause`` is the OSError. Kept apart from OSError so that an ``ImageReadError`` (an OSError)
    raised while computing the array is never mistaken for a cache problem."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True, eq=False)
class CachedArray:
    """A validated cache file: ``array`` (read-only memmap, or an empty array when it has no
    elements), the kind's ``meta`` and the file's ``path``."""

    array: np.ndarray
    meta: dict[str, Any]
    path: Path


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` (sorted keys, no spaces, strict): equal objects, equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def key_digest(key: Any) -> str:
    """Hex SHA-256 of ``canonical_json(key)``."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _header_bytes(key: Any, dtype: np.dtype, shape: Sequence[int], meta: dict) -> bytes:
    return canonical_json({"key": key, "key_sha256": key_digest(key), "dtype": dtype.str,
                           "shape": list(shape), "meta": meta}).encode()


def read_cache_file(path: Path, key: Any, validate: Validator | None = None) -> CachedArray:
    """Open the cache file at ``path`` and check it against ``key``.

    Args:
        validate: optional ``(array, meta) -> reason or None``: the kind's own checks (dtype,
            shape, meta); a reason makes the file invalid (damaged).

    Raises:
        FileNotFoundError: no file at ``path``.
        InvalidCacheFile: see the module docstring.
        OSError: the file exists but cannot be read.
    """
    with open(path, "rb") as file:
        # The header and the memmap come from this one open file: a concurrent os.replace
        # cannot pair one file's header with another file's data.
        size = os.fstat(file.fileno()).st_size
        head = file.read(_PREFIX.size)
        if len(head) < _PREFIX.size:
            raise InvalidCacheFile(f"too short ({size} bytes) to be a cache file")
        magic, version, json_len, offset, json_sha = _PREFIX.unpack(head)
        if magic != MAGIC:
            raise InvalidCacheFile("not a dpt_fast cache file (wrong magic bytes)")
        if version != FORMAT_VERSION:
            raise InvalidCacheFile(f"written in cache format {version}, this is format "
                                   f"{FORMAT_VERSION}", stale=True)
        if offset % ALIGNMENT or offset < _PREFIX.size + json_len or offset > size:
            raise InvalidCacheFile(f"corrupt header (data offset {offset}, file size {size})")
        body = file.read(json_len)
        if hashlib.sha256(body).digest() != json_sha:
            raise InvalidCacheFile("corrupt header (checksum mismatch)")
        if file.read(offset - _PREFIX.size - json_len).strip(b"\0"):
            raise InvalidCacheFile("corrupt header (non-zero padding)")
        dtype, shape, meta = _check_header(body, key, size - offset)
        if size > offset:
            array: np.ndarray = np.memmap(file, dtype=dtype, mode="r", offset=offset,
                                          shape=shape)
        else:  # mmap cannot map zero bytes
            array = np.empty(shape, dtype=dtype)
            array.flags.writeable = False
    reason = validate(array, meta) if validate is not None else None
    if reason is not None:
        raise InvalidCacheFile(reason)
    return CachedArray(array, meta, Path(path))


def _check_header(body: bytes, key: Any,
                  data_bytes: int) -> tuple[np.dtype, tuple[int, ...], dict[str, Any]]:
    """The header's dtype, shape and meta, once checked against ``key`` and the number of data
    bytes in the file; raises InvalidCacheFile."""
    try:
        header = json.loads(body)
        dtype = np.dtype(header["dtype"])
        shape = tuple(header["shape"])
        stored_key, stored_sha, meta = header["key"], header["key_sha256"], header["meta"]
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidCacheFile(f"corrupt header ({exc})") from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject or not isinstance(meta, dict):
        raise InvalidCacheFile(f"corrupt header (dtype {dtype}, meta {type(meta).__name__})")
    if not all(isinstance(n, int) and n >= 0 for n in shape):
        raise InvalidCacheFile(f"corrupt header (shape {shape})")
    if stored_sha != key_digest(stored_key):
        raise InvalidCacheFile("corrupt header (key checksum mismatch)")
    if stored_sha != key_digest(key):
        raise InvalidCacheFile("built for other inputs (key mismatch)", stale=True)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if data_bytes != expected:
        raise InvalidCacheFile(f"truncated or wrong size: {data_bytes} data bytes, shape "
                               f"{shape} of {dtype} needs {expected}")
    return dtype, shape, meta


def _pwrite(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (os.pwrite may write less than asked)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


class CacheFileWriter:
    """Builds the cache file for ``path`` and ``key``: :meth:`start`, :meth:`append` rows,
    :meth:`commit`. Until the commit everything goes to a temporary sibling (named like those
    of :func:`dpt_fast.files.atomic_write_bytes`), removed by :meth:`abort`.

    Every file-system failure raises :class:`CacheIOError`.
    """

    def __init__(self, path: Path, key: Any) -> None:
        self.path = Path(path)
        self.key = key
        self.rows = 0
        self._fd: int | None = None
        self._tmp: str | None = None

    def start(self, dtype: np.dtype | str, row_shape: Sequence[int], max_rows: int,
              meta_slack: int | None = None) -> None:
        """Create the temporary file for at most ``max_rows`` rows of ``row_shape``, with its
        space reserved now (so a full disk fails here, before any work, where supported)."""
        self.dtype = np.dtype(dtype)
        if self.dtype.kind not in _NUMERIC_KINDS:
            raise TypeError(f"cache arrays must be numeric, got {self.dtype}")
        self.row_shape = tuple(int(n) for n in row_shape)
        self.max_rows = int(max_rows)
        self._row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        slack = META_SLACK if meta_slack is None else meta_slack
        # The shape with max_rows is the longest the header can get, except for meta.
        bound = len(_header_bytes(self.key, self.dtype, (self.max_rows, *self.row_shape), {}))
        self._offset = _align(_PREFIX.size + bound + slack)
        self._fd, self._tmp = self._create(self._offset)

    def _create(self, offset: int) -> tuple[int, str]:
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                       dir=self.path.parent)
        except OSError as exc:
            raise CacheIOError(exc) from exc
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it owner-only
            _reserve(fd, offset + self.max_rows * self._row_bytes)
        except OSError as exc:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise CacheIOError(exc) from exc
        return fd, tmp

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` (k, *row_shape) after the rows written so far."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape or self.rows + len(rows) > self.max_rows:
            raise ValueError(f"rows of shape {rows.shape} do not fit: row shape "
                             f"{self.row_shape}, {self.rows} of {self.max_rows} rows written")
        assert self._fd is not None, "start() first"
        try:
            _pwrite(self._fd, memoryview(rows.data).cast("B"),
                    self._offset + self.rows * self._row_bytes)
        except OSError as exc:
            raise CacheIOError(exc) from exc
        self.rows += len(rows)

    def commit(self, meta: dict[str, Any] | None = None) -> None:
        """Write the header for the rows appended so far, fsync, rename over ``path``."""
        assert self._fd is not None and self._tmp is not None, "start() first"
        body = _header_bytes(self.key, self.dtype, (self.rows, *self.row_shape), meta or {})
        try:
            if _PREFIX.size + len(body) > self._offset:
                self._relocate(_align(_PREFIX.size + len(body)))
            head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), self._offset,
                                hashlib.sha256(body).digest())
            padding = bytes(self._offset - _PREFIX.size - len(body))
            _pwrite(self._fd, memoryview(head + body + padding), 0)
            os.ftruncate(self._fd, self._offset + self.rows * self._row_bytes)
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            self._tmp = None
        except OSError as exc:
            raise CacheIOError(exc) from exc
        _fsync_dir(self.path.parent)

    def _relocate(self, offset: int) -> None:
        """Move the rows to a new temporary file whose data starts at ``offset`` (a meta larger
        than the reserved slack, e.g. thousands of unreadable images)."""
        old_fd, old_tmp, old_offset = self._fd, self._tmp, self._offset
        assert old_fd is not None and old_tmp is not None, "start() first"
        self._fd, self._tmp = self._create(offset)
        self._offset = offset
        try:
            total = self.rows * self._row_bytes
            for start in range(0, total, _COPY_CHUNK):
                chunk = os.pread(old_fd, min(_COPY_CHUNK, total - start), old_offset + start)
                _pwrite(self._fd, memoryview(chunk), offset + start)
        finally:
            os.close(old_fd)
            Path(old_tmp).unlink(missing_ok=True)

    def abort(self) -> None:
        """Remove the temporary file (a no-op after :meth:`commit`)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            Path(self._tmp).unlink(missing_ok=True)
            self._tmp = None


def _reserve(fd: int, size: int) -> None:
    """Allocate ``size`` bytes for ``fd`` now: a full disk raises ENOSPC here instead of half
    way through the build. File systems without fallocate just get the size set."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)
    except AttributeError:  # no posix_fallocate on this platform
        os.ftruncate(fd, size)

