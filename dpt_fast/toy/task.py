"""The toy few-shot task: name a square's colour and texture ("red striped square"), 24 classes.

The toy CLIP knows colours well but textures only partly (few of its captions name one, see
MODEL_CARD.md): zero-shot it gets the colour right and the texture often wrong, which leaves
prompt tuning room to improve.

The task is written to disk in the layout of CoOp's DTD (Describable Textures), the registered
dataset whose reader is a plain CoOp split file over one image folder, and a texture dataset
like this one::

    <root>/dtd/images/<class name>/<index>.png
    <root>/dtd/split_zhou_DescribableTextures.json   {"train"|"val"|"test": [[relpath, label,
                                                      classname], ...]}

so ``build_dataset("dtd", root, shots, seed)`` and the training engine read it exactly as they
read real data (DTD's own template "{} texture." is replaced by ``TEMPLATE`` explicitly).
Each scene is a centred square (the training crops of Dassl's pipeline would often cut a corner
shape out); size, colour shade, pattern phase and background vary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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
TEST_PER_CLASS = 15
DEFAULT_TASK_SEED = 1234  # seed of the images (the few-shot draw has its own run seed)
_SPLIT_SEED_OFFSETS = {"train": 0, "val": 1, "test": 2}


def classnames() -> list[str]:
    """The 24 class names, "<colour> <texture> square", label = index."""
    return [f"{colour} {texture} {TASK_SHAPE}" for colour in COLOURS for texture in TEXTURES]


def _scene_for(classname: str, rng: np.random.Generator) -> Scene:
    colour, texture, shape = classname.split(" ")
    return sample_scene(rng, shapes=(shape,), colours=(colour,), textures=(texture,),
                        positions=(TASK_POSITION,))


def write_task(root: str | Path, seed: int = DEFAULT_TASK_SEED,
               per_class: dict[str, int] | None = None) -> Path:
    """Generate the task under ``root`` (the data root) and return the dataset folder.

    ``per_class`` overrides the images per class of each split (default ``TRAIN_PER_CLASS``,
    ``VAL_PER_CLASS``, ``TEST_PER_CLASS``). Deterministic in ``seed``. An existing task folder
    with the same split file is reused as is.
    """
    counts = {"train": TRAIN_PER_CLASS, "val": VAL_PER_CLASS, "test": TEST_PER_CLASS}
    counts.update(per_class or {})
    dataset_dir = Path(root) / DATASET_FOLDER
    split_path = dataset_dir / SPLIT_FILE
    marker = dataset_dir / "toy_task.json"
    recipe = {"seed": seed, "counts": counts, "classes": classnames()}
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
                render(_scene_for(classname, rng), rng).save(dataset_dir / IMAGE_SUBDIR / relpath)
                entries.append([relpath, label, classname])
        split[name] = entries
    split_path.write_text(json.dumps(split))
    marker.write_text(json.dumps(recipe))
    return dataset_dir
