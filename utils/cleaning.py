"""The registry of cleaning rules, and how a cleaning is measured against known noise.

A rule is one entry: its name, the records it needs, and a function `(Records, cfg) -> Flags`: the
flagged sample indices and, where the rule has one, the label it suggests for each (a flagged sample
is removed, or with `--relabel true` moved to its suggested label when retraining with
`--coreset_method relabel`). `clean_trainset.py --clean_rule NAME` runs one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from config import config as config_module
from utils.errors import InputError
from utils.records import NEEDS, Records


@dataclass
class Flags:
    index: np.ndarray  # sorted unique int64 sample indices the rule flags
    suggested_label: Optional[np.ndarray] = None  # per flagged sample, the label the rule believes in
    confidence: Optional[np.ndarray] = None  # per flagged sample, the rule's confidence in its suggestion
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    name: str
    flag: Callable  # (Records, cfg) -> Flags
    needs: tuple
    summary: str


RULES: dict = {}


def register_rule(name, *, needs=(), summary=""):
    def wrap(fn):
        if name in RULES:
            raise ValueError(f"cleaning rule {name!r} is registered twice")
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{name}: unknown needs {sorted(unknown)}; valid: {sorted(NEEDS)}")
        RULES[name] = Rule(name, fn, tuple(needs), summary or (fn.__doc__ or "").strip().split("\n")[0])
        config_module.CHOICES["clean_rule"] = tuple(RULES)  # the config's choices are the registry's
        return fn
    return wrap


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise InputError(f"unknown cleaning rule {name!r}; valid: {', '.join(RULES)}") from None


def run_rule(rule: Rule, rec: Records, cfg) -> Flags:
    return rule.flag(rec.load(rule.needs), cfg)


# --------------------------------------------------------------------------------------------- rules
@register_rule("argmax", needs=("scores",),
               summary="the paper's: the margin-free arg-max class is not the label")
def flag_argmax(rec: Records, cfg) -> Flags:
    """A sample whose margin-free arg-max class differs from its label (DiffProb's auxiliary cleaning)."""
    scores = rec.scores
    pred = scores["pred"]
    index = np.flatnonzero(pred != rec.labels).astype(np.int64)
    return Flags(index, pred[index], scores["pred_prob"][index])


# ---------------------------------------------------------------------------------------- measuring
def cleaning_quality(flagged: np.ndarray, noise: dict) -> dict:
    """Precision / recall of the flagged sample indices against the injected noise (noise.json)."""
    flips = {int(e["index"]) for e in noise.get("flipped", [])}
    opens = {int(e["index"]) for e in noise.get("open_set", [])}
    noisy = flips | opens
    flagged_set = set(map(int, flagged))
    hit = len(flagged_set & noisy)
    return {"removed": len(flagged_set), "noisy": len(noisy), "true_positives": hit,
            "precision": hit / len(flagged_set) if flagged_set else 0.0,
            "recall": hit / len(noisy) if noisy else 1.0,
            "recall_flipped": len(flagged_set & flips) / len(flips) if flips else None,
            "recall_open_set": len(flagged_set & opens) / len(opens) if opens else None}
