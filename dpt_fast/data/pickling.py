"""Dassl-compatible pickle files of Datum lists: a safe reader and an interoperable writer.

CoOp/DPT cache few-shot selections as ``split_fewshot/shot_{K}-seed_{S}.pkl`` (and ImageNet as
``preprocessed.pkl``): a pickled ``dict`` of ``list``s of Dassl ``Datum`` objects. Both
directions must work:

**Reading** Dassl-written files must not execute code: pickle can call any importable function.
:class:`RestrictedUnpickler` resolves only Dassl's ``Datum`` and ours (both to our
:class:`~dpt_fast.data.records.Datum`) and a few plain builtin types; every other global raises
:class:`pickle.UnpicklingError` naming it, before anything is called.

**Writing** files that Dassl can read: Dassl pickles its ``Datum`` with protocol >= 2 as
``copyreg.__newobj__`` reconstruction: ``GLOBAL dassl.data.datasets.base_dataset Datum``,
``EMPTY_TUPLE``, ``NEWOBJ`` (``Datum.__new__(Datum)``, so Dassl's ``__init__`` and its file check
do not run), then ``BUILD`` with the instance ``__dict__`` ``{"_impath", "_label", "_domain",
"_classname"}``. Python's ``Pickler`` cannot write a global that is not importable here (it
verifies the class path by importing it, and Dassl is not a dependency), and giving our
:class:`Datum` a ``__reduce__`` under Dassl's path would break ordinary pickling of our records
(e.g. DataLoader workers started with ``spawn``). So :func:`dumps_dassl_compatible` emits that
opcode sequence itself, for the only shapes these files hold (dicts, lists, str, int, Datum),
with pickle protocol 2, which every Python 3 reads.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dpt_fast.data.records import DASSL_DATUM_MODULE, DASSL_DATUM_NAME, Datum
from dpt_fast.files import atomic_write_bytes

# Protocol 2 is the oldest with NEWOBJ (the opcode Dassl's own files use for Datum) and is read
# by every Python 3; newer protocols only add framing and opcodes these files do not need.
WRITE_PROTOCOL = 2

_INT32 = struct.Struct("<i")  # BININT payload
_UINT32 = struct.Struct("<I")  # BINUNICODE length, LONG_BINPUT / LONG_BINGET index
_BYTE_MEMO_LIMIT = 256  # memo indices below this fit the 1-byte BINPUT / BINGET forms
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1

# Builtin types a pickle of plain containers may name (e.g. ``builtins.set`` in protocol 2).
# Calling any of them with arbitrary arguments only builds a value.
_SAFE_BUILTINS = (dict, list, tuple, set, frozenset, str, int, float, bool, bytes)
_ALLOWED_GLOBALS: dict[tuple[str, str], type] = {
    (DASSL_DATUM_MODULE, DASSL_DATUM_NAME): Datum,
    (Datum.__module__, Datum.__qualname__): Datum,
    **{("builtins", t.__name__): t for t in _SAFE_BUILTINS},
}


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global that :class:`RestrictedUnpickler` does not allow."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only Datum classes and plain builtin types.

    Everything else (``os.system``, ``builtins.eval``, any class with side effects) raises
    :class:`pickle.UnpicklingError` naming the refused global, at the moment the pickle names
    it, so nothing of the payload runs. Persistent ids are refused by ``pickle.Unpickler``
    already (no ``persistent_load``).
    """

    def __init__(self, file: io.BufferedIOBase, source: str = "<pickle>") -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise RefusedGlobal(
                f"refused to unpickle global '{module}.{name}' from {self._source}: only "
                f"Datum records ({DASSL_DATUM_MODULE}.{DASSL_DATUM_NAME}, "
                f"{Datum.__module__}.{Datum.__qualname__}) and plain builtin containers are "
                "allowed"
            )
        return allowed


def loads_restricted(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source).load()


def read_datum_splits(path: str | os.PathLike[str], keys: Iterable[str]) -> dict[str, list[Datum]]:
    """Read a Dassl-style ``{split: [Datum, ...]}`` pickle safely and check its shape.

    Args:
        path: the ``.pkl`` file (written by Dassl/CoOp/DPT or by :func:`write_datum_splits`).
        keys: splits that must be present (others are ignored, as CoOp does).

    Raises:
        pickle.UnpicklingError: the file names a global other than a Datum or a builtin type.
        ValueError: the file is empty, truncated or not a pickle, or not a dict holding a list
            of Datum under each key.
    """
    path = Path(path)
    with path.open("rb") as file:
        try:
            obj = RestrictedUnpickler(file, str(path)).load()
        except RefusedGlobal:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError,
                KeyError, AttributeError, struct.error) as err:
            # What a corrupt stream raises depends on where it breaks: all mean "not readable".
            state = ("empty" if path.stat().st_size == 0
                     else "corrupt (truncated, or not a pickle of Datum lists)")
            raise ValueError(f"{path}: the file is {state} ({type(err).__name__}: "
                             f"{err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of Datum lists, got {type(obj).__name__}")
    out = {}
    for key in keys:
        if key not in obj:
            raise ValueError(f"{path}: missing split {key!r} (has {sorted(map(str, obj))})")
        items = obj[key]
        if not isinstance(items, list) or not all(isinstance(x, Datum) for x in items):
            raise ValueError(f"{path}: split {key!r} is not a list of Datum records")
        out[key] = items
    return out


