"""The toy few-shot tasks: scenes of the toy world named by their colour and texture ("red
striped square"), in photos from a camera the toy CLIP never saw, written to disk in the
layouts of registered CoOp datasets.

The task's photos are **faded**: every pixel is mixed with its own grey level (``FADE`` of it),
as an old print or a washed-out camera would render it. The toy CLIP was pretrained on the
world's bright colours only (``pretrain.py``), so this is a domain shift of the kind few-shot
prompt tuning exists for: zero-shot, the hand-crafted prompts often name the wrong colour,
while the CLIP's image features still tell the classes apart (a 16-shot linear probe on them
does far better than zero-shot; see MODEL_CARD.md for the numbers).

Each task is written in the layout of one registered dataset whose reader is a plain CoOp split
file over an image folder (``LAYOUTS``), with its own class set, 24 classes each::

    dtd          "<colour> <texture> square"   the demo's task
    caltech101   "<colour> <texture> shape"    any of the world's five shapes
    sun397       "<colour> <texture> circle"

    <root>/<folder>/<image subdir>/<class name>/<split>_<index>.png
    <root>/<folder>/<split file>   {"train"|"val"|"test": [[relpath, label, classname], ...]}

(``dtd/images`` and ``split_zhou_DescribableTextures.json``; ``caltech-101/101_ObjectCategories``
and ``split_zhou_Caltech101.json``; ``sun397/SUN397`` and ``split_zhou_SUN397.json``), so
``build_dataset(name, root, shots, seed)`` and the training engine read them exactly as they
read real data. caltech101 and sun397 were chosen among those layouts because their registered
template is the toy's own ``TEMPLATE``; DTD's "{} texture." is replaced by ``TEMPLATE``
explicitly (``--template``, or ``--recipe toy``).

Classes differ by colour and texture, not by shape or position: the toy CLIP tells shapes apart
poorly (a linear probe on its image features: 50 % over the 5 shapes, MODEL_CARD.md), so a class
set that hinges on shape leaves prompt tuning little to find (measured on 30 faded "<colour>
<shape>" classes: zero-shot 33 %, 16-shot CoOp 27 % with the toy recipe), and Dassl's training
crops and flips move and mirror positions. Each scene is a centred shape (those crops would often
cut a corner shape out); size, colour shade, pattern phase and background vary, and so does every
attribute a class does not name. The dtd test split is large (``TEST_PER_CLASS``) so that an
accuracy is measured to a fraction of a point: two trainings that differ only in floating-point
rounding then report nearly the same number.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dpt_fast.toy_clip import TOY_TEMPLATE
from dpt_fast.toy_clip.world import COLOURS, SHAPES, TEXTURES, Scene, render, sample_scene

TEMPLATE = TOY_TEMPLATE  # "a photo of a {}.": the toy CLIP's captions, one source of truth
TASK_POSITION = "centre"
TASK_SHAPE = "square"  # the one shape of the dtd task
ANY_SHAPE = "shape"  # the word of class names whose scenes take any of the world's shapes
TRAIN_PER_CLASS = 16  # the few-shot pool (CoOp draws `shots` of them per seed)
VAL_PER_CLASS = 4
TEST_PER_CLASS = 100  # dtd's; the other layouts use SMALL_TEST_PER_CLASS
# The other layouts serve sweeps (datasets x shots x seeds x methods, dozens of runs, each
# evaluating the whole test split): 30 per class keeps each evaluation and the writing quick,
# and still measures a 20- or 30-class accuracy to about +-1.7 points (binomial std at 50 %).
SMALL_TEST_PER_CLASS = 30
FADE = 0.55  # share of each pixel replaced by its grey level (mean of R, G, B)
DEFAULT_TASK_SEED = 1234  # seed of the images (the few-shot draw has its own run seed)
_SPLIT_SEED_OFFSETS = {"train": 0, "val": 1, "test": 2}
MARKER_FILE = "toy_task.json"  # what a written task folder was written with (reuse check)


@dataclass(frozen=True)
class ToyClass:
    """One class: its name and the attribute values its scenes draw from (uniformly)."""

    name: str
    colours: tuple[str, ...]
    textures: tuple[str, ...]
    shapes: tuple[str, ...]

    def scene(self, rng: np.random.Generator) -> Scene:
        return sample_scene(rng, shapes=self.shapes, colours=self.colours,
                            textures=self.textures, positions=(TASK_POSITION,))


@dataclass(frozen=True)
class Layout:
    """A registered CoOp dataset layout and the toy class set written in it.

    Attributes:
        dataset: the registry name (``build_dataset(dataset, root, ...)``).
        folder: the dataset folder under the data root, as the registry expects it.
        image_subdir: the folder the split file's paths are relative to.
        split_file: the CoOp split file's name.
        classes: the classes, label = index.
        test_per_class: default test images per class.
        stream: appended to the image seed, so that each layout draws its own images (empty
            for dtd, whose images predate the other layouts and must not change).
    """

    dataset: str
    folder: str
    image_subdir: str
    split_file: str
    classes: tuple[ToyClass, ...]
    test_per_class: int
    stream: tuple[int, ...]

    def classnames(self) -> list[str]:
        return [c.name for c in self.classes]

    def counts(self, per_class: dict[str, int] | None = None) -> dict[str, int]:
        """Images per class of each split: the defaults, updated with ``per_class``."""
        counts = {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": self.test_per_class}
        counts.update(per_class or {})
        return counts


def _colour_texture(shape: str) -> tuple[ToyClass, ...]:
    """"<colour> <texture> <shape>" for every colour and texture, colour-major (the labels of
    the demo's dtd task, whose few-shot draws depend on them); ``ANY_SHAPE``: any shape."""
    shapes = SHAPES if shape == ANY_SHAPE else (shape,)
    return tuple(ToyClass(f"{colour} {texture} {shape}", (colour,), (texture,), shapes)
                 for colour, texture in itertools.product(COLOURS, TEXTURES))


LAYOUTS: dict[str, Layout] = {layout.dataset: layout for layout in (
    Layout("dtd", "dtd", "images", "split_zhou_DescribableTextures.json",
           _colour_texture(TASK_SHAPE), TEST_PER_CLASS, ()),
    Layout("caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
           _colour_texture(ANY_SHAPE), SMALL_TEST_PER_CLASS, (1,)),
    Layout("sun397", "sun397", "SUN397", "split_zhou_SUN397.json",
           _colour_texture("circle"), SMALL_TEST_PER_CLASS, (2,)),
)}

# The demo's task (dtd), under the names the demo, the benchmarks and the tests use.
DATASET_NAME = "dtd"
DATASET_FOLDER = LAYOUTS[DATASET_NAME].folder
IMAGE_SUBDIR = LAYOUTS[DATASET_NAME].image_subdir
SPLIT_FILE = LAYOUTS[DATASET_NAME].split_file


def get_layout(dataset: str) -> Layout:
    """The layout of registry name ``dataset``; unknown names raise ``KeyError`` listing the
    valid ones."""
    try:
        return LAYOUTS[dataset]
    except KeyError:
        raise KeyError(f"no toy task in the layout of {dataset!r}; valid: "
                       f"{', '.join(LAYOUTS)}") from None


def classnames(dataset: str = DATASET_NAME) -> list[str]:
    """The class names of the task in ``dataset``'s layout, label = index (dtd: the 24
    "<colour> <texture> square")."""
    return get_layout(dataset).classnames()


def fade(image: Image.Image, amount: float = FADE) -> Image.Image:
    """``image`` with each pixel mixed towards its own grey level: (1 - amount)·rgb +
    amount·mean(rgb), rounded to uint8. Greys stay grey; colours lose saturation."""
    pixels = np.asarray(image).astype(np.float32)
    grey = pixels.mean(axis=-1, keepdims=True)
    mixed = (1.0 - amount) * pixels + amount * grey
    return Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8), mode="RGB")


