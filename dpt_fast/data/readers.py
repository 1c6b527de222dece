"""Readers of CoOp's on-disk dataset layouts (see CoOp's ``DATASETS.md``).

Each reader turns one dataset folder into :class:`RawSplits` (full train/val/test record lists,
absolute image paths) and nothing else: few-shot sampling, base/new subsampling and the registry
live in :mod:`dpt_fast.data.fewshot` and :mod:`dpt_fast.data.datasets`. A missing file or
folder raises :class:`MissingPathError`, which the registry turns into a message describing the
dataset's whole expected layout.

Where CoOp lists a directory with ``os.listdir`` (arbitrary order), names are sorted here so
the record order, and hence the few-shot draws, do not depend on the file system. The split
files (``split_zhou_*.json``, FGVC's ``.txt``) are read in their own order, as CoOp does, which
keeps the draws identical to CoOp's for those datasets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dpt_fast.data.pickling import read_datum_splits
from dpt_fast.data.records import Datum

# CoOp's EuroSAT class names (datasets/eurosat.py NEW_CNAMES): folder name -> prompt name.
# CoOp applies them only when it writes split_zhou_EuroSAT.json itself (from the folders); a
# split file is read as it is, whichever names it holds, and so is it here.
EUROSAT_NEW_CLASSNAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ENTRY_LEN = 3  # [relative path, label, class name]
FGVC_IMAGE_SUFFIX = ".jpg"  # FGVC's split files list image ids without the extension


class MissingPathError(FileNotFoundError):
    """A file or folder a dataset layout requires is missing (``filename`` names it)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"missing {path}")
        self.filename = str(path)


@dataclass
class RawSplits:
    """A dataset as read from disk, before few-shot sampling and class subsampling.

    ``val`` is None when the dataset has no validation split of its own (ImageNet, which uses
    its test split). ``classnames`` is None when it is to be derived from the records.
    """

    train: list[Datum]
    val: list[Datum] | None
    test: list[Datum]
    classnames: list[str] | None = None


def require_file(path: Path) -> Path:
    """Return ``path`` if it is a file, else raise :class:`MissingPathError`."""
    if not path.is_file():
        raise MissingPathError(path)
    return path


def require_dir(path: Path) -> Path:
    """Return ``path`` if it is a directory, else raise :class:`MissingPathError`."""
    if not path.is_dir():
        raise MissingPathError(path)
    return path


def list_subdirs(directory: Path) -> list[str]:
    """Sorted names of the non-hidden sub-directories (files such as README.txt are skipped)."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _hidden(e.name))


def list_files(directory: Path, suffixes: Iterable[str] | None = None) -> list[str]:
    """Sorted names of the non-hidden files, optionally only those with one of ``suffixes``
    (compared case-insensitively)."""
    wanted = None if suffixes is None else {s.lower() for s in suffixes}
    return sorted(
        e.name for e in os.scandir(directory)
        if e.is_file() and not _hidden(e.name)
        and (wanted is None or Path(e.name).suffix.lower() in wanted)
    )


def _hidden(name: str) -> bool:
    return name.startswith(".")  # Dassl's listdir_nohidden rule


def classnames_from_items(*splits: Sequence[Datum], source: str) -> list[str]:
    """Class names ordered by label, from the records (Dassl's ``get_lab2cname``).

    Raises:
        ValueError: a label has two names, or a label in ``0..max`` has no record.
    """
    names: dict[int, str] = {}
    for split in splits:
        for item in split:
            known = names.setdefault(item.label, item.classname)
            if known != item.classname:
                raise ValueError(
                    f"{source}: label {item.label} is named both {known!r} and "
                    f"{item.classname!r}"
                )
    if not names:
        return []
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing or min(names) < 0:
        raise ValueError(f"{source}: labels must be 0..{max(names)}; missing {missing[:10]}")
    return [names[label] for label in range(len(names))]


def read_coop_split(split_file: Path, image_dir: Path) -> RawSplits:
    """Read a ``split_zhou_*.json``: ``{"train"|"val"|"test": [[relpath, label, classname]]}``
    with paths relative to ``image_dir`` (CoOp's ``OxfordPets.read_split``)."""
    require_file(split_file)
    require_dir(image_dir)
    try:
        with split_file.open(encoding="utf-8") as file:
            split = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{split_file}: not a valid JSON split file ({err}); restore it from "
                         "the dataset's download (see CoOp's DATASETS.md)") from None
    if not isinstance(split, dict):
        raise ValueError(f"{split_file}: expected an object with keys {SPLIT_NAMES}")
    out = {}
    for name in SPLIT_NAMES:
        if name not in split:
            raise ValueError(f"{split_file}: missing split {name!r}")
        out[name] = [
            _split_entry(entry, index, name, split_file, image_dir)
            for index, entry in enumerate(split[name])
        ]
    return RawSplits(out["train"], out["val"], out["test"])


def _split_entry(entry: object, index: int, split: str, split_file: Path,
                 image_dir: Path) -> Datum:
    if not isinstance(entry, list | tuple) or len(entry) != _SPLIT_ENTRY_LEN:
        raise ValueError(
            f"{split_file}: {split}[{index}] must be [relpath, label, classname], got {entry!r}"
        )
    relpath, label, classname = entry
    if not isinstance(relpath, str) or not isinstance(classname, str):
        raise ValueError(f"{split_file}: {split}[{index}] has a non-string path or class name")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{split_file}: {split}[{index}] has the label {label!r}; labels must "
                         "be integers")
    return Datum(os.path.join(image_dir, relpath), label, classname)


