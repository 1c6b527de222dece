"""Tiny on-disk copies of CoOp's dataset layouts, for the tests of :mod:`dpt_fast.data`.

Each ``make_*`` function writes a few 8x8 images per class in the dataset's real layout (the
folder names, split files and file formats of CoOp's ``DATASETS.md``) and returns an
:class:`ExpectedTree`: the records ``build_dataset`` must produce, split by split, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from dpt_fast.data import Datum

IMAGE_SIDE = 8  # pixels; the readers never decode images, the loader tests do
SPLITS = ("train", "val", "test")
# Images per class and split, different per class so that counts and few-shot edge cases
# (a class with fewer images than the shots) are visible.
PER_CLASS = {"train": (5, 3, 1), "val": (2, 1, 3), "test": (1, 2, 2)}

Record = tuple[str, int, str]  # (absolute image path, label, class name)


@dataclass
class ExpectedTree:
    """What a reader must return for the tree a fixture wrote."""

    classnames: list[str]
    splits: dict[str, list[Record]] = field(default_factory=dict)

    def count(self, split: str) -> int:
        return len(self.splits[split])


def write_image(path: Path, value: int = 128, image_format: str | None = None) -> Path:
    """An ``IMAGE_SIDE``-square solid RGB image (JPEG or PNG by suffix unless given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (value, value // 2, 255 - value)).save(
        path, format=image_format
    )
    return path


# --- datasets described by a CoOp split file: split_zhou_*.json -------------------------------

@dataclass(frozen=True)
class SplitLayout:
    """A dataset read from ``<folder>/<split_file>`` with paths relative to ``image_subdir``.

    ``classes`` holds, per class, the name written in the split file, the name the reader must
    return, and a pattern of the image path (``{split}``, ``{i}`` are filled in).
    """

    folder: str
    image_subdir: str
    split_file: str
    classes: tuple[tuple[str, str, str], ...]


SPLIT_LAYOUTS: dict[str, SplitLayout] = {
    "caltech101": SplitLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", (
        ("accordion", "accordion", "accordion/image_{split}{i:04d}.jpg"),
        ("face", "face", "Faces/image_{split}{i:04d}.jpg"),
        ("leopard", "leopard", "Leopards/image_{split}{i:04d}.jpg"),
    )),
    "oxford_pets": SplitLayout("oxford_pets", "images", "split_zhou_OxfordPets.json", (
        ("abyssinian", "abyssinian", "Abyssinian_{split}{i}.jpg"),
        ("american_bulldog", "american_bulldog", "american_bulldog_{split}{i}.jpg"),
        ("beagle", "beagle", "beagle_{split}{i}.jpg"),
    )),
    "stanford_cars": SplitLayout("stanford_cars", "", "split_zhou_StanfordCars.json", (
        ("2012 Audi TTS Coupe", "2012 Audi TTS Coupe", "cars_{split}/0{i}001.jpg"),
        ("2007 BMW X5 SUV", "2007 BMW X5 SUV", "cars_{split}/0{i}002.jpg"),
        ("2012 Tesla Model S", "2012 Tesla Model S", "cars_{split}/0{i}003.jpg"),
    )),
    "oxford_flowers": SplitLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", (
        ("pink primrose", "pink primrose", "image_{split}1{i:03d}.jpg"),
        ("hard-leaved pocket orchid", "hard-leaved pocket orchid", "image_{split}2{i:03d}.jpg"),
        ("canterbury bells", "canterbury bells", "image_{split}3{i:03d}.jpg"),
    )),
    "food101": SplitLayout("food-101", "images", "split_zhou_Food101.json", (
        ("apple_pie", "apple_pie", "apple_pie/{split}{i}.jpg"),
        ("baby_back_ribs", "baby_back_ribs", "baby_back_ribs/{split}{i}.jpg"),
        ("baklava", "baklava", "baklava/{split}{i}.jpg"),
    )),
    "sun397": SplitLayout("sun397", "SUN397", "split_zhou_SUN397.json", (
        ("abbey", "abbey", "a/abbey/sun_{split}{i}.jpg"),
        ("indoor apse", "indoor apse", "a/apse/indoor/sun_{split}{i}.jpg"),
        ("outdoor basketball_court", "outdoor basketball_court",
         "b/basketball_court/outdoor/sun_{split}{i}.jpg"),
    )),
    "dtd": SplitLayout("dtd", "images", "split_zhou_DescribableTextures.json", (
        ("banded", "banded", "banded/banded_{split}{i:04d}.jpg"),
        ("blotchy", "blotchy", "blotchy/blotchy_{split}{i:04d}.jpg"),
        ("braided", "braided", "braided/braided_{split}{i:04d}.jpg"),
    )),
    # Folder names in the split file: kept as they are, as CoOp keeps them.
    "eurosat": SplitLayout("eurosat", "2750", "split_zhou_EuroSAT.json", (
        ("AnnualCrop", "AnnualCrop", "AnnualCrop/AnnualCrop_{split}{i}.jpg"),
        ("Forest", "Forest", "Forest/Forest_{split}{i}.jpg"),
        ("SeaLake", "SeaLake", "SeaLake/SeaLake_{split}{i}.jpg"),
    )),
    "ucf101": SplitLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", (
        ("Apply_Eye_Makeup", "Apply_Eye_Makeup",
         "Apply_Eye_Makeup/v_ApplyEyeMakeup_g0{i}_c0{split}.jpg"),
        ("Archery", "Archery", "Archery/v_Archery_g0{i}_c0{split}.jpg"),
        ("Band_Marching", "Band_Marching", "Band_Marching/v_BandMarching_g0{i}_c0{split}.jpg"),
    )),
}


