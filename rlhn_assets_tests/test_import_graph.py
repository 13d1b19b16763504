"""The package's own modules import each other without a cycle. A cycle works only while every name is
looked up late (function-level imports, ``TYPE_CHECKING`` blocks), and breaks at the first module-level import
someone adds; shared types and constants belong in a module both sides import (e.g. ``lib/llm/types.py``).

Every import statement counts, wherever it stands: module level, inside a function, under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import rlhn_assets

PACKAGE_DIR = Path(rlhn_assets.__file__).parent
PACKAGE = PACKAGE_DIR.name


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str | None:
    """The longest prefix of ``name`` that is one of the package's modules (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """module -> the package's modules it imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    mods = _modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" for a in node.names]  # a submodule, or a name in ``src``
            for t in targets:
                dep = _resolve(t, known)
                if dep and dep != mod:
                    graph[mod].add(dep)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 30 and f"{PACKAGE}.lib.llm.client" in graph  # it did read the package
    cycles = find_cycles(graph)
    detail = "\n".join(
        " <-> ".join(c) + "\n    " + "\n    ".join(f"{a} imports {b}" for a in c for b in sorted(graph[a] & set(c)))
        for c in cycles
    )
    assert not cycles, f"import cycles in {PACKAGE}/ (move what both sides need into a third module):\n{detail}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize(
    "b_imports_a",
    [
        "from pkg.sub.a import X",  # module level
        "def f():\n    from pkg.sub import a\n",  # function level, submodule through its package
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",  # relative, type-only
        "import pkg.sub.a.X as alias\n",  # a dotted name resolves to its module
    ],
)
def test_the_checker_sees_a_cycle_however_the_import_is_written(tmp_path, b_imports_a):
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "sub/__init__.py": "",
            "sub/a.py": "from pkg.sub.b import Y\nX = 1\n",
            "sub/b.py": b_imports_a + "\nY = 2\n",
            "c.py": "import pkg.sub.a\n",
        },
    )
    graph = import_graph(root)
    assert graph["pkg.c"] == {"pkg.sub.a"}
    assert find_cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]


def test_the_checker_passes_an_acyclic_package(tmp_path):
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "types.py": "X = 1\n",
            "a.py": "from pkg.types import X\n",
            "b.py": "from pkg import a, types\n",
        },
    )
    graph = import_graph(root)
    assert graph == {"pkg": set(), "pkg.types": set(), "pkg.a": {"pkg.types"}, "pkg.b": {"pkg.a", "pkg.types"}}
    assert find_cycles(graph) == []
