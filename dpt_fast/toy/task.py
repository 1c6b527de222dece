"""The toy few-shot task: name a square's colour and texture ("red striped square"), 24 classes,
in photos from a camera the toy CLIP never saw.

The task's photos are **faded**: every pixel is mixed with its own grey level (``FADE`` of it),
as an old print or a washed-out camera would render it. The toy CLIP was pretrained on the
world's bright colours only (``pretrain.py``), so this is a domain shift of the kind few-shot
prompt tuning exists for: zero-shot, the hand-crafted prompts often name the wrong colour,
while the CLIP's image features still tell the classes apart (a 16-shot linear probe on them
does far better than zero-shot; see MODEL_CARD.md for the numbers).

The task is written to disk in the layout of CoOp's DTD (Describable Textures), the registered
dataset whose reader is a plain CoOp split file over one image folder, and a texture dataset
like this one::

    <root>/dtd/images/<class name>/<index>.png
    <root>/dtd/split_zhou_DescribableTextures.json   {"train"|"val"|"test": [[relpath, label,
                                                      classname], ...]}

so ``build_dataset("dtd", root, shots, seed)`` and the training engine read it exactly as they
read real data (DTD's own template "{} texture." is replaced by ``TEMPLATE`` explicitly).
Each scene is a centred square (the training crops of Dassl's pipeline would often cut a corner
shape out); size, colour shade, pattern phase and background vary. The test split is large
(``TEST_PER_CLASS``) so that an accuracy is measured to a fraction of a point: two trainings
that differ only in floating-point rounding then report nearly the same number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dpt_fast.toy.world import COLOURS, TEXTURES, Scene, render, sample_scene

DATASET_NAME = "dtd"  # the registered CoOp layout the task is written in
DATASET_FOLDER = "dtd"
IMAGE_SUBDIR = "images"
SPLIT_FILE = "split_zhou_DescribableTextures.json"
TEMPLATE = "a photo of a {}."
TASK_POSITION = "centre"
TASK_SHAPE = "square"
TRAIN_PER_CLASS = 16  # the few-shot pool (CoOp draws `shots` of them per seed)
VAL_PER_CLASS = 4
TEST_PER_CLASS = 100
FADE = 0.55  # share of each pixel replaced by its grey level (mean of R, G, B)
DEFAULT_TASK_SEED = 1234  # seed of the images (the few-shot draw has its own run seed)
_SPLIT_SEED_OFFSETS = {"train": 0, "val": 1, "test": 2}


def classnames() -> list[str]:
    """The 24 class names, "<colour> <texture> square", label = index."""
    return [f"{colour} {texture} {TASK_SHAPE}" for colour in COLOURS for texture in TEXTURES]


def _scene_for(classname: str, rng: np.random.Generator) -> Scene:
    colour, texture, shape = classname.split(" ")
    return sample_scene(rng, shapes=(shape,), colours=(colour,), textures=(texture,),
                        positions=(TASK_POSITION,))


def fade(image: Image.Image, amount: float = FADE) -> Image.Image:
    """``image`` with each pixel mixed towards its own grey level: (1 - amount)·rgb +
    amount·mean(rgb), rounded to uint8. Greys stay grey; colours lose saturation."""
    pixels = np.asarray(image).astype(np.float32)
    grey = pixels.mean(axis=-1, keepdims=True)
    mixed = (1.0 - amount) * pixels + amount * grey
    return Image.fromarray(np.clip(mixed, 0, 255).round().astype(np.uint8), mode="RGB")


def write_task(root: str | Path, seed: int = DEFAULT_TASK_SEED,
               per_class: dict[str, int] | None = None, fade_amount: float = FADE) -> Path:
    """Generate the task under ``root`` (the data root) and return the dataset folder.

    ``per_class`` overrides the images per class of each split (default ``TRAIN_PER_CLASS``,
    ``VAL_PER_CLASS``, ``TEST_PER_CLASS``); ``fade_amount`` 0 writes the scenes unfaded, as
    the toy CLIP saw them in pretraining. Deterministic in ``seed``. An existing task folder
    written with the same settings is reused as is.
    """
    counts = {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": TEST_PER_CLASS}
    counts.update(per_class or {})
    dataset_dir = Path(root) / DATASET_FOLDER
    split_path = dataset_dir / SPLIT_FILE
    marker = dataset_dir / "toy_task.json"
    recipe = {"seed": seed, "counts": counts, "classes": classnames(), "fade": fade_amount}
    if split_path.is_file() and marker.is_file() and json.loads(marker.read_text()) == recipe:
        return dataset_dir
    split: dict[str, list] = {}
    for name, count in counts.items():
        rng = np.random.default_rng([seed, _SPLIT_SEED_OFFSETS[name]])
        entries = []
        for label, classname in enumerate(classnames()):
            folder = dataset_dir / IMAGE_SUBDIR / classname
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                relpath = f"{classname}/{name}_{index:03d}.png"
                image = fade(render(_scene_for(classname, rng), rng), fade_amount)
                image.save(dataset_dir / IMAGE_SUBDIR / relpath)
                entries.append([relpath, label, classname])
        split[name] = entries
    split_path.write_text(json.dumps(split))
    marker.write_text(json.dumps(recipe))
    return dataset_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m dpt_fast.toy.task ROOT``: write the task under ROOT for ``dpt-fast train``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dpt_fast.toy.task",
                                     description="Write the toy few-shot task (24 classes) in "
                                                 "CoOp's DTD layout, for `dpt-fast train`.")
    parser.add_argument("root", help="data root: the task goes to ROOT/dtd")
    parser.add_argument("--seed", type=int, default=DEFAULT_TASK_SEED,
                        help=f"seed of the images (default: {DEFAULT_TASK_SEED})")
    args = parser.parse_args(argv)
    folder = write_task(args.root, seed=args.seed)
    print(f"toy task written to {folder} ({len(classnames())} classes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