def make_split_dataset(root: Path, name: str, interleave: bool = True) -> ExpectedTree:
    """Write ``name``'s images and its ``split_zhou_*.json`` ([relpath, label, classname]).

    With ``interleave``, the training entries alternate between classes (labels first appear
    in the order 1, 0, 2), so readers and samplers cannot rely on grouped files.
    """
    layout = SPLIT_LAYOUTS[name]
    dataset_dir = root / layout.folder
    image_dir = dataset_dir / layout.image_subdir if layout.image_subdir else dataset_dir
    split_json: dict[str, list[list[object]]] = {}
    expected = ExpectedTree([new for _, new, _ in layout.classes])
    for split in SPLITS:
        per_class = [
            [(pattern.format(split=split, i=i), label, written)
             for i in range(PER_CLASS[split][label])]
            for label, (written, _, pattern) in enumerate(layout.classes)
        ]
        entries = _interleave([per_class[1], per_class[0], per_class[2]]) if interleave \
            else [e for group in per_class for e in group]
        split_json[split] = [[rel, label, written] for rel, label, written in entries]
        expected.splits[split] = [
            (str(image_dir / rel), label, layout.classes[label][1]) for rel, label, _ in entries
        ]
        for index, (rel, _, _) in enumerate(entries):
            write_image(image_dir / rel, value=index * 7 % 256)
    (dataset_dir / layout.split_file).write_text(json.dumps(split_json, indent=1))
    return expected


def _interleave(groups: list[list[Record]]) -> list[Record]:
    out = []
    for i in range(max(map(len, groups))):
        out.extend(group[i] for group in groups if i < len(group))
    return out


# --- FGVC-Aircraft: variants.txt + images_variant_<split>.txt --------------------------------

FGVC_VARIANTS = ("707-320", "A300B4", "F/A-18")


def make_fgvc_aircraft(root: Path) -> ExpectedTree:
    """``fgvc_aircraft/`` as the ``data/`` folder of fgvc-aircraft-2013b."""
    dataset_dir = root / "fgvc_aircraft"
    (dataset_dir / "images").mkdir(parents=True)
    (dataset_dir / "variants.txt").write_text("".join(v + "\n" for v in FGVC_VARIANTS))
    expected = ExpectedTree(list(FGVC_VARIANTS))
    image_id = 1000000
    for split in SPLITS:
        lines, records = [], []
        for i in range(max(PER_CLASS[split])):
            for label, variant in enumerate(FGVC_VARIANTS):
                if i < PER_CLASS[split][label]:
                    image_id += 1
                    lines.append(f"{image_id} {variant}\n")
                    path = write_image(dataset_dir / "images" / f"{image_id}.jpg")
                    records.append((str(path), label, variant))
        (dataset_dir / f"images_variant_{split}.txt").write_text("".join(lines))
        expected.splits[split] = records
    return expected


# --- ImageNet and its variants: wnid folders + classnames.txt ----------------------------------

IMAGENET_CLASSES = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
}


def write_imagenet_classnames(dataset_dir: Path) -> None:
    dataset_dir.mkdir(parents=True, exist_ok=True)
    (dataset_dir / "classnames.txt").write_text(
        "".join(f"{wnid} {name}\n" for wnid, name in IMAGENET_CLASSES.items())
    )


