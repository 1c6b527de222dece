"""The dataset registry: CoOp's 11 few-shot datasets, the 4 ImageNet variants, image folders.

``build_dataset(name, root, shots, seed, subsample)`` reproduces what CoOp/DPT's Dassl dataset
classes hand to the trainer: the fixed CoOp split read from ``root`` (see CoOp's
``DATASETS.md`` for the layouts), the cached or freshly drawn few-shot selection
(``split_fewshot/shot_{K}-seed_{S}.pkl``), then the base/new class half. Each dataset carries
the authors' hand-crafted prompt template (``CUSTOM_TEMPLATES`` in ``trainers/DPT.py``).

Registry keys are the file names of the authors' ``configs/datasets/*.yaml``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dpt_fast.data import readers
from dpt_fast.data.fewshot import (
    SUBSAMPLE_CHOICES,
    Subsample,
    load_or_create_fewshot,
    sample_fewshot_splits,
    select_subsample_labels,
    split_by_label,
    subsample_classes,
)
from dpt_fast.data.readers import MissingPathError, RawSplits
from dpt_fast.data.records import Datum

log = logging.getLogger("dpt_fast")

DEFAULT_TEMPLATE = "a photo of a {}."
# CoOp's split_trainval default: 20% of each class's training images become validation.
DEFAULT_VAL_FRACTION = 0.2
# Fixed seed of the train/val carve-out in image folders, so validation is the same whatever
# the run seed (CoOp fixes it once in its split files).
FOLDER_VAL_SPLIT_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class DatasetSplits:
    """A dataset ready for training and evaluation.

    Attributes:
        name: registry name (or the folder name for :func:`image_folder_dataset`).
        classnames: class names ordered by label (after base/new subsampling).
        template: hand-crafted prompt with one ``{}`` for the class name.
        train, val, test: the records; test-only datasets have empty ``train`` and ``val``.
    """

    name: str
    classnames: list[str]
    template: str
    train: list[Datum] = field(repr=False)
    val: list[Datum] = field(repr=False)
    test: list[Datum] = field(repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset.

    Attributes:
        name: registry key (the authors' config file name).
        dassl_name: the authors' ``DATASET.NAME`` (Dassl class name).
        folder: the dataset's folder under the data root.
        template: the authors' hand-crafted prompt template.
        layout: the expected layout, ``<root>`` standing for the data root.
        read: reads the dataset folder.
        test_only: a distribution-shift target with a test split only (no few-shot, no
            base/new split; CoOp ignores both for these).
    """

    name: str
    dassl_name: str
    folder: str
    template: str
    layout: str
    read: Callable[[Path], RawSplits]
    test_only: bool = False


def _coop_split(image_subdir: str, split_file: str) -> Callable[[Path], RawSplits]:
    """Reader of a dataset described by a CoOp split file (paths relative to image_subdir;
    "" is the dataset folder itself, as for Stanford Cars)."""
    def read(dataset_dir: Path) -> RawSplits:
        return readers.read_coop_split(dataset_dir / split_file, dataset_dir / image_subdir)
    return read


_EUROSAT_FOLDER_NAMES = frozenset(k for k, v in readers.EUROSAT_NEW_CLASSNAMES.items() if k != v)
_warned_eurosat: set[Path] = set()


def _read_eurosat(dataset_dir: Path) -> RawSplits:
    """EuroSAT's split file, its class names as written, as CoOp reads it: folder names
    ("AnnualCrop") or CoOp's prompt names ("Annual Crop Land") alike. Folder names are worth a
    warning, once per file: they change the prompts, so the accuracy differs from runs on a
    split file with CoOp's names."""
    raw = _coop_split("2750", "split_zhou_EuroSAT.json")(dataset_dir)
    named = sorted({item.classname for item in raw.train + raw.test} & _EUROSAT_FOLDER_NAMES)
    split_file = dataset_dir / "split_zhou_EuroSAT.json"
    if named and split_file not in _warned_eurosat:
        _warned_eurosat.add(split_file)
        log.warning("%s names classes by their folders (%s): the prompts use these names, as "
                    "CoOp's do with this file; the split CoOp writes itself names them %s",
                    split_file,
                    ", ".join(named[:3]) + (", ..." if len(named) > 3 else ""),
                    ", ".join(repr(readers.EUROSAT_NEW_CLASSNAMES[n]) for n in named[:3]))
    return raw


