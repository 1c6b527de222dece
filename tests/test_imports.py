"""The package's structure: no import cycles between modules or between packages, each package
in its layer (docs/DESIGN.md §4), the model layer never importing the engine, and no source
file longer than the limit.

Imports are read from the source (every ``import`` statement, those inside functions too,
since a lazy import is still a dependency; ``if TYPE_CHECKING:`` blocks excepted), so the test
needs no optional package and sees imports that a run may never reach.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dpt_fast

PACKAGE_DIR = Path(dpt_fast.__file__).parent
# The model layer (docs/DESIGN.md §4): what `from dpt_fast import DPT` needs. It must work
# without the training engine, so nothing in it may import dpt_fast.engine.
MODEL_LAYER = ("dpt_fast.base", "dpt_fast.model", "dpt_fast.reference", "dpt_fast.fast",
               "dpt_fast.cocoop", "dpt_fast.zero_shot", "dpt_fast.linear_probe",
               "dpt_fast.prompts", "dpt_fast.loss", "dpt_fast.state_dict_meta",
               "dpt_fast.state_dict_transfer", "dpt_fast.backbone", "dpt_fast.checkpoint",
               "dpt_fast.clip_interop", "dpt_fast.ops", "dpt_fast.config")
# The layers of docs/DESIGN.md §4, bottom first: the packages (a subpackage or a top-level
# module of dpt_fast; "dpt_fast" is its __init__) of each. A package imports packages of its own
# layer or of layers below it, never above; a new package must be given its layer here.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("errors", "files", "output", "tokenizer", "config_fields", "method_registry",
                    "config",
                    "seeding", "checkpoint", "official", "ops", "clip_interop", "testing")),
    ("inputs", ("data", "toy_clip")),
    ("model", ("backbone", "state_dict_meta", "state_dict_transfer", "prompts", "loss", "base",
               "fast", "reference", "model", "cocoop", "frozen_classifier", "zero_shot",
               "linear_probe", "dpt_fast")),
    ("methods", ("methods",)),
    ("engine", ("engine",)),
    ("commands", ("sweeps", "reports", "prediction", "toy")),
    ("cli", ("cli", "__main__")),
)
# No source file of the package (dpt_fast/, and kernels/, installed as dpt_fast.kernels) above
# this many lines: one job per module.
MAX_FILE_LINES = 450
KERNELS_DIR = PACKAGE_DIR.parent / "kernels"


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """The dpt_fast modules ``module`` names in its import statements."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if child in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return components


def _package(module: str) -> str:
    """The package of ``module``: its subpackage or top-level module of dpt_fast."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


PACKAGE_GRAPH: dict[str, set[str]] = {_package(m): set() for m in GRAPH}
for _module, _targets in GRAPH.items():
    PACKAGE_GRAPH[_package(_module)] |= {_package(t) for t in _targets} - {_package(_module)}


def _in_layer(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in layer)


def test_the_import_graph_is_read():
    # Guards the reader itself: known edges must be found, lazy imports included.
    assert "dpt_fast.engine.session" in GRAPH["dpt_fast.engine.run"]
    assert "dpt_fast.backbone" in GRAPH["dpt_fast.base"]  # inside from_checkpoint
    assert "dpt_fast.base" not in GRAPH["dpt_fast.state_dict_meta"]  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _package("dpt_fast.engine.run") == "engine" and _package("dpt_fast") == "dpt_fast"
    assert "data" in PACKAGE_GRAPH["engine"] and "engine" in PACKAGE_GRAPH["sweeps"]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_package_cycles():
    # A cycle between packages that no two modules close (a -> b.x, b.y -> a) still ties them.
    cycles = _cycles(PACKAGE_GRAPH)
    assert not cycles, "package cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_every_package_has_a_layer():
    placed = [name for _, packages in LAYERS for name in packages]
    assert len(placed) == len(set(placed)), "a package in two layers"
    assert set(placed) == set(PACKAGE_GRAPH), (
        f"not in LAYERS (and docs/DESIGN.md §4): {sorted(set(PACKAGE_GRAPH) - set(placed))}; "
        f"gone: {sorted(set(placed) - set(PACKAGE_GRAPH))}")


def test_packages_import_only_their_layer_and_below():
    level = {name: i for i, (_, packages) in enumerate(LAYERS) for name in packages}
    upward = sorted(
        f"{source} ({LAYERS[level[source]][0]}) -> {target} ({LAYERS[level[target]][0]}): "
        + ", ".join(sorted(f"{m} -> {t}" for m in GRAPH if _package(m) == source
                           for t in GRAPH[m] if _package(t) == target))
        for source, targets in PACKAGE_GRAPH.items() for target in targets
        if level.get(target, -1) > level.get(source, len(LAYERS)))
    assert not upward, "imports of a higher layer: " + "; ".join(upward)


def test_no_source_file_is_too_long():
    files = [*PACKAGE_DIR.rglob("*.py"), *KERNELS_DIR.rglob("*.py")]
    assert len(files) > len(MODULES) // 2  # the folders were found
    long = sorted(f"{path.relative_to(PACKAGE_DIR.parent)}: {lines}" for path in files
                  if (lines := len(path.read_text(encoding="utf-8").splitlines()))
                  > MAX_FILE_LINES)
    assert not long, f"split by job (at most {MAX_FILE_LINES} lines): " + "; ".join(long)


def test_the_model_layer_never_imports_the_engine():
    bad = []
    for module in GRAPH:
        if not _in_layer(module, MODEL_LAYER):
            continue
        seen, todo = set(), [module]
        while todo:  # everything the module imports, directly or not
            for target in GRAPH[todo.pop()]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        engine = sorted(t for t in seen if t.startswith("dpt_fast.engine"))
        if engine:
            bad.append(f"{module} -> {engine}")
    assert not bad, "model layer importing the engine: " + "; ".join(bad)


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, check=False)


def test_import_registers_the_ops():
    result = _fresh_python(
        "import dpt_fast, torch\n"
        "from dpt_fast.ops import _extension\n"
        "torch.ops.dpt_fast.prompt_attention_fwd\n"
        "if _extension.extension_available():\n"
        "    torch.ops.dpt_fast.class_aware_attention\n"
        "    torch.ops.dpt_fast.class_aware_attention_backward\n"
        "print('ok', _extension.extension_available())\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_the_extension_is_registered_when_it_is_built():
    from dpt_fast.ops import _extension

    if not _extension.extension_available():
        pytest.skip(f"dpt_fast._C is not built here ({_extension.load_error()})")
    result = _fresh_python("import dpt_fast, torch; torch.ops.dpt_fast.class_aware_attention")
    assert result.returncode == 0, result.stderr


def test_help_is_fast_and_does_not_import_torch():
    from cli_helpers import DPT_FAST

    timings = []
    for _ in range(3):
        start = time.perf_counter()
        result = subprocess.run([DPT_FAST, "--help"], capture_output=True, text=True,
                                timeout=60, check=False)
        timings.append(time.perf_counter() - start)
        assert result.returncode == 0, result.stderr
    # The best of three: a shared CI machine may stall one start-up.
    assert min(timings) < 0.5, timings
    result = _fresh_python("import sys; sys.argv = ['dpt-fast']; import dpt_fast.cli; "
                           "print('torch' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr
