"""Which config keys a stage script reads: what its `--help` lists (`--help-all` lists every key).

Read from the source alone (ast), over the stage script and every project module it imports, directly or not:
a key counts when the code reads it as an attribute of a config (`cfg.lr`, `self.cfg.lr`, `run.cfg.lr`,
`getattr(cfg, "lr")`), or reaches it through the helpers that read a whole group (the head's parameters).
config/config.py itself is left out: it checks every key for every stage.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("utils", "backbones", "losses")
# Helpers that read a group of keys by name at run time, and the keys of each group.
GROUPS = {"head_kwargs": ("loss", "s", "m", "std", "head_args"), "head_params": ("loss", "s", "m", "std", "head_args"),
          "model_kwargs": ("network", "embedding_size", "SE", "dropout")}
# Read by every stage through config resolution and the runtime (device, precision, logging, output folder).
ALWAYS = ("dataset", "rec", "output", "device", "dtype", "seed")


@lru_cache(maxsize=None)
def _modules() -> dict:
    mods = {p.stem: p for p in REPO.glob("*.py")}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            parts = p.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


@lru_cache(maxsize=None)
def _scan(path: Path) -> tuple:
    """(project modules imported, names read as config attributes, group helpers called) of one file."""
    mods = _modules()
    tree = ast.parse(path.read_text(), filename=str(path))
    imported, keys, groups = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for a in node.names:
                name = f"{node.module}.{a.name}"
                imported.add(name if name in mods else node.module)
        elif isinstance(node, ast.Attribute) and "cfg" in ast.unparse(node.value).split(".")[-1]:
            keys.add(node.attr)
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in GROUPS:
                groups.add(func)
            if func == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                if "cfg" in ast.unparse(node.args[0]):
                    keys.add(node.args[1].value)
    return frozenset(m for m in imported if m in mods), frozenset(keys), frozenset(groups)


def stage_keys(script, fields) -> set:
    """Which of the config keys `fields` the stage script `script` (a path) and the modules it imports read."""
    mods = _modules()
    todo, seen, keys = [Path(script).resolve()], set(), set(ALWAYS)
    while todo:
        path = todo.pop()
        if path in seen or path.parent.name == "config":
            continue
        seen.add(path)
        imported, read, groups = _scan(path)
        keys |= read
        for g in groups:
            keys |= set(GROUPS[g])
        todo += [mods[m] for m in imported]
    return keys & set(fields)
