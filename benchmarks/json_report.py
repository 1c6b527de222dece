"""The JSON tail of the benchmark scripts: print the report, and write it to --out if given."""

from __future__ import annotations

import json
import os


def emit(report: dict, out: str | None) -> None:
    """Prints ``report`` as indented JSON; when ``out`` is a path, writes the same text there."""
    print(json.dumps(report, indent=2))
    if out:
        write_json(report, out)


def write_json(report: dict, out: str) -> None:
    """Writes ``report`` as indented JSON to ``out``: to a temporary file, then renamed, so a
    reader (or a kill) never sees half a file."""
    tmp = f"{out}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out)
