"""PEP 517 build backend: setuptools' own, with the target environment's torch importable.

``dpt_fast._C`` must be compiled against the torch that will import it: the one installed in the
environment dpt_fast is being installed into (the target). pip builds in an isolated environment
that holds only ``[build-system] requires``; putting torch there would download a second torch,
whose version (and C++ ABI) need not match the target's. So every hook first makes the target's
torch importable, by appending the target interpreter's import path *after* the build
environment's own (the build requirements keep precedence), then runs setuptools' hook.

Where the target is, in order:

1. ``torch`` already importable: ``--no-build-isolation``; nothing to do.
2. ``DPT_FAST_TORCH_PYTHON=/path/to/python``: the interpreter named by the user.
3. ``sys.executable``: pip's default isolation runs the hooks with the target interpreter itself
   and only hides its site-packages (through PYTHONPATH and PYTHONNOUSERSITE), so a child process
   of it started without those two variables sees the target's import path.
4. ``$VIRTUAL_ENV`` / ``$CONDA_PREFIX``: frontends that run the hooks in a separate virtual
   environment (``python -m build``, pip's venv-isolation feature) name the target nowhere; an
   activated environment is taken as the target.

An interpreter is only used when its extension-module suffix (Python version and ABI) equals the
build interpreter's, because the extension is compiled for the latter. With no torch anywhere the
hook exits with one line that says to install torch first. ``DPT_FAST_SKIP_EXT=1`` (pure-Python
install) needs no torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from typing import Any

# Prints, as JSON, what the build needs to know about an interpreter's environment.
_PROBE = (
    "import importlib.util, json, sys, sysconfig\n"
    "spec = importlib.util.find_spec('torch')\n"
    "print(json.dumps({'path': sys.path, 'torch': spec.origin if spec else None,\n"
    "                  'ext_suffix': sysconfig.get_config_var('EXT_SUFFIX')}))\n"
)
# The variables through which a build frontend hides the target's packages from the hooks.
_ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE")
INSTALL_TORCH_FIRST = (
    "dpt_fast compiles its extension against the torch of the environment it is installed into, "
    'and there is no torch in {where}: install torch first (pip install "torch>=2.11") and run '
    "this install again; DPT_FAST_TORCH_PYTHON=/path/to/python names the environment when the "
    "build runs elsewhere, DPT_FAST_SKIP_EXT=1 installs without the extension"
)


def _log(message: str) -> None:
    print(f"[dpt_fast build] {message}", file=sys.stderr)


def _candidate_interpreters() -> list[str]:
    """Interpreters that may be the target environment's, most specific first."""
    candidates = [os.environ.get("DPT_FAST_TORCH_PYTHON", ""), sys.executable]
    for variable in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        prefix = os.environ.get(variable)
        if prefix:
            candidates.append(os.path.join(prefix, "bin", "python"))
    unique: dict[str, str] = {}  # one per environment: bin/python and bin/python3 are one
    for python in candidates:
        if python and os.path.exists(python):
            unique.setdefault(_environment(python), python)
    return list(unique.values())


def _environment(python: str) -> str:
    """The environment folder of an interpreter path (``<env>/bin/python`` -> ``<env>``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(python)))


def _probe(python: str) -> dict[str, Any] | None:
    """The import path, torch location and extension suffix of ``python`` run plainly."""
    env = {k: v for k, v in os.environ.items() if k not in _ISOLATION_VARIABLES}
    try:
        result = subprocess.run(
            [python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120,
            check=True,
        )
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def expose_target_torch() -> None:
    """Make the target environment's torch importable here, or exit with the fix.

    Raises:
        SystemExit: no candidate interpreter of this Python version has torch.
    """
    if os.environ.get("DPT_FAST_SKIP_EXT", "0") == "1":
        return  # setup.py builds no extension and never imports torch
    if importlib.util.find_spec("torch") is not None:
        return
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    candidates = _candidate_interpreters()
    for python in candidates:
        info = _probe(python)
        if not info or not info["torch"] or info["ext_suffix"] != ext_suffix:
            continue
        for path in info["path"]:
            # Appended: the build environment's own packages (setuptools, ninja) come first. The
            # probe's working folder (this project) is no import location of the target's.
            if path not in ("", os.getcwd()) and path not in sys.path:
                sys.path.append(path)
        importlib.invalidate_caches()
        if importlib.util.find_spec("torch") is not None:
            _log(f"building against the target environment's torch: {info['torch']} "
                 f"(found through {python})")
            return
    where = ", ".join(_environment(p) for p in candidates) or sys.prefix
    raise SystemExit(INSTALL_TORCH_FIRST.format(where=where))


def _setuptools_hook(name: str) -> Callable[..., Any]:
    """setuptools' hook ``name``, run once the target's torch is importable."""

    def hook(*args: Any, **kwargs: Any) -> Any:
        expose_target_torch()
        from setuptools import build_meta  # the build environment's setuptools

        return getattr(build_meta, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"setuptools.build_meta.{name}, with the target environment's torch visible."
    return hook


# Every hook runs setup.py, which imports torch to declare the extension.
build_wheel = _setuptools_hook("build_wheel")
build_sdist = _setuptools_hook("build_sdist")
build_editable = _setuptools_hook("build_editable")
get_requires_for_build_wheel = _setuptools_hook("get_requires_for_build_wheel")
get_requires_for_build_sdist = _setuptools_hook("get_requires_for_build_sdist")
get_requires_for_build_editable = _setuptools_hook("get_requires_for_build_editable")
prepare_metadata_for_build_wheel = _setuptools_hook("prepare_metadata_for_build_wheel")
prepare_metadata_for_build_editable = _setuptools_hook("prepare_metadata_for_build_editable")
