"""The project's module import graph: every `import` of a project module, at module level or
inside a function (imports under `if TYPE_CHECKING:` are left out: they never run).

    python scripts/import_graph.py            # cycles and layer violations; exit 1 if any
    python scripts/import_graph.py --dot      # the graph in Graphviz dot format

Layers: the ground (ovpipe.core.*) imports no other project module; the stage packages
(curation, packing, trainer) import the ground and each other's modules but never the top
(ovpipe.registry, ovpipe.cli, ovpipe.pipeline, ovpipe.demo, ovpipe.submit, ray_jobs).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ovpipe", "curation", "packing", "trainer", "ray_jobs")
GROUND = "ovpipe.core"
STAGE_PACKAGES = ("curation", "packing", "trainer")
TOP = ("ovpipe.registry", "ovpipe.cli", "ovpipe.pipeline", "ovpipe.demo", "ovpipe.submit", "ray_jobs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            found[module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:  # relative import
            base = module.split(".")
            base = base[: len(base) - node.level + (1 if is_package else 0)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix] + [f"{prefix}.{a.name}" for a in node.names]
    return []


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        for name in _imported(node, module, path.name == "__init__.py"):
            while name and name not in known:  # `from a.b import c`: c may be a name, not a module
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def build_graph() -> dict[str, set[str]]:
    known = project_modules()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first: packages whose __init__ is empty
    # add no edges, so only their contents matter.
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _in(module: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if _in(module, GROUND) and not _in(dep, GROUND):
                bad.append(f"ground module {module} imports {dep} (the ground imports only the ground)")
            elif _in(module, STAGE_PACKAGES) and _in(dep, TOP):
                bad.append(f"stage module {module} imports the top-level {dep}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dot", action="store_true", help="print the graph in Graphviz dot format")
    args = ap.parse_args(argv)
    graph = build_graph()
    if args.dot:
        print("digraph imports {")
        for m in sorted(graph):
            for d in sorted(graph[m]):
                print(f'  "{m}" -> "{d}";')
        print("}")
        return 0
    found = cycles(graph)
    bad = layer_violations(graph)
    edges = sum(len(d) for d in graph.values())
    print(f"{len(graph)} modules, {edges} import edges (module level and inside functions)")
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    for line in bad:
        print("layer: " + line)
    if not found and not bad:
        print("no import cycles; the ground layer (ovpipe.core) imports no stage and no top module")
    return 1 if found or bad else 0


if __name__ == "__main__":
    sys.exit(main())
