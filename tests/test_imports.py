"""The package's import structure: no cycles, and the model layer never imports the engine.

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
               "dpt_fast.cocoop",
               "dpt_fast.prompts", "dpt_fast.loss", "dpt_fast.state_dict_meta",
               "dpt_fast.backbone", "dpt_fast.checkpoint", "dpt_fast.clip_interop",
               "dpt_fast.ops", "dpt_fast.config")


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


def _in_layer(module: str, layer: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in layer)


def test_the_import_graph_is_read():
    # Guards the reader itself: known edges must be found, lazy imports included.
    assert "dpt_fast.engine.session" in GRAPH["dpt_fast.engine.run"]
    assert "dpt_fast.backbone" in GRAPH["dpt_fast.base"]  # inside from_checkpoint
    assert "dpt_fast.base" not in GRAPH["dpt_fast.state_dict_meta"]  # TYPE_CHECKING only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


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
    from test_cli_errors import DPT_FAST

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
