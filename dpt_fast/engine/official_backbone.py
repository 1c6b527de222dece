"""The backbone of an authors' output folder (``dpt-fast eval --official-dir``), never guessed.

The authors' prompts for ViT-B/16 and ViT-B/32 have the same shapes (both are 768 wide), so a
checkpoint cannot tell which CLIP it was trained on. Their Dassl trainer prints its whole config
(``MODEL.BACKBONE.NAME: ViT-B/32``) into ``<output dir>/log.txt`` (``log.txt-<time>`` when one
exists already), beside the checkpoint folders: the backbone is read from there, or must be
given (``--backbone`` or ``--recipe``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dpt_fast.backbone import openai_backbone

log = logging.getLogger("dpt_fast")

_BACKBONE_KEY = ("MODEL", "BACKBONE", "NAME")


def config_value(text: str, path: tuple[str, ...] = _BACKBONE_KEY) -> str | None:
    """The value at ``path`` in a yacs config printed into a log (``KEY:`` lines nested by
    indentation, ``KEY: value`` leaves); None when absent or empty."""
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip(" "))
        key, _, value = stripped.partition(":")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if (*(k for _, k in stack), key) == path:
            return value.strip().strip("'\"") or None
        if not value.strip():
            stack.append((indent, key))
    return None


def logged_backbones(directory: str | Path) -> dict[str, str]:
    """``{log file name: MODEL.BACKBONE.NAME}`` of the Dassl logs in ``directory``."""
    found = {}
    for path in sorted(Path(directory).glob("log.txt*")):
        if path.is_file():
            name = config_value(path.read_text(encoding="utf-8", errors="replace"))
            if name:
                found[path.name] = name
    return found


def official_backbone(directory: str | Path, backbone: str, explicit: bool) -> str:
    """The backbone to evaluate the authors' checkpoints in ``directory`` with.

    ``backbone`` is the configured one; ``explicit``: the user chose it (``--backbone`` or
    ``--recipe``). An explicit choice is used (with a warning when the log names another
    architecture); otherwise the logs' backbone, mapped to open_clip's QuickGELU model.

    Raises:
        ValueError: no choice and no log naming the backbone, or logs that disagree.
        FileNotFoundError: ``directory`` is not a folder.
    """
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"--official-dir {directory}: no such folder")
    logged = logged_backbones(directory)
    names = sorted(set(logged.values()))
    if explicit:
        if len(names) == 1 and _architecture(names[0]) != _architecture(backbone):
            log.warning("evaluating %s with --backbone %s, but its %s says the prompts were "
                        "trained on %s", directory, backbone, next(iter(logged)), names[0])
        return backbone
    if len(names) == 1:
        chosen = openai_backbone(names[0])
        log.info("backbone %s: MODEL.BACKBONE.NAME %s in %s", chosen, names[0],
                 ", ".join(f"{Path(directory) / f}" for f in logged))
        return chosen
    why = (f"its Dassl logs disagree ({', '.join(f'{f}: {n}' for f, n in logged.items())})"
           if names else f"no Dassl log.txt in {directory} names it")
    raise ValueError(
        f"--official-dir: cannot tell which CLIP the authors' prompts in {directory} belong to: "
        f"ViT-B/16 and ViT-B/32 prompts have the same shapes, and {why}; pass --backbone "
        "(ViT-B-32-quickgelu for the authors' train_single.sh, which runs "
        "configs/trainers/VPT/vit_b32_deep.yaml) or --recipe authors")


def _architecture(backbone: str) -> str:
    """``ViT-B/32``, ``ViT-B-32`` and ``ViT-B-32-quickgelu`` are one architecture."""
    return backbone.strip().replace("/", "-").removesuffix("-quickgelu")