_SEE = " (see CoOp's DATASETS.md)"
_IMAGENET_CLASSNAMES = "classnames.txt (copied from <root>/imagenet/)"

_SPECS = (
    DatasetSpec(
        "imagenet", "ImageNet", "imagenet", "a photo of a {}.",
        "<root>/imagenet/images/{train,val}/<wnid>/<image> (val sorted into wnid folders) and "
        "<root>/imagenet/classnames.txt" + _SEE,
        readers.read_imagenet),
    DatasetSpec(
        "caltech101", "Caltech101", "caltech-101", "a photo of a {}.",
        "<root>/caltech-101/101_ObjectCategories/<class>/<image>.jpg and "
        "<root>/caltech-101/split_zhou_Caltech101.json" + _SEE,
        _coop_split("101_ObjectCategories", "split_zhou_Caltech101.json")),
    DatasetSpec(
        "oxford_pets", "OxfordPets", "oxford_pets", "a photo of a {}, a type of pet.",
        "<root>/oxford_pets/images/*.jpg and <root>/oxford_pets/split_zhou_OxfordPets.json"
        + _SEE,
        _coop_split("images", "split_zhou_OxfordPets.json")),
    DatasetSpec(
        "stanford_cars", "StanfordCars", "stanford_cars", "a photo of a {}.",
        "<root>/stanford_cars/{cars_train,cars_test}/*.jpg and "
        "<root>/stanford_cars/split_zhou_StanfordCars.json" + _SEE,
        _coop_split("", "split_zhou_StanfordCars.json")),
    DatasetSpec(
        "oxford_flowers", "OxfordFlowers", "oxford_flowers", "a photo of a {}, a type of flower.",
        "<root>/oxford_flowers/jpg/*.jpg and <root>/oxford_flowers/split_zhou_OxfordFlowers.json"
        + _SEE,
        _coop_split("jpg", "split_zhou_OxfordFlowers.json")),
    DatasetSpec(
        "food101", "Food101", "food-101", "a photo of {}, a type of food.",
        "<root>/food-101/images/<class>/*.jpg and <root>/food-101/split_zhou_Food101.json"
        + _SEE,
        _coop_split("images", "split_zhou_Food101.json")),
    DatasetSpec(
        "fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "a photo of a {}, a type of aircraft.",
        "<root>/fgvc_aircraft/images/*.jpg, <root>/fgvc_aircraft/variants.txt and "
        "<root>/fgvc_aircraft/images_variant_{train,val,test}.txt (the data/ folder of "
        "fgvc-aircraft-2013b)" + _SEE,
        readers.read_fgvc_aircraft),
    DatasetSpec(
        "sun397", "SUN397", "sun397", "a photo of a {}.",
        "<root>/sun397/SUN397/<letter>/<class>/*.jpg and <root>/sun397/split_zhou_SUN397.json"
        + _SEE,
        _coop_split("SUN397", "split_zhou_SUN397.json")),
    DatasetSpec(
        "dtd", "DescribableTextures", "dtd", "{} texture.",
        "<root>/dtd/images/<class>/*.jpg and <root>/dtd/split_zhou_DescribableTextures.json"
        + _SEE,
        _coop_split("images", "split_zhou_DescribableTextures.json")),
    DatasetSpec(
        "eurosat", "EuroSAT", "eurosat", "a centered satellite photo of {}.",
        "<root>/eurosat/2750/<class>/*.jpg and <root>/eurosat/split_zhou_EuroSAT.json" + _SEE,
        _read_eurosat),
    DatasetSpec(
        "ucf101", "UCF101", "ucf101", "a photo of a person doing {}.",
        "<root>/ucf101/UCF-101-midframes/<action>/*.jpg and "
        "<root>/ucf101/split_zhou_UCF101.json" + _SEE,
        _coop_split("UCF-101-midframes", "split_zhou_UCF101.json")),
    DatasetSpec(
        "imagenetv2", "ImageNetV2", "imagenetv2", "a photo of a {}.",
        "<root>/imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/<image> and "
        "<root>/imagenetv2/" + _IMAGENET_CLASSNAMES + _SEE,
        partial(readers.read_imagenetv2, image_subdir="imagenetv2-matched-frequency-format-val"),
        test_only=True),
    DatasetSpec(
        "imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "a photo of a {}.",
        "<root>/imagenet-sketch/images/<wnid>/<image> and <root>/imagenet-sketch/"
        + _IMAGENET_CLASSNAMES + _SEE,
        partial(readers.read_imagenet_wnid_variant, image_subdir="images"),
        test_only=True),
    DatasetSpec(
        "imagenet_a", "ImageNetA", "imagenet-adversarial", "a photo of a {}.",
        "<root>/imagenet-adversarial/imagenet-a/<wnid>/<image> (200 classes) and "
        "<root>/imagenet-adversarial/" + _IMAGENET_CLASSNAMES + _SEE,
        partial(readers.read_imagenet_wnid_variant, image_subdir="imagenet-a"),
        test_only=True),
    DatasetSpec(
        "imagenet_r", "ImageNetR", "imagenet-rendition", "a photo of a {}.",
        "<root>/imagenet-rendition/imagenet-r/<wnid>/<image> (200 classes) and "
        "<root>/imagenet-rendition/" + _IMAGENET_CLASSNAMES + _SEE,
        partial(readers.read_imagenet_wnid_variant, image_subdir="imagenet-r"),
        test_only=True),
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in _SPECS}


