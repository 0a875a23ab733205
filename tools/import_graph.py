"""The project's import graph, from the source alone (ast): every import, at module level or inside a
function, counts. Prints the height of the graph (the longest chain of imports, in modules) and the
chain itself, and checks the layering rule: no module under utils/ imports a stage script.

    python tools/import_graph.py            # summary
    python tools/import_graph.py --edges    # every edge too
Exit status 1 when a rule is broken or the graph has a cycle.
"""
from __future__ import annotations

import argparse
import ast
import sys
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "backbones", "losses", "config", "tools")


def project_modules() -> dict:
    """module name -> file, for the stage scripts at the top level and the packages' modules."""
    mods = {p.stem: p for p in REPO.glob("*.py")}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = p
    return mods


def imports_of(path: Path, mods: dict) -> set:
    """The project modules a file imports (`from pkg import name` is pkg.name when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in mods:  # `import utils.data.recordio as r` -> utils.data.recordio
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict:
    mods = project_modules()
    return {m: sorted(imports_of(p, mods) - {m}) for m, p in mods.items()}


def is_script(name: str) -> bool:
    return "." not in name and name not in PACKAGES


def height(g: dict):
    """(height, longest chain) of the graph; raises on a cycle."""
    @lru_cache(maxsize=None)
    def chain(m, stack=()):
        if m in stack:
            raise RecursionError(" -> ".join(stack + (m,)))
        best = ()
        for d in g.get(m, ()):
            c = chain(d, stack + (m,))
            if len(c) > len(best):
                best = c
        return (m,) + best

    best = max((chain(m) for m in g), key=len)
    return len(best), best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edges", action="store_true")
    args = p.parse_args(argv)
    g = graph()
    bad = [(m, d) for m, ds in g.items() if m.startswith("utils") for d in ds if is_script(d)]
    for m, d in bad:
        print(f"layering: library module {m} imports the stage script {d}")
    try:
        h, longest = height(g)
    except RecursionError as e:
        print(f"import cycle: {e}")
        return 1
    if args.edges:
        for m in sorted(g):
            print(f"{m}: {', '.join(g[m])}")
    print(f"{len(g)} modules; graph height {h}: {' -> '.join(longest)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