def write_datum_splits(path: str | os.PathLike[str], splits: dict[str, list[Datum]]) -> None:
    """Write ``{split: [Datum, ...]}`` in Dassl's format, atomically.

    The file is written to a temporary sibling and moved into place with ``os.replace``, so a
    crash or a concurrent reader never sees a half-written file.
    """
    atomic_write_bytes(path, dumps_dassl_compatible(splits))


def dumps_dassl_compatible(obj: Any) -> bytes:
    """Pickle ``obj`` so that each :class:`Datum` loads as Dassl's ``Datum`` under Dassl.

    ``obj`` may nest dicts (str keys), lists, str, int, bool, None and :class:`Datum`. The
    output loads with plain ``pickle.load`` where Dassl is installed, and with
    :func:`loads_restricted` / :func:`read_datum_splits` anywhere.
    """
    return _DasslCompatWriter().dumps(obj)


class _DasslCompatWriter:
    """Emits pickle protocol 2 opcodes for the few shapes the Datum files hold.

    Strings and the Datum class are memoised (written once, then referenced), as Python's own
    pickler does, which keeps files with thousands of repeated class names small.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self._memo: dict[tuple[str, Any], int] = {}

    def dumps(self, obj: Any) -> bytes:
        self._out += pickle.PROTO + bytes([WRITE_PROTOCOL])
        self._save(obj)
        self._out += pickle.STOP
        return bytes(self._out)

    def _save(self, obj: Any) -> None:
        # Exact type checks: a subclass could carry state these opcodes would silently drop.
        if obj is None:
            self._out += pickle.NONE
        elif type(obj) is bool:
            self._out += pickle.NEWTRUE if obj else pickle.NEWFALSE
        elif type(obj) is int:
            self._save_int(obj)
        elif type(obj) is str:
            self._save_str(obj)
        elif type(obj) is list:
            self._save_list(obj)
        elif type(obj) is dict:
            self._save_dict(obj)
        elif type(obj) is Datum:
            self._save_datum(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} in a Dassl-compatible pickle")

    def _save_int(self, value: int) -> None:
        if not _INT32_MIN <= value <= _INT32_MAX:
            raise ValueError(f"integer {value} does not fit a 32-bit label/domain")
        self._out += pickle.BININT + _INT32.pack(value)

    def _save_str(self, value: str) -> None:
        if self._get(("str", value)):
            return
        data = value.encode("utf-8", "surrogatepass")  # what pickle does for lone surrogates
        self._out += pickle.BINUNICODE + _UINT32.pack(len(data)) + data
        self._put(("str", value))

    def _save_list(self, items: list[Any]) -> None:
        self._out += pickle.EMPTY_LIST
        if items:
            self._out += pickle.MARK
            for item in items:
                self._save(item)
            self._out += pickle.APPENDS

    def _save_dict(self, mapping: dict[Any, Any]) -> None:
        self._out += pickle.EMPTY_DICT
        if mapping:
            self._out += pickle.MARK
            for key, value in mapping.items():
                if type(key) is not str:
                    raise TypeError(f"dict keys must be str, got {type(key).__name__}")
                self._save(key)
                self._save(value)
            self._out += pickle.SETITEMS

    def _save_datum(self, datum: Datum) -> None:
        # copyreg.__newobj__ reconstruction, exactly as pickle writes a Dassl Datum.
        key = ("global", (DASSL_DATUM_MODULE, DASSL_DATUM_NAME))
        if not self._get(key):
            self._out += (pickle.GLOBAL + DASSL_DATUM_MODULE.encode("ascii") + b"\n"
                          + DASSL_DATUM_NAME.encode("ascii") + b"\n")
            self._put(key)
        self._out += pickle.EMPTY_TUPLE + pickle.NEWOBJ
        self._save_dict(datum.to_dassl_state())
        self._out += pickle.BUILD

    def _put(self, key: tuple[str, Any]) -> None:
        """Store the value on top of the stack in the next memo slot."""
        index = len(self._memo)
        self._memo[key] = index
        if index < _BYTE_MEMO_LIMIT:
            self._out += pickle.BINPUT + bytes([index])
        else:
            self._out += pickle.LONG_BINPUT + _UINT32.pack(index)

    def _get(self, key: tuple[str, Any]) -> bool:
        """Push a memoised value; False when ``key`` was not written yet."""
        index = self._memo.get(key)
        if index is None:
            return False
        if index < _BYTE_MEMO_LIMIT:
            self._out += pickle.BINGET + bytes([index])
        else:
            self._out += pickle.LONG_BINGET + _UINT32.pack(index)
        return True