def read_fgvc_aircraft(dataset_dir: Path) -> RawSplits:
    """FGVC-Aircraft's ``data/`` folder: ``variants.txt`` (one class per line, label = line
    index) and ``images_variant_{train,val,test}.txt`` (``<image id> <variant name>``)."""
    image_dir = require_dir(dataset_dir / "images")
    variants_file = require_file(dataset_dir / "variants.txt")
    classnames = [line.strip() for line in variants_file.read_text("utf-8").splitlines()]
    classnames = [name for name in classnames if name]
    label_of = {name: label for label, name in enumerate(classnames)}

    def read(split: str) -> list[Datum]:
        split_file = require_file(dataset_dir / f"images_variant_{split}.txt")
        items = []
        for number, line in enumerate(split_file.read_text("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in label_of:
                raise ValueError(f"{split_file}:{number}: unknown variant {variant!r}")
            impath = os.path.join(image_dir, image_id + FGVC_IMAGE_SUFFIX)
            items.append(Datum(impath, label_of[variant], variant))
        return items

    return RawSplits(read("train"), read("val"), read("test"), classnames)


def read_imagenet_classnames(text_file: Path) -> dict[str, str]:
    """CoOp's ImageNet ``classnames.txt``: ``<wnid> <class name words>`` per line, in order."""
    require_file(text_file)
    classnames: dict[str, str] = {}
    for line in text_file.read_text("utf-8").splitlines():
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            classnames[wnid] = name
    return classnames


def read_class_folders(split_dir: Path, folders: Sequence[str], label_of: dict[str, int],
                       classname_of: dict[str, str]) -> list[Datum]:
    """Records of ``split_dir/<folder>/<file>`` for each folder (files sorted, hidden skipped).

    Raises:
        ValueError: a folder has no label or no class name.
    """
    items: list[Datum] = []
    for folder in folders:
        if folder not in label_of or folder not in classname_of:
            raise ValueError(f"{split_dir / folder}: class folder not in the class list")
        class_dir = split_dir / folder
        label, classname = label_of[folder], classname_of[folder]
        items.extend(
            Datum(os.path.join(class_dir, name), label, classname) for name in list_files(class_dir)
        )
    return items


def read_imagenet(dataset_dir: Path) -> RawSplits:
    """ImageNet: ``images/train/<wnid>/`` and ``images/val/<wnid>/`` + ``classnames.txt``.

    Labels follow the sorted training folders (CoOp); the validation folders are labelled with
    the same mapping (CoOp enumerates them separately, which only agrees when both hold the
    same classes). The val folder is the test split and also serves as validation (``val`` is
    None). A ``preprocessed.pkl`` left by CoOp (``{"train", "test"}``) is read instead of the
    folders, with the restricted unpickler.
    """
    preprocessed = dataset_dir / "preprocessed.pkl"
    if preprocessed.is_file():
        cached = read_datum_splits(preprocessed, ("train", "test"))
        return RawSplits(cached["train"], None, cached["test"])
    classname_of = read_imagenet_classnames(dataset_dir / "classnames.txt")
    image_dir = dataset_dir / "images"
    train_dir, val_dir = require_dir(image_dir / "train"), require_dir(image_dir / "val")
    folders = list_subdirs(train_dir)
    label_of = {folder: label for label, folder in enumerate(folders)}
    train = read_class_folders(train_dir, folders, label_of, classname_of)
    test = read_class_folders(val_dir, list_subdirs(val_dir), label_of, classname_of)
    classnames = [classname_of[folder] for folder in folders]
    return RawSplits(train, None, test, classnames)


def read_imagenet_wnid_variant(dataset_dir: Path, image_subdir: str) -> RawSplits:
    """ImageNet-Sketch/-A/-R: ``<image_subdir>/<wnid>/`` + ImageNet's ``classnames.txt``.

    The classes are the wnid folders present, sorted, labelled 0.. (1000 for Sketch, the
    200-class subsets for -A and -R, exactly as CoOp labels them). Test-only.
    """
    classname_of = read_imagenet_classnames(dataset_dir / "classnames.txt")
    image_dir = require_dir(dataset_dir / image_subdir)
    folders = list_subdirs(image_dir)
    label_of = {folder: label for label, folder in enumerate(folders)}
    test = read_class_folders(image_dir, folders, label_of, classname_of)
    return RawSplits([], [], test, [classname_of[folder] for folder in folders])


def read_imagenetv2(dataset_dir: Path, image_subdir: str) -> RawSplits:
    """ImageNetV2: ``<image_subdir>/<label>/`` for label 0..999, named by the label-th line of
    ImageNet's ``classnames.txt``. Test-only."""
    classname_of = read_imagenet_classnames(dataset_dir / "classnames.txt")
    image_dir = require_dir(dataset_dir / image_subdir)
    classnames = list(classname_of.values())
    test: list[Datum] = []
    for label, classname in enumerate(classnames):
        class_dir = require_dir(image_dir / str(label))
        test.extend(
            Datum(os.path.join(class_dir, name), label, classname) for name in list_files(class_dir)
        )
    return RawSplits([], [], test, classnames)
