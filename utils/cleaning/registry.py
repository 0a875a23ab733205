"""The registry of cleaning rules: every rule is one entry (name, the records it reads, its function), and how
one is checked and run.

A rule's function takes the loaded `Records` and the config and returns `Flags` (utils/cleaning/rules.py): the
flagged sample indices and, per flagged sample, the label the rule suggests (-1 for an outlier: a sample no identity
claims) and its confidence. A flagged sample is removed, or with `--relabel true` moved to its suggested label when
retraining with `--coreset_method relabel`. `clean_trainset.py --clean_rule NAME` runs one; `--clean_agree A,B` keeps
only what rules A and B flag too. A new rule is one `@register_rule(...)` function here plus its test; the `clean_rule`
choices of every stage and the README's rule line (`rule_line()`) come from the registry.

The package's other modules: `rules.py` (what the rules decide on their probabilities), `probabilities.py` (where
those come from), `lists.py` (the mislabeled / outlier lists), `quality.py` (a cleaning against known noise),
`contact_sheet.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from utils.artifacts.records import NEEDS, Records
from utils.artifacts.records import GEOMETRY_KEYS, SUBCENTER_KEY
from utils.cleaning.geometry import center_angle_flags, require_geometry, subcenter_flags
from utils.cleaning.probabilities import PROB_SOURCES, epoch_window, trajectory_probs
from utils.cleaning.rules import Flags, confident_learning, soft_label_flags
from utils.errors import InputError


@dataclass(frozen=True)
class Rule:
    name: str
    flag: Callable  # (Records, cfg) -> Flags
    needs: object  # tuple of Records needs, or cfg -> tuple where a config key chooses the input
    summary: str


RULES: dict = {}


def register_rule(name, *, needs=(), summary=""):
    def wrap(fn):
        if name in RULES:
            raise ValueError(f"cleaning rule {name!r} is registered twice")
        unknown = set() if callable(needs) else set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{name}: unknown needs {sorted(unknown)}; valid: {sorted(NEEDS)}")
        RULES[name] = Rule(name, fn, needs if callable(needs) else tuple(needs),
                           summary or (fn.__doc__ or "").strip().split("\n")[0])
        return fn
    return wrap


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise InputError(f"unknown cleaning rule {name!r}; valid: {', '.join(RULES)}") from None


def rule_needs(rule: Rule, cfg) -> tuple:
    return tuple(rule.needs(cfg)) if callable(rule.needs) else rule.needs


def run_rule(rule: Rule, rec: Records, cfg) -> Flags:
    """The rule's flags; with `cfg.clean_agree`, only the samples every named rule flags too (the
    suggestions and confidences stay the first rule's)."""
    check_clean_config(cfg)
    others = [get_rule(name) for name in cfg.clean_agree or ()]
    for r in (rule, *others):
        rec.load(rule_needs(r, cfg))  # a missing input stops the stage before any work
    flags = rule.flag(rec, cfg)
    if others:
        flagged_by = {rule.name: int(flags.index.size)}
        keep = flags.index
        for other in others:
            index = other.flag(rec, cfg).index
            flagged_by[other.name] = int(index.size)
            keep = np.intersect1d(keep, index, assume_unique=True)
        flags = flags.subset(keep)
        flags.info["agree"] = {"rules": [rule.name, *(o.name for o in others)], "flagged_by": flagged_by}
    return flags


def rule_line() -> str:
    """The README's line on the cleaning rules, generated from the registry (a test checks the README)."""
    return ("Cleaning rules (`clean_trainset.py --clean_rule NAME`, registry in `utils/cleaning/registry.py`): "
            + "; ".join(f"`{r.name}`: {r.summary}" for r in RULES.values()) + ".")


def default_rule() -> str:
    """The `clean_rule` a config has unless told otherwise: the paper's (DiffProb's auxiliary cleaning)."""
    return "argmax"


def rule_choices() -> tuple:
    """The values `clean_rule` accepts (config asks when it checks a config)."""
    return tuple(RULES)


def check_clean_config(cfg):
    """Ranges of the cleaning keys (config/config.py); an InputError names the key and its valid range."""
    get_rule(cfg.clean_rule)
    if not 0 < cfg.clean_margin_quantile < 1:
        raise InputError(f"clean_margin_quantile={cfg.clean_margin_quantile} must be in (0, 1): the quantile of the "
                         f"clean majority's margins a flagged sample's margin must reach")
    if not 0 <= cfg.clean_tolerance <= 1:
        raise InputError(f"clean_tolerance={cfg.clean_tolerance} must be in [0, 1] (share of the flagged set)")
    if cfg.clean_round < 0:
        raise InputError(f"clean_round={cfg.clean_round} must be >= 0 (0: no rounds)")
    if cfg.clean_probs not in PROB_SOURCES:
        raise InputError(f"clean_probs={cfg.clean_probs!r}: valid: {', '.join(PROB_SOURCES)}")
    if not 0 <= cfg.clean_angle <= 180:
        raise InputError(f"clean_angle={cfg.clean_angle} must be in [0, 180] (degrees: the subcenter rule's largest "
                         f"angle to an identity's dominant sub-center; 0: a bound from the data)")
    if cfg.clean_epochs.strip():
        epoch_window(cfg.clean_epochs, 10 ** 9)  # the format; the range is checked against the records
    for name in cfg.clean_agree or ():
        get_rule(name)
        if name == cfg.clean_rule:
            raise InputError(f"clean_agree names {name!r}, the rule itself; name the other rules that must agree")


