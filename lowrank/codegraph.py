"""The import graph of lowrank's own modules, read from their source (``ast``; nothing is imported).

Two uses: the workflow's code fingerprints (a rule's params hold a hash of every lowrank module its script can
run: the script's lowrank imports and everything they import, at module level or inside functions), and the test
that the package has no import circle and few imports inside functions (tests/unit/test_import_graph.py).
"""

from __future__ import annotations

import ast
import hashlib
import os
from pathlib import Path

__all__ = ["PACKAGE", "import_graph", "cycles", "imported_modules", "closure", "code_fingerprint"]

PACKAGE = Path(__file__).resolve().parent

Edges = dict[str, set[str]]


def _targets(node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The lowrank modules one import statement names: ``from . import x``, ``from .x import y``,
    ``from lowrank.x import y``, ``from lowrank import x``, ``import lowrank.x``."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif node.level == 1 or node.module == "lowrank" or (node.module or "").startswith("lowrank."):
        base = (node.module or "") if node.level else (node.module or "").removeprefix("lowrank").lstrip(".")
        names = [f"lowrank.{base}" if base else f"lowrank.{a.name}" for a in node.names]
    else:
        return set()
    return {n.split(".")[1] for n in names if n.startswith("lowrank.")} & modules


def _walk_imports(tree: ast.AST, modules: set[str]) -> list[tuple[str, int, bool]]:
    """``(module, line, inside a function)`` of every lowrank import in ``tree``."""
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, child.lineno, inside) for t in sorted(_targets(child, modules)))
            visit(child, inside)

    visit(tree, False)
    return found


def _modules(package: Path) -> set[str]:
    return {p.stem for p in package.glob("*.py")}


def import_graph(package: Path = PACKAGE) -> tuple[Edges, list[tuple[str, str, int]]]:
    """``(edges, function_level)``: each module's lowrank imports (at module level or inside functions), and the
    ``(module, imported module, line)`` of every import inside a function."""
    modules = _modules(package)
    edges: Edges = {m: set() for m in modules}
    function_level: list[tuple[str, str, int]] = []
    for path in sorted(package.glob("*.py")):
        for target, line, inside in _walk_imports(ast.parse(path.read_text()), modules - {path.stem}):
            edges[path.stem].add(target)
            if inside:
                function_level.append((path.stem, target, line))
    return edges, function_level


def cycles(edges: Edges) -> list[list[str]]:
    """The import circles: strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def imported_modules(script: str | os.PathLike, package: Path = PACKAGE) -> set[str]:
    """The lowrank modules a script imports, directly or through the sibling modules it imports (a rule's script
    and its ``_adapter``)."""
    modules = _modules(package)
    todo, seen, found = [Path(script)], set(), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        found |= {t for t, _, _ in _walk_imports(tree, modules)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            todo.extend(path.parent / f"{n}.py" for n in names if (path.parent / f"{n}.py").is_file())
    return found


def closure(start: set[str], edges: Edges) -> set[str]:
    """Every module reachable from ``start`` in the import graph (``start`` included)."""
    done: set[str] = set()
    todo = list(start)
    while todo:
        m = todo.pop()
        if m not in done:
            done.add(m)
            todo.extend(edges.get(m, ()))
    return done


def code_fingerprint(script: str | os.PathLike, package: Path = PACKAGE, edges: Edges | None = None) -> str:
    """Short sha256 of every lowrank module ``script`` can run (its import closure, plus the package's
    ``__init__``): editing one of them reruns exactly the rules whose scripts reach it. ``edges``: the package's
    import graph when the caller has it already (:func:`import_graph`)."""
    if edges is None:
        edges, _ = import_graph(package)
    h = hashlib.sha256()
    for m in sorted(closure(imported_modules(script, package), edges) | {"__init__"}):
        h.update(m.encode())
        h.update((package / f"{m}.py").read_bytes())
    return h.hexdigest()[:12]
