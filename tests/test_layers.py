"""The folders are the architecture: imports point down the layers, never up, never in a circle.

algorithm   the step, the networks, optimizers, schedules, the loop   torch, numpy, stdlib
data        download, IDX, sources                                    stdlib, requests, rich
transforms  compile, micro-batches, CUDA graphs, vmap, all-reduce    + algorithm
tool        run, checkpoints, reports, outputs, bench, torchrun      + data, transforms
viz         the pictures                                             + tool, but never the CLI
tool/cli.py the commands                                             everything
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tinymnist"

# What each layer may import from the package (tinymnist.errors is the one shared root).
ALLOWED = {
    "algorithm": {"errors", "algorithm"},
    "data": {"errors", "data"},
    "transforms": {"errors", "algorithm", "transforms"},
    "tool": {"errors", "algorithm", "data", "transforms", "tool"},
    "viz": {"errors", "algorithm", "data", "transforms", "tool", "viz"},
}
TOP = {"tinymnist.tool.cli", "tinymnist.__main__", "tinymnist.tool.entry"}  # may import any layer
# Function-local imports of our own modules, each with its reason. Optional extras load
# late too, but they are not our modules.
LATE = {
    ("tinymnist.tool.entry", "tinymnist.tool.cli"): "Ctrl-C handlers go in before torch is imported",
    ("tinymnist.tool.entry", "tinymnist.tool.torchrun"): "the same: torchrun.py imports torch",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported tinymnist module, imported inside a function?) for every import in the file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]  # a module, or a name in one
        found += [(resolve(name), node.col_offset > 0) for name in names if name.startswith("tinymnist.")]
    return found


def resolve(name: str) -> str:
    """`tinymnist.tool.run.train` -> the module tinymnist.tool.run; packages stay packages."""
    while name.count(".") > 0:
        parts = name.split(".")
        if (PACKAGE.parent / Path(*parts)).with_suffix(".py").is_file() or (PACKAGE.parent / Path(*parts)).is_dir():
            return name
        name = name.rsplit(".", 1)[0]
    return name


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_the_package_has_the_five_layers():
    assert {layer(m) for m in MODULES} >= set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    own = layer(module)
    for imported, late in imports(MODULES[module]):
        if late:
            assert (module, imported) in LATE, f"{module} imports {imported} inside a function"
        if module in TOP or imported == "tinymnist" or layer(imported) in (None, "__main__"):
            continue
        assert layer(imported) in ALLOWED.get(own, {"errors"}), f"{module} imports {imported}, a higher layer"
        assert imported != "tinymnist.tool.cli", f"{module} imports the CLI"


def test_no_import_circles():
    graph = {m: {i for i, _ in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    visiting, done = set(), set()

    def visit(m, path):
        if m in done:
            return
        assert m not in visiting, "import circle: " + " -> ".join([*path, m])
        visiting.add(m)
        for n in graph[m]:
            visit(n, [*path, m])
        visiting.discard(m)
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_the_algorithm_loads_neither_requests_rich_nor_typer():
    algorithm = sorted(m for m in MODULES if layer(m) in ("algorithm", "transforms"))
    code = (
        f"import sys; import {', '.join(algorithm)}; print(sorted({{'requests', 'rich', 'typer'}} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
