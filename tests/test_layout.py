"""The library's layout: its subpackages import one another without cycles, and nothing that
`make run` runs or a logged model carries imports the tests' and bench's helpers."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from slmkit import LIBRARY, PROJECT_ROOT

SUBPACKAGES = {path.name for path in LIBRARY.iterdir() if (path / "__init__.py").is_file()}


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def subpackage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "slmkit" and len(parts) > 1 and parts[1] in SUBPACKAGES else None


def subpackage_imports() -> dict[str, set[str]]:
    arrows: dict[str, set[str]] = defaultdict(set)
    for package in SUBPACKAGES:
        for path in (LIBRARY / package).rglob("*.py"):
            for module in imported_modules(path):
                target = subpackage_of(module)
                if target and target != package:
                    arrows[package].add(target)
    return arrows


def test_subpackages_import_each_other_without_a_cycle():
    arrows = subpackage_imports()

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for target in arrows.get(todo.pop(), ()):
                if target == goal:
                    return True
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    cycles = sorted((a, b) for a in SUBPACKAGES for b in SUBPACKAGES if a < b and reaches(a, b) and reaches(b, a))
    assert cycles == [], f"subpackages that import each other, directly or not: {cycles}"
    assert len(SUBPACKAGES) >= 8


def test_the_library_steps_and_wrappers_never_import_tests_bench_or_harness():
    shipped = [
        *LIBRARY.rglob("*.py"),
        *(PROJECT_ROOT / "steps").glob("*.py"),
        *(PROJECT_ROOT / "wrappers").glob("*.py"),
    ]
    offending = {
        str(path.relative_to(PROJECT_ROOT)): module
        for path in shipped
        for module in imported_modules(path)
        if module.split(".")[0] in ("tests", "bench", "harness")
    }
    assert offending == {}
