"""The package's module graph: no import cycles, and the pure-torch parts stay free of nnU-Net.

Every ``import``/``from ... import`` of an ``nnssl_joint`` module counts, at module level and inside
functions alike (a lazy import only hides a cycle until the function runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnssl_joint"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Dotted names imported by the file (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph = {}
    for name, path in modules.items():
        targets = {n for n in imported_names(path) if n in modules and n != name}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and graph["nnssl_joint.cli"]  # the walk sees the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("subpackage", ["ssl", "models", "common"])
def test_pure_torch_parts_do_not_import_nnunet(subpackage):
    offenders = {}
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        bad = sorted(n for n in imported_names(path) if n.split(".")[0] in ("nnunetv2", "batchgenerators",
                                                                             "batchgeneratorsv2"))
        if bad:
            offenders[module_name(path)] = bad
    assert offenders == {}


def test_library_modules_never_import_a_trainer_module():
    """``nnssl_joint.trainers`` (the repository's trainers/ folder) is only located, by ``trainer-path``:
    its ``__init__`` imports nothing and no library module imports a trainer module (they import nnU-Net's
    trainer, which the library must not need)."""
    trainers = PACKAGE.parent / "trainers"
    assert imported_names(trainers / "__init__.py") == set()
    trainer_modules = {f"nnssl_joint.trainers.{p.stem}" for p in trainers.glob("*.py")
                       if p.stem != "__init__"}
    assert trainer_modules
    offenders = {name: sorted(imported_names(path) & trainer_modules) for name, path in all_modules().items()}
    assert {k: v for k, v in offenders.items() if v} == {}