def _wnid_folders(image_dir: Path, wnids: list[str], per_class: tuple[int, ...],
                  pattern: str) -> list[Record]:
    records = []
    for label, wnid in enumerate(wnids):
        for i in range(per_class[label % len(per_class)]):
            path = write_image(image_dir / wnid / pattern.format(wnid=wnid, i=i))
            records.append((str(path), label, IMAGENET_CLASSES[wnid]))
    return records


def make_imagenet(root: Path) -> ExpectedTree:
    """``imagenet/images/{train,val}/<wnid>/`` + ``classnames.txt``; val is the test split."""
    dataset_dir = root / "imagenet"
    write_imagenet_classnames(dataset_dir)
    wnids = sorted(IMAGENET_CLASSES)
    expected = ExpectedTree([IMAGENET_CLASSES[w] for w in wnids])
    expected.splits["train"] = _wnid_folders(
        dataset_dir / "images" / "train", wnids, (5, 3, 1, 2), "{wnid}_{i}.JPEG")
    expected.splits["test"] = _wnid_folders(
        dataset_dir / "images" / "val", wnids, (2, 1), "ILSVRC2012_val_{wnid}{i}.JPEG")
    expected.splits["val"] = expected.splits["test"]
    return expected


# variant -> (dataset folder, image folder, wnids present)
WNID_VARIANTS = {
    "imagenet_sketch": ("imagenet-sketch", "images", sorted(IMAGENET_CLASSES)),
    # ImageNet-A/-R hold a subset of the classes (200 of 1000) and a README.txt
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", ["n01443537", "n01491361"]),
    "imagenet_r": ("imagenet-rendition", "imagenet-r",
                   ["n01440764", "n01484850", "n01491361"]),
}


def make_wnid_variant(root: Path, name: str) -> ExpectedTree:
    """ImageNet-Sketch/-A/-R: ``<image folder>/<wnid>/`` + ImageNet's ``classnames.txt``."""
    folder, image_subdir, wnids = WNID_VARIANTS[name]
    dataset_dir = root / folder
    write_imagenet_classnames(dataset_dir)
    (dataset_dir / image_subdir).mkdir(parents=True)
    (dataset_dir / image_subdir / "README.txt").write_text("not a class\n")
    expected = ExpectedTree([IMAGENET_CLASSES[w] for w in wnids], {"train": [], "val": []})
    expected.splits["test"] = _wnid_folders(dataset_dir / image_subdir, wnids, (2, 1, 3),
                                            "{i}.png")
    return expected


def make_imagenetv2(root: Path) -> ExpectedTree:
    """``imagenetv2/imagenetv2-matched-frequency-format-val/<label>/`` + ``classnames.txt``."""
    dataset_dir = root / "imagenetv2"
    write_imagenet_classnames(dataset_dir)
    image_dir = dataset_dir / "imagenetv2-matched-frequency-format-val"
    names = list(IMAGENET_CLASSES.values())
    expected = ExpectedTree(names, {"train": [], "val": []})
    records = []
    for label, name in enumerate(names):
        for i in range(label % 2 + 1):
            path = write_image(image_dir / str(label) / f"{label}abc{i}.jpeg")
            records.append((str(path), label, name))
    expected.splits["test"] = records
    return expected


def make_dataset(root: Path, name: str) -> ExpectedTree:
    """Write dataset ``name`` (a registry key) under ``root``."""
    if name in SPLIT_LAYOUTS:
        return make_split_dataset(root, name)
    if name in WNID_VARIANTS:
        return make_wnid_variant(root, name)
    makers = {"fgvc_aircraft": make_fgvc_aircraft, "imagenet": make_imagenet,
              "imagenetv2": make_imagenetv2}
    return makers[name](root)


def uneven_items(root: object = "/d") -> list[Datum]:
    """Labels first appear as 2, 0, 3, 1; class sizes 7, 3, 1 (fewer than most K), 5; images
    under ``root``."""
    sizes = {2: 7, 0: 3, 3: 1, 1: 5}
    items, counters = [], dict.fromkeys(sizes, 0)
    while any(counters[y] < n for y, n in sizes.items()):
        for label, n in sizes.items():
            if counters[label] < n:
                items.append(Datum(f"{root}/{label}/{counters[label]}.jpg", label, f"c{label}"))
                counters[label] += 1
    return items
