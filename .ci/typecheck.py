"""mypy over dpt_fast/ and kernels/ as they are installed: ``kernels/`` is ``dpt_fast.kernels``.

setup.py installs the top-level ``kernels/`` folder as the subpackage ``dpt_fast.kernels`` (never
a top-level package), which mypy cannot see in the source tree. This lays the package out as
installed in a temporary folder (links to every entry of ``dpt_fast/``, plus ``kernels``) and
runs ``mypy -p dpt_fast`` there with ``pyproject.toml``'s settings; errors name the installed
paths (``dpt_fast/kernels/...`` is ``kernels/...``). Extra arguments go to mypy.

Usage: python .ci/typecheck.py [mypy arguments]    (exit status: mypy's)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dpt_fast"
KERNELS = "kernels"  # installed as dpt_fast.kernels (setup.py's package_dir)


def lay_out(dest: Path) -> None:
    """dest/dpt_fast: a link to each entry of dpt_fast/, and dpt_fast/kernels -> kernels/."""
    package = dest / PACKAGE
    package.mkdir()
    for entry in (ROOT / PACKAGE).iterdir():
        if entry.name in ("__pycache__", KERNELS):
            continue
        (package / entry.name).symlink_to(entry)
    (package / KERNELS).symlink_to(ROOT / KERNELS)


def main(argv: list[str]) -> int:
    """Run mypy on the laid-out package; returns mypy's exit status."""
    with tempfile.TemporaryDirectory(prefix="dpt_fast_types_") as tmp:
        lay_out(Path(tmp))
        command = [
            sys.executable, "-m", "mypy",
            "--config-file", str(ROOT / "pyproject.toml"),
            "--cache-dir", str(ROOT / ".mypy_cache"),
            "-p", PACKAGE, *argv,
        ]
        # The laid-out package must win over an editable install of the same name.
        env = {**os.environ, "MYPYPATH": tmp}
        return subprocess.call(command, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