def write_task(root: str | Path, seed: int = DEFAULT_TASK_SEED,
               per_class: dict[str, int] | None = None, fade_amount: float = FADE,
               dataset: str = DATASET_NAME) -> Path:
    """Generate the task in ``dataset``'s layout under ``root`` (the data root) and return the
    dataset folder.

    ``per_class`` overrides the images per class of each split (default ``TRAIN_PER_CLASS``,
    ``VAL_PER_CLASS`` and the layout's test count); ``fade_amount`` 0 writes the scenes
    unfaded, as the toy CLIP saw them in pretraining. Deterministic in ``seed``. An existing
    task folder written with the same settings is reused as is.
    """
    layout = get_layout(dataset)
    counts = layout.counts(per_class)
    dataset_dir = Path(root) / layout.folder
    split_path = dataset_dir / layout.split_file
    marker = dataset_dir / MARKER_FILE
    recipe = {"seed": seed, "counts": counts, "classes": layout.classnames(),
              "fade": fade_amount}
    if split_path.is_file() and marker.is_file() and json.loads(marker.read_text()) == recipe:
        return dataset_dir
    image_dir = dataset_dir / layout.image_subdir
    split: dict[str, list] = {}
    for name, count in counts.items():
        # One stream per split, all classes in label order: the dtd images stay those the
        # demo's published numbers were measured on.
        rng = np.random.default_rng([seed, _SPLIT_SEED_OFFSETS[name], *layout.stream])
        entries = []
        for label, toy_class in enumerate(layout.classes):
            (image_dir / toy_class.name).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                relpath = f"{toy_class.name}/{name}_{index:03d}.png"
                image = fade(render(toy_class.scene(rng), rng), fade_amount)
                image.save(image_dir / relpath)
                entries.append([relpath, label, toy_class.name])
        split[name] = entries
    split_path.write_text(json.dumps(split))
    marker.write_text(json.dumps(recipe))
    return dataset_dir


