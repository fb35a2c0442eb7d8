"""The package's floors: every module sits on one floor, and no import (at module top or inside a function)
runs up a floor. Also: no module over 400 lines and no function over 60, so each stays readable."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hsplit_nb"
FLOORS = [
    ("utilities and the architecture table", ["io", "architectures"]),
    ("data and models", ["data", "clientdata", "models", "metrics"]),
    ("split and adapters", ["split", "adapters"]),
    ("IWI, ARMSC and NAA, and their cost models", ["importance", "costs", "latency", "planner", "paper", "aggregation",
                                                                  "regime"]),
    ("the method table and the settings", ["methods", "config", "testbed"]),
    ("federation", ["federation"]),
    ("experiments and their figures", ["experiment", "runfolder", "plots", "quickstart", "reporting",
                                        "comparison"]),
    ("the multi-process runner", ["distributed"]),
    ("notebooks, widgets and the command line", ["notebook", "walkthrough", "widgets", "reproduce", "__main__", "__init__"]),
]
FLOOR = {name: k for k, (_, names) in enumerate(FLOORS) for name in names}


def _top(path: Path) -> str:
    """The top-level name of a module inside the package (`federation/server.py` -> `federation`)."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package module) of every relative import in the file."""
    rel_parts = path.relative_to(PACKAGE).parts
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(rel_parts[:-1])[: max(0, len(rel_parts) - node.level)]
            target = base + (node.module.split(".") if node.module else [])
            names = target[:1] if target else [a.name for a in node.names]
            out += [(node.lineno, n) for n in names]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_floor():
    assert sorted({_top(p) for p in MODULES} - set(FLOOR)) == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_up_a_floor(path):
    mine = FLOOR[_top(path)]
    upward = [(line, name) for line, name in _imports(path) if name in FLOOR and FLOOR[name] > mine]
    assert upward == [], f"{path.name} ({FLOORS[mine][0]}) imports from a higher floor: {upward}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_and_functions_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= 400, path
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == [], f"{path.name}: functions over 60 lines {long}"


def test_the_check_reads_relative_imports_at_every_depth():
    """Imports inside functions and from a sub-package count: the check is not vacuous."""
    assert "models" in {n for _, n in _imports(PACKAGE / "config.py")}  # imported inside a function there
    launcher = {n for _, n in _imports(PACKAGE / "distributed" / "launcher.py")}
    assert {"config", "models", "distributed"} <= launcher  # `..config`, `..models` (in a function), `.entry`