# ---------------------------------------------------------------------------------------------- the rules
@register_rule("argmax", needs=("scores",),
               summary="the paper's: the margin-free arg-max class is not the label")
def flag_argmax(rec: Records, cfg) -> Flags:
    """A sample whose margin-free arg-max class differs from its label (DiffProb's auxiliary cleaning).

    With scores of every epoch (`eval_trainset.py --use_all_epochs true`) the paper's rule: per epoch the
    sample's p(label), or -1 where the arg-max is another identity, averaged over the epochs (`argmax_vote`);
    a sample whose average is below 0 is removed. The suggestion is the last epoch's arg-max.
    """
    scores = rec.scores
    pred = scores["pred"]
    if "argmax_vote" in scores:
        index = np.flatnonzero(np.asarray(scores["argmax_vote"]) < 0).astype(np.int64)
    else:
        index = np.flatnonzero(pred != rec.labels).astype(np.int64)
    return Flags(index, pred[index], scores["pred_prob"][index])


@register_rule("trajectory", needs=("topk",),
               summary="the soft label averaged over the training epochs (`--clean_epochs`) prefers another "
                       "identity by the clean majority's margin (`--clean_margin_quantile`): mislabeled when that "
                       "identity claims it as it claims its own images, else an outlier")
def flag_trajectory(rec: Records, cfg) -> Flags:
    """"Data Pruning Can Do More"'s soft label as a cleaning rule (see `soft_label_flags`)."""
    probs = trajectory_probs(rec, cfg, keep=2)  # the rule reads the top class and the runner-up
    flags = soft_label_flags(probs, rec.labels, rec.num_classes, cfg.clean_margin_quantile)
    flags.info["epochs"] = cfg.clean_epochs or "all"
    return flags


@register_rule("confident_learning", needs=lambda cfg: PROB_SOURCES[cfg.clean_probs][1],
               summary="confident learning (Northcutt et al.): another identity reaches its own mean "
                       "self-confidence (off-diagonal of the confident joint) on the soft labels, or on the scores "
                       "with `--clean_probs scores`")
def flag_confident_learning(rec: Records, cfg) -> Flags:
    """Confident learning's off-diagonal rule (see `confident_learning`) on `--clean_probs` probabilities."""
    probs = PROB_SOURCES[cfg.clean_probs][0](rec, cfg)
    issue, guess, guess_prob, thresholds = confident_learning(probs, rec.labels, rec.num_classes)
    index = np.flatnonzero(issue).astype(np.int64)
    info = {"probabilities": cfg.clean_probs, "mean_threshold": float(np.mean(thresholds[thresholds <= 1]))}
    if cfg.clean_probs == "trajectory":
        info["epochs"] = cfg.clean_epochs or "all"
    return Flags(index, guess[index], guess_prob[index], info)


@register_rule("center_angle", needs=("scores",),
               summary="RobustFace's angles: another identity's centre is nearer than its own (mislabeled), or it is "
                       "farther from its own than its identity's majority allows by Tukey's fence (an outlier); "
                       "thresholds from the data")
def flag_center_angle(rec: Records, cfg) -> Flags:
    """The angle to the labelled identity's centre against the nearest other one (utils/cleaning/geometry.py)."""
    scores = rec.scores
    require_geometry(scores, GEOMETRY_KEYS)
    return center_angle_flags(scores["label_cos"], scores["other_cos"], scores["other_class"], rec.labels,
                              rec.num_classes)


@register_rule("subcenter", needs=("scores",),
               summary="Sub-center ArcFace (`--loss SubCenterArcFace`): its nearest sub-center is not its identity's "
                       "dominant one, or it lies more than `--clean_angle` degrees (75; 0: a bound from the data) from it")
def flag_subcenter(rec: Records, cfg) -> Flags:
    """Sub-center ArcFace's cleaning (Deng et al., ECCV 2020) on the scoring model's sub-centers."""
    scores = rec.scores
    if SUBCENTER_KEY not in scores:
        raise InputError("the subcenter rule needs a model trained with sub-centers: train the original model with "
                         "--loss SubCenterArcFace (--head_args k=3) and score it with eval_trainset.py")
    require_geometry(scores, GEOMETRY_KEYS)
    return subcenter_flags(scores[SUBCENTER_KEY], rec.labels, rec.num_classes, cfg.clean_angle,
                           scores["other_cos"], scores["other_class"])