def get_dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of ``name``; unknown names raise ``KeyError`` listing the valid ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}"
        ) from None


def build_dataset(name: str, root: str | os.PathLike[str], shots: int = -1, seed: int = 1,
                  subsample: Subsample = "all", *,
                  index: DatasetIndex | None = None) -> DatasetSplits:
    """Read dataset ``name`` from ``root`` as CoOp/DPT do.

    Args:
        name: a key of :data:`DATASETS`.
        root: the data root holding the dataset folders (CoOp's ``DATASET.ROOT``).
        shots: shots per class for the training split (validation gets ``min(shots, 4)``);
            below 1 keeps the full splits. The selection is read from / written to
            ``<dataset>/split_fewshot/shot_{shots}-seed_{seed}.pkl``, compatible with CoOp's.
            Ignored for the test-only ImageNet variants, as in CoOp.
        seed: the run seed that names and draws the few-shot selection.
        subsample: "all", or the "base" / "new" half of the classes (relabelled 0..).
        index: the dataset's index read before (:func:`read_dataset_index`); None reads it.

    Raises:
        KeyError: unknown name (the message lists the valid ones).
        FileNotFoundError: a file or folder of the layout is missing; the message names it and
            describes the expected layout.
        ValueError: bad ``subsample``, or ``subsample`` other than "all" for a test-only set.
    """
    if subsample not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample must be one of {SUBSAMPLE_CHOICES}, got {subsample!r}")
    index = index if index is not None else read_dataset_index(name, root)
    if index.name != name:
        raise ValueError(f"the index given is {index.name}'s, not {name}'s")
    spec, raw, classnames = index.spec, index.raw, index.classnames
    if spec.test_only and subsample != "all":
        raise ValueError(f"{name} is a test-only dataset; base/new subsampling does not apply")
    if spec.test_only:
        return DatasetSplits(name, classnames, spec.template, [], [], raw.test)

    train, val = load_or_create_fewshot(index.dataset_dir, raw.train, raw.val, shots, seed,
                                        classnames)
    return _finish(name, spec.template, classnames, train, val, raw.test, subsample)


@dataclass(frozen=True)
class DatasetIndex:
    """A dataset's files and labels as its layout lists them, before any few-shot draw: what
    every run on the dataset reads, whatever its shots, seed and class half (a sweep reads it
    once; :func:`build_dataset` takes it)."""

    name: str
    spec: DatasetSpec
    dataset_dir: Path
    raw: RawSplits
    classnames: list[str]


def read_dataset_index(name: str, root: str | os.PathLike[str]) -> DatasetIndex:
    """Read the index of dataset ``name`` under ``root`` (see :func:`build_dataset`)."""
    spec = get_dataset_spec(name)
    # CoOp uses abspath (not resolve): symlinked dataset folders keep the paths users gave.
    root_dir = Path(os.path.abspath(os.path.expanduser(root)))
    dataset_dir = root_dir / spec.folder
    try:
        readers.require_dir(dataset_dir)  # name the dataset folder itself when it is absent
        raw = spec.read(dataset_dir)
    except MissingPathError as exc:
        raise FileNotFoundError(
            f"{name}: missing {exc.filename}; expected {spec.layout}, with <root> = {root_dir}"
        ) from None
    classnames = raw.classnames
    if classnames is None:
        classnames = readers.classnames_from_items(
            raw.train, raw.val or [], raw.test, source=str(dataset_dir))
    return DatasetIndex(name, spec, dataset_dir, raw, list(classnames))


