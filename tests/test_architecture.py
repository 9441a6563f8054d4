"""The package's shape, checked: no import cycles, no component passed off as another,
and the run folder's layout spelled in one place."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
RUN_FOLDER_NAMES = ("checkpoint.sqlite", "events.jsonl", ".run")
# The parts an executor is wired from: each kind is a protocol, never another kind cast.
COMPONENT_CLASSES = {
    "Checkpoint",
    "ShardResults",
    "Pacer",
    "LeasedPacer",
    "Budget",
    "AllowanceBudget",
    "Provider",
}
COMPONENT_NAMES = ("pacer", "results", "checkpoint", "budget", "sink", "provider")


def _sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text())) for path in sorted(PACKAGE.rglob("*.py"))]


def test_no_module_imports_itself_through_others() -> None:
    graph = grimp.build_graph("pipeline", exclude_type_checking_imports=True)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back:
                cycles.append(" -> ".join((module, *back)))
    assert cycles == []


def test_no_cast_or_ignore_stands_one_component_in_for_another() -> None:
    found = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "cast"
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id in COMPONENT_CLASSES
            ):
                found.append(f"{path.name}:{node.lineno} cast({node.args[0].id}, ...)")
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if "type: ignore" in line and any(name in code for name in COMPONENT_NAMES):
                found.append(f"{path.name}:{number} {line.strip()}")
    assert found == []


def test_the_run_folder_layout_is_spelled_only_by_run_dir() -> None:
    spelled = []
    for path, tree in _sources():
        if path.name == "job.py" or "simulator" in path.parts:
            continue
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and any(name in node.value for name in RUN_FOLDER_NAMES)
                and len(node.value) < 40
            ):
                spelled.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert spelled == []
