"""The in-tree build backend finds the target environment's torch behind build isolation.

Each case runs the backend's discovery in a child interpreter set up the way a build frontend
leaves it: the target's site-packages hidden from ``sys.path``, PYTHONPATH / PYTHONNOUSERSITE
set. (The full ``pip install -e .`` is what CI's install step runs.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest
import torch

BACKEND_DIR = Path(__file__).resolve().parents[2] / "build_backend"
FRONTEND_VARIABLES = ("VIRTUAL_ENV", "CONDA_PREFIX", "DPT_FAST_TORCH_PYTHON", "DPT_FAST_SKIP_EXT")

# Hide every site-packages folder, as pip's isolation does, then let the backend look.
DISCOVER = textwrap.dedent(f"""
    import importlib.util, sys
    sys.path.insert(0, {str(BACKEND_DIR)!r})
    kept = [p for p in sys.path if "site-packages" not in p]
    sys.path[:] = kept
    assert importlib.util.find_spec("torch") is None, "torch was not hidden"
    import dpt_fast_backend
    dpt_fast_backend.expose_target_torch()
    import torch
    assert sys.path[:len(kept)] == kept, "the build environment's paths must stay first"
    print(torch.__file__)
""")


def _run(python: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # Like pip's: a sitecustomize on PYTHONPATH that drops the interpreter's own site-packages,
    # so a probe of the target that kept PYTHONPATH would find no torch either.
    frontend_site = tmp_path / "frontend_site"
    frontend_site.mkdir()
    (frontend_site / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n")
    clean = {k: v for k, v in os.environ.items() if k not in FRONTEND_VARIABLES}
    clean |= {"PYTHONPATH": str(frontend_site), "PYTHONNOUSERSITE": "1"} | env
    return subprocess.run([python, "-c", DISCOVER], env=clean, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh virtual environment's interpreter: no torch, no pip."""
    root = tmp_path_factory.mktemp("bare_venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    return str(root / "bin" / "python")


def test_isolated_build_sees_the_target_torch(tmp_path: Path) -> None:
    result = _run(sys.executable, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == torch.__file__
    assert "building against the target environment's torch" in result.stderr


def test_target_named_by_dpt_fast_torch_python(tmp_path: Path, bare_python: str) -> None:
    # The hooks run by another interpreter (a separate build venv): the variable names the target.
    result = _run(bare_python, tmp_path, DPT_FAST_TORCH_PYTHON=sys.executable)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == torch.__file__


def test_no_torch_anywhere_is_one_clear_line(tmp_path: Path, bare_python: str) -> None:
    result = _run(bare_python, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "install torch first" in lines[0]
    assert str(Path(bare_python).parents[1]) in lines[0]


def test_pure_python_install_needs_no_torch(tmp_path: Path, bare_python: str) -> None:
    code = DISCOVER.split("import torch")[0]  # discovery only: nothing to import
    clean = {k: v for k, v in os.environ.items() if k not in FRONTEND_VARIABLES}
    result = subprocess.run([bare_python, "-c", code], env=clean | {"DPT_FAST_SKIP_EXT": "1"},
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
