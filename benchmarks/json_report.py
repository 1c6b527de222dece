"""The JSON tail of the benchmark scripts: print the report, and write it to --out if given."""

from __future__ import annotations

import json


def emit(report: dict, out: str | None) -> None:
    """Prints ``report`` as indented JSON; when ``out`` is a path, writes the same text there."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
