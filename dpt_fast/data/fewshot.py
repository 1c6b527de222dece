"""Few-shot sampling and base/new class splits, drawing exactly what Dassl/CoOp draw.

Dassl's ``DatasetBase.generate_fewshot_dataset`` groups the records by label (a
``defaultdict``, so labels in order of first appearance) and calls ``random.sample(items, K)``
per label on the *global* ``random`` module, which CoOp's ``train.py`` seeds with
``random.seed(cfg.SEED)`` before the dataset is built. CoOp's datasets then sample the training
split with K shots and, from the same stream, the validation split with ``min(K, 4)`` shots, and
cache both in ``split_fewshot/shot_{K}-seed_{S}.pkl``.

Here the stream is a ``random.Random(seed)``, which yields the same numbers as the global
module after ``random.seed(seed)`` (the module functions are bound methods of one hidden
``Random``), without touching global state.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

from dpt_fast.data.pickling import RefusedGlobal, read_datum_splits, write_datum_splits
from dpt_fast.data.records import Datum

# CoOp samples at most this many validation images per class (``min(num_shots, 4)``).
MAX_VAL_SHOTS = 4
FEWSHOT_DIRNAME = "split_fewshot"

Subsample = Literal["all", "base", "new"]
SUBSAMPLE_CHOICES: tuple[str, ...] = ("all", "base", "new")

RandomSource = random.Random | int | None


def split_by_label(items: Sequence[Datum]) -> dict[int, list[Datum]]:
    """Group records by label, labels in order of first appearance (Dassl's defaultdict)."""
    groups: defaultdict[int, list[Datum]] = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return dict(groups)


class _Sampler(Protocol):
    """What the draws need: a ``random.Random`` or the ``random`` module itself."""

    def sample(self, population: Sequence[Datum], k: int) -> list[Datum]: ...

    def choices(self, population: Sequence[Datum], *, k: int) -> list[Datum]: ...


def _sampler(rng: RandomSource) -> _Sampler:
    """An instance is used as is, an int seeds a fresh ``Random``, None is the global module
    (whose draws advance global state exactly as Dassl's calls to ``random.sample`` do)."""
    if isinstance(rng, random.Random):
        return rng
    if rng is None:
        return random  # the module's functions match _Sampler
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise TypeError(f"rng must be a random.Random, an int seed or None, got {type(rng).__name__}")


def generate_fewshot(
    items: Sequence[Datum], num_shots: int, rng: RandomSource = None, repeat: bool = False
) -> list[Datum]:
    """Sample ``num_shots`` records per class, as Dassl's ``generate_fewshot_dataset``.

    Args:
        items: the split to sample from.
        num_shots: shots per class; below 1 returns every record (Dassl's convention).
        rng: a ``random.Random`` (advanced in place), an int seed (a fresh ``Random(seed)``)
            or None (the global ``random`` module, exactly Dassl's behaviour).
        repeat: for classes with fewer than ``num_shots`` records, draw with replacement up to
            ``num_shots`` (``random.choices``); otherwise such classes keep all their records.

    Returns:
        The sampled records, class by class in order of first appearance, each class in the
        order ``random.sample`` returns.
    """
    if num_shots < 1:
        return list(items)
    source = _sampler(rng)
    sampled: list[Datum] = []
    for group in split_by_label(items).values():
        if len(group) >= num_shots:
            sampled.extend(source.sample(group, num_shots))
        elif repeat:
            sampled.extend(source.choices(group, k=num_shots))
        else:
            sampled.extend(group)
    return sampled


def sample_fewshot_splits(
    train: Sequence[Datum], val: Sequence[Datum] | None, shots: int, seed: int
) -> tuple[list[Datum], list[Datum] | None]:
    """CoOp's draw: train with ``shots``, then val with ``min(shots, 4)``, one seeded stream.

    The order matters: val's draws continue the stream that train's left off. ``val=None``
    (ImageNet, whose validation set is its test set) samples the training split only.
    """
    rng = random.Random(seed)
    train_fs = generate_fewshot(train, shots, rng)
    val_fs = None if val is None else generate_fewshot(val, min(shots, MAX_VAL_SHOTS), rng)
    return train_fs, val_fs


def fewshot_path(dataset_dir: str | os.PathLike[str], shots: int, seed: int) -> Path:
    """CoOp's cache file: ``<dataset_dir>/split_fewshot/shot_{K}-seed_{S}.pkl``."""
    return Path(dataset_dir) / FEWSHOT_DIRNAME / f"shot_{shots}-seed_{seed}.pkl"


def load_or_create_fewshot(
    dataset_dir: str | os.PathLike[str],
    train: Sequence[Datum],
    val: Sequence[Datum] | None,
    shots: int,
    seed: int,
    classnames: Sequence[str] | None = None,
) -> tuple[list[Datum], list[Datum] | None]:
    """Read the cached few-shot selection, or draw it and cache it, as CoOp's datasets do.

    A cached file (ours or one written by CoOp/DPT through Dassl) is read with the restricted
    unpickler and wins over a fresh draw, so runs reuse exactly the images of earlier runs.
    Otherwise :func:`sample_fewshot_splits` draws and the result is written atomically as
    ``{"train": [...], "val": [...]}`` (``{"train": [...]}`` when ``val`` is None, as CoOp's
    ImageNet). Caching is an optimisation: if the directory is not writable the draw is used
    with a warning (it is a pure function of the inputs and the seed).

    A cached file must belong to this dataset: readable, every label in range, its class name
    the dataset's (``classnames``, when given) and its image inside ``dataset_dir``. The
    records hold absolute image paths, as Dassl's do, so a cache copied from another machine
    or written before the data moved fails the last check.

    Returns:
        ``(train, val)``; with ``shots < 1`` the inputs unchanged (no file is read or written).

    Raises:
        ValueError: the cached file is unreadable or does not belong to this dataset; the
            message names it and says that deleting it makes the next run draw it again.
    """
    if shots < 1:
        return list(train), None if val is None else list(val)
    path = fewshot_path(dataset_dir, shots, seed)
    keys = ("train",) if val is None else ("train", "val")
    if path.is_file():
        try:
            cached = read_datum_splits(path, keys)
            for key in keys:
                check_records_belong(cached[key], dataset_dir, classnames, f"{path} [{key}]")
        except (ValueError, RefusedGlobal) as err:
            # Same type (a refused global stays an UnpicklingError), with the fix added.
            raise type(err)(f"{err}; delete {path} and the next run draws and caches the "
                            "few-shot split again") from None
        return cached["train"], cached.get("val")
    train_fs, val_fs = sample_fewshot_splits(train, val, shots, seed)
    splits = {"train": train_fs} if val_fs is None else {"train": train_fs, "val": val_fs}
    try:
        write_datum_splits(path, splits)
    except OSError as exc:
        warnings.warn(f"could not cache the few-shot split at {path}: {exc}", stacklevel=2)
    return train_fs, val_fs


def check_records_belong(items: Sequence[Datum], dataset_dir: str | os.PathLike[str],
                         classnames: Sequence[str] | None, source: str) -> None:
    """Raise ValueError (naming ``source``) unless every record's label is in range, its class
    name is the dataset's for that label, and its image lies inside ``dataset_dir``."""
    folder = os.path.abspath(dataset_dir)
    for index, item in enumerate(items):
        if classnames is not None:
            if not 0 <= item.label < len(classnames):
                raise ValueError(f"{source}: record {index} has label {item.label}, outside "
                                 f"0..{len(classnames) - 1} of this dataset")
            if item.classname != classnames[item.label]:
                raise ValueError(f"{source}: record {index} names class {item.label} "
                                 f"{item.classname!r}, this dataset {classnames[item.label]!r}")
        path = os.path.abspath(item.impath)
        if os.path.commonpath([folder, path]) != folder:
            raise ValueError(f"{source}: record {index}'s image {item.impath} is not inside "
                             f"the dataset folder {folder}")


def select_subsample_labels(labels: Sequence[int], subsample: Subsample) -> list[int]:
    """CoOp's base/new halves of the sorted distinct labels: base gets ``ceil(n / 2)``."""
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    distinct = sorted(set(labels))
    if subsample == "all":
        return distinct
    n_base = math.ceil(len(distinct) / 2)
    return distinct[:n_base] if subsample == "base" else distinct[n_base:]


def subsample_classes(
    *splits: Sequence[Datum], subsample: Subsample = "all"
) -> tuple[list[Datum], ...]:
    """Keep the base or new half of the classes and relabel them 0.., as CoOp's
    ``OxfordPets.subsample_classes``.

    The classes are those of the first split (the training split); every split keeps only
    those classes, relabelled in sorted order. ``"all"`` returns the splits unchanged.
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    if subsample == "all" or not splits:
        return tuple(list(split) for split in splits)
    selected = select_subsample_labels([item.label for item in splits[0]], subsample)
    relabel = {old: new for new, old in enumerate(selected)}
    return tuple(
        [
            Datum(item.impath, relabel[item.label], item.classname, item.domain)
            for item in split
            if item.label in relabel
        ]
        for split in splits
    )
