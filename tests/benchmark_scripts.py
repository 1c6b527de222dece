"""The scripts of ``benchmarks/`` as modules, for the tests of their logic.

``benchmarks/`` holds scripts run by path (``python benchmarks/report.py``), not a package; the
tests load one by file path, without putting the folder on ``sys.path`` for every test.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py``, imported once per session as ``benchmarks_<name>``."""
    module_name = f"benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses look their module up
    spec.loader.exec_module(module)
    return module
