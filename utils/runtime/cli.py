"""One command-line style for the scripts with their own options (data tools, export, the pipeline): the paper's
`--key value` with underscores, every old spelling still accepted.

`flag(name)` gives `--key_name` and its old `--key-name`; `add_bool` makes a switch that takes `true`/`false` like
every config key (`--overwrite true`) and still accepts the bare form (`--overwrite`).
"""
from __future__ import annotations

import argparse

from config.config import FALSE_WORDS, TRUE_WORDS



def flag(name: str) -> list:
    """The option strings of `name` (either spelling): `--a_b` first (the style shown), then `--a-b`."""
    name = name.lstrip("-")
    under, dash = name.replace("-", "_"), name.replace("_", "-")
    return [f"--{under}"] + ([f"--{dash}"] if dash != under else [])


def parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_bool(parser: argparse.ArgumentParser, name: str, help: str, default: bool = False):
    """`--name true|false`, or `--name` alone for true."""
    parser.add_argument(*flag(name), type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL",
                        help=f"{help} (true/false; default: {str(default).lower()})")
