"""The JSON of the benchmark scripts: each case's line from a fresh process, the report printed
and written to --out if given."""

from __future__ import annotations

import json
import os
import subprocess
import sys


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


def run_case_in_subprocess(script: str, case: str, repeats: int) -> dict:
    """Run ``python SCRIPT --case CASE --repeats N`` in a fresh process (its own peak memory,
    no caches warmed by another case) and return the JSON object of its last stdout line, or
    ``{"case": case, "error": [its last stderr line]}`` when it failed."""
    proc = subprocess.run([sys.executable, script, "--case", case, "--repeats", str(repeats)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
