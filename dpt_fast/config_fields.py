"""What each configuration field is for, declared once on the field and read everywhere.

A field's roles sit in its metadata (``x: int = with_roles(3, RESUMABLE)``); the CLI, checkpoint
loading, resuming, ``dpt-fast eval`` and ``dpt-fast report`` ask :func:`fields_with` instead of
keeping lists of names. :func:`config_diff` is the one comparison of two configs they all use.

Roles of :class:`~dpt_fast.config.DPTConfig` fields:

* ``LOSS_ONLY``: shapes only the objective; prompts trained with another value still fit.
* ``INIT_ONLY``: only sets initial values that loading a state_dict overwrites.
* ``PER_DATASET``: belongs to the dataset at hand, not to the learned prompts (the template
  builds the frozen hand-crafted text features), so an evaluation may change it.
* ``REPORT_KEY``: a column of ``dpt-fast report``'s table (also on TrainConfig fields).

Roles of :class:`~dpt_fast.engine.config.TrainConfig` fields:

* ``RESUMABLE``: may differ when a run is resumed (where data and outputs live, how data is
  loaded and evaluated); every other field shapes the training and must match.
* ``EVAL``: a flag of ``dpt-fast eval`` too.
* ``REPEAT``: tells repetitions of one experiment apart (the seed): ``dpt-fast report``
  averages over it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ROLES_KEY = "dpt_fast.roles"

LOSS_ONLY = "loss_only"
INIT_ONLY = "init_only"
PER_DATASET = "per_dataset"
REPORT_KEY = "report_key"
RESUMABLE = "resumable"
EVAL = "eval"
REPEAT = "repeat"


def roles(*names: str) -> dict[str, frozenset[str]]:
    """``metadata`` for ``dataclasses.field``: the roles of a field."""
    return {ROLES_KEY: frozenset(names)}


def with_roles(default: Any = dataclasses.MISSING, *names: str,
               default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with this default (or factory) and these roles."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata=roles(*names))


def field_roles(field: dataclasses.Field) -> frozenset[str]:
    return field.metadata.get(ROLES_KEY, frozenset())


def fields_with(cls: type, role: str) -> frozenset[str]:
    """Names of the fields of dataclass ``cls`` that have ``role``."""
    return frozenset(f.name for f in dataclasses.fields(cls) if role in field_roles(f))


def defaults(cls: type) -> dict[str, Any]:
    """The default value of every field of ``cls`` (nested dataclasses as dicts)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            continue
        is_instance = dataclasses.is_dataclass(value) and not isinstance(value, type)
        out[f.name] = dataclasses.asdict(value) if is_instance else value
    return out


@dataclass(frozen=True)
class FieldChange:
    """One field whose value differs between two configs (``name`` dotted when nested)."""

    name: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.name}: {self.old!r} -> {self.new!r}"


def config_diff(cls: type, old: dict, new: dict, *, skip_roles: Iterable[str] = (),
                skip: Iterable[str] = (), prefix: str = "") -> list[FieldChange]:
    """The fields of dataclass ``cls`` whose values differ between the dicts ``old`` and ``new``
    (``dataclasses.asdict`` form), sorted by name, nested dataclass fields compared field by
    field (named ``model.alpha``). A field missing from either dict counts as its default (an
    older checkpoint lacks the fields added since). Fields with one of ``skip_roles`` or named
    in ``skip`` (at any depth) are left out; keys that are not fields of ``cls`` are ignored.
    """
    skip_roles, skip = frozenset(skip_roles), frozenset(skip)
    default_values = defaults(cls)
    hints = typing.get_type_hints(cls)
    changes: list[FieldChange] = []
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name):
        if f.name in skip or field_roles(f) & skip_roles:
            continue
        before = old.get(f.name, default_values.get(f.name))
        after = new.get(f.name, default_values.get(f.name))
        inner = hints[f.name]
        if isinstance(inner, type) and dataclasses.is_dataclass(inner) \
                and isinstance(before, dict) \
                and isinstance(after, dict):
            changes += config_diff(inner, before, after, skip_roles=skip_roles, skip=skip,
                                   prefix=f"{prefix}{f.name}.")
        elif before != after:
            changes.append(FieldChange(prefix + f.name, before, after))
    return changes

