"""The labelled-image record shared by every dataset reader, sampler and loader.

:class:`Datum` carries the same public attributes as Dassl's ``Datum``
(``dassl.data.datasets.base_dataset.Datum``: ``impath``, ``label``, ``domain``, ``classname``),
so code written against Dassl's records reads ours unchanged. Two differences, on purpose:

* it is an immutable value (frozen dataclass, compared by value), so few-shot selections can be
  compared and hashed;
* it does not stat the image when it is created (Dassl asserts ``os.path.isfile`` in
  ``__init__``); a missing image is reported by the loader, naming the file.

Pickling: a :class:`Datum` pickles under its own class path (so DataLoader workers started with
``spawn`` can receive it without Dassl installed). Its ``__setstate__`` also accepts Dassl's
attribute layout (``_impath``, ``_label``, ``_domain``, ``_classname``), which is how Dassl-written
few-shot files are turned into ours (see :mod:`dpt_fast.data.pickling`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

# Where Dassl defines its record; few-shot files written by CoOp/DPT reference this class path.
DASSL_DATUM_MODULE = "dassl.data.datasets.base_dataset"
DASSL_DATUM_NAME = "Datum"

# Dassl stores each public attribute in a private slot of the same name with a leading "_".
_DASSL_PREFIX = "_"


@dataclass(frozen=True)
class Datum:
    """One labelled image.

    Attributes:
        impath: path of the image file (absolute for the dataset readers).
        label: 0-based class index.
        classname: the class name as the dataset writes it (underscores kept; prompts replace
            them with spaces).
        domain: domain index (always 0 for the CoOp datasets; kept for Dassl parity).
    """

    impath: str
    label: int
    classname: str
    domain: int = 0

    def __post_init__(self) -> None:
        _check_types(self.impath, self.label, self.classname, self.domain)

    def to_dassl_state(self) -> dict[str, Any]:
        """The instance ``__dict__`` Dassl's ``Datum`` would have for this record."""
        return {_DASSL_PREFIX + name: getattr(self, name) for name in _DASSL_FIELD_ORDER}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore from our own layout or from Dassl's (``_impath`` …), validating the values.

        Unpickling calls this on an instance made with ``object.__new__``; fields are set with
        ``object.__setattr__`` because the dataclass is frozen.
        """
        if not isinstance(state, dict):
            raise TypeError(f"Datum state must be a dict, got {type(state).__name__}")
        values = {}
        for f in fields(Datum):
            if f.name in state:
                values[f.name] = state[f.name]
            elif _DASSL_PREFIX + f.name in state:
                values[f.name] = state[_DASSL_PREFIX + f.name]
            elif f.name == "domain":
                values[f.name] = 0  # Dassl's default domain
            else:
                raise ValueError(f"Datum state lacks {f.name!r}: keys {sorted(state)}")
        known = {f.name for f in fields(Datum)} | {_DASSL_PREFIX + f.name for f in fields(Datum)}
        unknown = set(state) - known
        if unknown:
            raise ValueError(f"Datum state has unknown keys {sorted(unknown)}")
        _check_types(values["impath"], values["label"], values["classname"], values["domain"])
        for name, value in values.items():
            object.__setattr__(self, name, value)


# The order in which Dassl's __init__ assigns its attributes, i.e. its instance __dict__ order.
_DASSL_FIELD_ORDER = ("impath", "label", "domain", "classname")


def _check_types(impath: object, label: object, classname: object, domain: object) -> None:
    """Reject values of the wrong type early: a record built from a bad split file or pickle
    should fail where it is made, not deep inside a training step."""
    if not isinstance(impath, str):
        raise TypeError(f"Datum.impath must be a str, got {type(impath).__name__}")
    # bool is an int subclass; a True/False label is always a bug.
    for name, value in (("label", label), ("domain", domain)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"Datum.{name} must be an int, got {type(value).__name__}")
    if not isinstance(classname, str):
        raise TypeError(f"Datum.classname must be a str, got {type(classname).__name__}")
