"""The floors hold: every module imports, and no package imports one it must not know (issue 29)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("decoding", "retrieval", "app", "ui", "bench", "cli")

# package -> the first-party packages it must never import (at module level or inside a function).
FORBIDDEN = {
    "decoding": {"retrieval", "app", "ui", "bench", "cli"},
    "retrieval": {"decoding", "app", "ui", "bench", "cli"},
    "app": {"ui", "bench", "cli"},
    # ui/ and bench/ reach decoding/ and retrieval/ only through app.reexports.
    "ui": {"decoding", "retrieval", "bench", "cli"},
    "bench": {"decoding", "retrieval", "ui", "cli"},
}


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_packages(path: Path) -> set[str]:
    """The top-level first-party packages a source file imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_reaches_a_forbidden_package(package: str) -> None:
    wrong = {f"{path.relative_to(REPO)}: {sorted(hit)}" for path in modules(package)
             if (hit := imported_packages(path) & FORBIDDEN[package])}
    assert not wrong, f"{package}/ imports what it must not: {sorted(wrong)}"


def test_every_module_imports() -> None:
    """One fresh interpreter imports every module (a stale name in an import fails here, not at run time)."""
    names = [module_name(path) for package in PACKAGES for path in modules(package)]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", script, *names], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The first-party modules a source file imports (type-only imports included): `from a.b import c`
    counts as a.b.c when that is a module, else as a.b."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                         for alias in node.names)
    return found & known


def test_no_import_circles() -> None:
    """Not even type-only ones: a circle means two files hold one job, or a shared type lives in the wrong file."""
    paths = {module_name(path): path for package in PACKAGES for path in modules(package)}
    known = set(paths)
    graph = {name: imported_modules(path, known) - {name} for name, path in paths.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return False

    circles = sorted({" <-> ".join(sorted((a, b))) for a, targets in graph.items() for b in targets
                      if reaches(b, a)})
    assert not circles, f"import circles: {circles}"