def write_tasks(root: str | Path, datasets: Sequence[str] = tuple(LAYOUTS),
                seed: int = DEFAULT_TASK_SEED, per_class: dict[str, int] | None = None,
                fade_amount: float = FADE) -> dict[str, Path]:
    """:func:`write_task` for each of ``datasets`` (default: every layout); their folders."""
    for dataset in datasets:
        get_layout(dataset)  # refuse an unknown name before writing anything
    return {dataset: write_task(root, seed, per_class, fade_amount, dataset)
            for dataset in datasets}


def main(argv: list[str] | None = None) -> int:
    """``python -m dpt_fast.toy.task ROOT [--datasets ... | --all]``: write the tasks under ROOT
    for ``dpt-fast train``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dpt_fast.toy.task",
        description="Write the toy few-shot tasks in CoOp dataset layouts, for `dpt-fast "
                    "train --recipe toy`: " + "; ".join(
                        f"{layout.dataset} ({len(layout.classes)} classes, e.g. "
                        f"{layout.classes[0].name!r})" for layout in LAYOUTS.values()))
    parser.add_argument("root", help="data root: a task goes to ROOT/<dataset folder>")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--datasets", nargs="+", choices=tuple(LAYOUTS), default=[DATASET_NAME],
                       help=f"layouts to write (default: {DATASET_NAME})")
    which.add_argument("--all", action="store_true", help="write every layout")
    parser.add_argument("--seed", type=int, default=DEFAULT_TASK_SEED,
                        help=f"seed of the images (default: {DEFAULT_TASK_SEED})")
    args = parser.parse_args(argv)
    datasets = tuple(LAYOUTS) if args.all else tuple(dict.fromkeys(args.datasets))
    for dataset, folder in write_tasks(args.root, datasets, seed=args.seed).items():
        print(f"toy task written to {folder} ({dataset} layout, "
              f"{len(classnames(dataset))} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
