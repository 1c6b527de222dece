"""The inputs and outputs of ``dpt-fast predict``: image files to classify, and their top-k
classes as a terminal table, CSV or JSON lines."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dpt_fast.data.datasets import IMAGE_SUFFIXES
from dpt_fast.files import atomic_write_bytes

OUTPUT_FORMATS = (".csv", ".jsonl")


@dataclass
class Prediction:
    """The top-k classes of one image, best first, or why it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability)
    error: str | None = None


def find_images(inputs: list[str]) -> list[str]:
    """Image files of ``inputs``: files as given (whatever their suffix), folders searched
    recursively for files with an image suffix (any case; hidden files and folders skipped,
    names sorted).

    Raises:
        FileNotFoundError: an input that does not exist.
        ValueError: no image at all.
    """
    files: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            files.extend(_images_under(path))
        elif path.exists():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"no such image or folder: {entry}")
    if not files:
        raise ValueError(f"no image files (suffixes {', '.join(IMAGE_SUFFIXES)}) in "
                         f"{', '.join(inputs)}")
    return files


def _images_under(folder: Path) -> list[str]:
    found: list[str] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(names)
                     if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES)
    return found


def check_output(path: Path | None) -> None:
    """Refuse an output file of an unknown format before any work."""
    if path is not None and path.suffix.lower() not in OUTPUT_FORMATS:
        raise ValueError(f"--output {path}: unknown format {path.suffix or '(no suffix)'!r}; "
                         f"use a {' or '.join(OUTPUT_FORMATS)} file")
    if path is not None and path.is_dir():
        raise IsADirectoryError(f"--output {path} is a folder; give a file name")


def format_table(predictions: list[Prediction]) -> str:
    """A plain-text table: one row per image, its top-k as ``class 97.1%`` columns."""
    k = max((len(p.top) for p in predictions), default=0)
    header = ["image", *(f"top-{i + 1}" for i in range(k))]
    rows = [[p.path, *(f"{name} {100 * prob:.1f}%" for name, prob in p.top)]
            if p.error is None else [p.path, f"unreadable: {p.error}"] for p in predictions]
    widths = [max(len(row[i]) for row in [header, *rows] if i < len(row))
              for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [cell.ljust(widths[i]) if i < len(widths) - 1 else cell
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def write_predictions(predictions: list[Prediction], path: Path) -> None:
    """Write ``path`` (atomically) by its suffix.

    * ``.csv``: ``path,rank,class,probability,error``; one row per image and rank, one row
      with the error for an unreadable image;
    * ``.jsonl``: one object per image, ``{"path", "top": [{"class", "probability"}, ...]}``
      and ``"error"`` for an unreadable one.
    """
    check_output(path)
    if path.suffix.lower() == ".csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", "rank", "class", "probability", "error"])
        for p in predictions:
            if p.error is not None:
                writer.writerow([p.path, "", "", "", p.error])
            for rank, (name, prob) in enumerate(p.top, start=1):
                writer.writerow([p.path, rank, name, f"{prob:.6f}", ""])
        data = text.getvalue()
    else:
        lines = []
        for p in predictions:
            row: dict = {"path": p.path,
                         "top": [{"class": n, "probability": round(q, 6)} for n, q in p.top]}
            if p.error is not None:
                row["error"] = p.error
            lines.append(json.dumps(row, ensure_ascii=False))
        data = "".join(line + "\n" for line in lines)
    atomic_write_bytes(path, data.encode("utf-8"))