def _finish(name: str, template: str, classnames: list[str], train: list[Datum],
            val: list[Datum] | None, test: list[Datum], subsample: Subsample) -> DatasetSplits:
    """Apply the base/new split; ``val=None`` means validation is the test split."""
    selected = select_subsample_labels([item.label for item in train], subsample)
    if val is None:
        train, test = subsample_classes(train, test, subsample=subsample)
        val = test
    else:
        train, val, test = subsample_classes(train, val, test, subsample=subsample)
    if subsample != "all":
        classnames = [classnames[label] for label in selected]
    return DatasetSplits(name, list(classnames), template, train, val, test)


def image_folder_dataset(
    root: str | os.PathLike[str],
    shots: int = -1,
    seed: int = 1,
    template: str = DEFAULT_TEMPLATE,
    val_fraction: float = DEFAULT_VAL_FRACTION,
) -> DatasetSplits:
    """A dataset from a plain ``root/{train,val,test}/<class name>/<image>`` tree.

    Rules:

    * ``root/train/`` is required. Its sub-folders are the classes, labelled in sorted order,
      named by the folder name (underscores kept; prompts show them as spaces). Every class
      needs at least one training image.
    * Images are the non-hidden files with an image suffix (``IMAGE_SUFFIXES``, any case),
      sorted by name; other files are skipped.
    * ``root/val/`` is optional. Without it, ``val_fraction`` of each class's training images
      (rounded, leaving at least one for training) become validation, drawn with a fixed seed
      so that validation does not change with ``seed``.
    * ``root/test/`` is optional. Without it, the validation split is also the test split.
    * Class folders under ``val/`` or ``test/`` must also exist under ``train/``; classes may
      be missing there.
    * ``shots >= 1`` keeps ``shots`` training and ``min(shots, 4)`` validation images per
      class, drawn as CoOp does from ``random.Random(seed)``; nothing is written under ``root``.

    Raises:
        FileNotFoundError: ``root/train`` is missing.
        ValueError: a class folder is empty, unknown in val/test, or ``val_fraction`` is
            outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    root_dir = Path(os.path.abspath(os.path.expanduser(root)))
    train_dir = root_dir / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(
            f"missing {train_dir}; expected <root>/train/<class>/<image> (optional "
            f"<root>/val/<class>/<image> and <root>/test/<class>/<image>), with <root> = "
            f"{root_dir}"
        )
    classnames = readers.list_subdirs(train_dir)
    label_of = {name: label for label, name in enumerate(classnames)}
    train = _read_image_folders(train_dir, label_of, require_images=True)
    if (root_dir / "val").is_dir():
        val = _read_image_folders(root_dir / "val", label_of)
    else:
        train, val = _carve_val(train, val_fraction)
    if (root_dir / "test").is_dir():
        test = _read_image_folders(root_dir / "test", label_of)
    else:
        test = list(val)
    if shots >= 1:
        train, val_fs = sample_fewshot_splits(train, val, shots, seed)
        val = val_fs if val_fs is not None else []
    return DatasetSplits(root_dir.name, classnames, template, train, val, test)


def _read_image_folders(split_dir: Path, label_of: dict[str, int],
                        require_images: bool = False) -> list[Datum]:
    items: list[Datum] = []
    for folder in readers.list_subdirs(split_dir):
        if folder not in label_of:
            raise ValueError(f"{split_dir / folder}: class folder not found under train/")
        names = readers.list_files(split_dir / folder, IMAGE_SUFFIXES)
        if require_images and not names:
            raise ValueError(f"{split_dir / folder}: no images (suffixes {IMAGE_SUFFIXES})")
        items.extend(Datum(os.path.join(split_dir, folder, name), label_of[folder], folder)
                     for name in names)
    return items


def _carve_val(train: list[Datum], val_fraction: float) -> tuple[list[Datum], list[Datum]]:
    """Move ``round(n * val_fraction)`` images per class to validation (CoOp's
    ``split_trainval``), keeping at least one training image per class."""
    rng = random.Random(FOLDER_VAL_SPLIT_SEED)
    kept: list[Datum] = []
    val: list[Datum] = []
    for items in split_by_label(train).values():
        order = list(range(len(items)))
        rng.shuffle(order)
        n_val = min(round(len(items) * val_fraction), len(items) - 1)
        val_idx = set(order[:n_val])
        kept.extend(x for i, x in enumerate(items) if i not in val_idx)
        val.extend(x for i, x in enumerate(items) if i in val_idx)
    return kept, val
