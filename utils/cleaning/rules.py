"""The registry of cleaning rules, the probabilities they read, and how a cleaning is measured against known noise.

A rule is one entry: its name, the records it needs, and a function `(Records, cfg) -> Flags`: the
flagged sample indices and, per flagged sample, the label the rule suggests (-1 for an outlier: a
sample no identity claims) and its confidence. A flagged sample is removed, or with `--relabel true`
moved to its suggested label when retraining with `--coreset_method relabel`. `clean_trainset.py
--clean_rule NAME` runs one; `--clean_agree A,B` keeps only what rules A and B flag too.

Where each rule's probabilities come from:

* `argmax` (the paper's): the scoring model's margin-free arg-max class (`scores/...npz`, the last epoch
  by default; in a cleaning round the round's retrained model).
* `trajectory` ("Data Pruning Can Do More", Yang et al.): the soft label of the original training's
  top-k records over the epochs `--clean_epochs` (`trajectory_soft_labels`).
* `confident_learning` (Northcutt et al. 2021): either, by `--clean_probs` (trajectory by default).

Probabilities are sparse (`SparseProbs`): per sample a few classes and the labelled one, never an
N x K matrix, so the rules run at Glint360K scale (17M images, 360K identities).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from utils.dynamics.blocks import for_each_block
from utils.dynamics.soft_labels import SparseProbs, checked_records, soft_labels
from utils.errors import InputError
from utils.artifacts.records import NEEDS, Records, sample_names

__all__ = ["Flags", "Rule", "RULES", "register_rule", "get_rule", "rule_needs", "run_rule", "rule_line",
           "SparseProbs", "trajectory_soft_labels", "confident_learning", "soft_label_flags", "epoch_window",
           "trajectory_probs", "scores_probs", "check_clean_config", "flag_lists", "flag_change", "cleaning_quality",
           "sample_names", "write_flag_lists", "MISLABELED_DTYPE", "OUTLIER_DTYPE"]


@dataclass
class Flags:
    index: np.ndarray  # sorted unique int64 sample indices the rule flags
    suggested_label: Optional[np.ndarray] = None  # per flagged sample, the label the rule believes in (-1: none)
    confidence: Optional[np.ndarray] = None  # per flagged sample: p(suggested label), or for an outlier its
    #                                          largest class probability (low: no identity claims it)
    info: dict = field(default_factory=dict)
    outlier: Optional[np.ndarray] = None  # per flagged sample, True where no identity is suggested

    def __post_init__(self):
        if self.outlier is None:
            self.outlier = np.zeros(self.index.size, dtype=bool)

    def subset(self, keep: np.ndarray) -> "Flags":
        """The flags of the sample indices `keep` (a subset of `index`)."""
        pos = np.searchsorted(self.index, keep)
        pick = lambda a: None if a is None else a[pos]  # noqa: E731
        return Flags(self.index[pos], pick(self.suggested_label), pick(self.confidence), dict(self.info),
                     self.outlier[pos])


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
    return ("Cleaning rules (`clean_trainset.py --clean_rule NAME`, registry in `utils/cleaning/rules.py`): "
            + "; ".join(f"`{r.name}`: {r.summary}" for r in RULES.values()) + ".")


# ------------------------------------------------------------------------------------- configuration
def epoch_window(text: str, num_epochs: int) -> slice:
    """`--clean_epochs` ("A-B", "A" or "" for all; 1-based, inclusive) as a slice of the recorded epochs."""
    if not text.strip():
        return slice(0, num_epochs)
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not m:
        raise InputError(f"clean_epochs={text!r}: expected 'A-B' (1-based, inclusive), 'A', or '' for all epochs")
    first, last = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= first <= last <= num_epochs:
        raise InputError(f"clean_epochs={text!r}: the training recorded epochs 1-{num_epochs}; give A-B with "
                         f"1 <= A <= B <= {num_epochs}")
    return slice(first - 1, last)


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
    if cfg.clean_epochs.strip():
        epoch_window(cfg.clean_epochs, 10 ** 9)  # the format; the range is checked against the records
    for name in cfg.clean_agree or ():
        get_rule(name)
        if name == cfg.clean_rule:
            raise InputError(f"clean_agree names {name!r}, the rule itself; name the other rules that must agree")


# ------------------------------------------------------------------------------------- probabilities
def trajectory_soft_labels(topk_logits, topk_index, rest_mean_logit, labels, num_classes: int,
                           keep: int = None) -> SparseProbs:
    """The soft label of "Data Pruning Can Do More": softmax of each sample's logits averaged over epochs.

    Inputs are the training records (utils/training/loop.py): `topk_logits` (E, N, k) margin-free, `topk_index`
    (E, N, k) (-1: the sample was not seen that epoch), `rest_mean_logit` (E, N) the mean logit of the
    classes outside that epoch's top k. Averaged over the epochs a sample was seen in: a class's logit
    where it is in the top k, the epoch's rest mean elsewhere. What is approximated: a class outside an
    epoch's top k takes the rest mean instead of its own logit, and the classes never in any top k share
    one value (`rest_prob`); both are exact when k = num_classes. Since a top-k logit is at least the
    rest mean, every listed class is at least as probable as any unlisted one, so `classes[:, 0]` is the
    soft label's arg-max. Keeps the `keep` (default k) most probable classes per sample (ties: the lower
    class id first). One streamed pass in blocks of samples, in float64, no N x K array (utils/dynamics/soft_labels.py).
    """
    lg, ix, rest, C = checked_records(topk_logits, topk_index, rest_mean_logit, num_classes)
    labels = np.asarray(labels, dtype=np.int64)
    N, k = lg.shape[1:]
    if labels.shape != (N,):
        raise InputError(f"labels of shape {labels.shape} for top-k records of {N} samples")
    keep = k if keep is None else int(keep)
    return soft_labels(lg, ix, rest, C, labels, keep)  # streamed in blocks, on every core (utils/dynamics/soft_labels.py)


def scores_probs(rec: Records, cfg=None) -> SparseProbs:
    """The scoring model's probabilities (`Records.scores`): its arg-max class and the labelled class."""
    s = rec.scores
    n = len(rec.labels)
    return SparseProbs(np.asarray(s["pred"], np.int64)[:, None], np.asarray(s["pred_prob"], np.float64)[:, None],
                       np.asarray(s["gt_prob"], np.float64), np.full(n, np.nan), None, "scores")


def trajectory_probs(rec: Records, cfg, keep: int = None) -> SparseProbs:
    """Soft labels of the original training's top-k records over the epochs `cfg.clean_epochs`, with the `keep`
    (default: the recorded k) most probable classes of each sample."""
    t = rec.topk
    window = epoch_window(cfg.clean_epochs, t["topk_logits"].shape[0])
    return trajectory_soft_labels(t["topk_logits"][window], t["topk_index"][window], t["rest_mean_logit"][window],
                                  rec.labels, rec.num_classes, keep)


PROB_SOURCES = {"trajectory": (trajectory_probs, ("topk",)), "scores": (scores_probs, ("scores",))}


def rule_choices() -> tuple:
    """The values `clean_rule` accepts (config asks when it checks a config)."""
    return tuple(RULES)


def prob_source_choices() -> tuple:
    """The values `clean_probs` accepts."""
    return tuple(PROB_SOURCES)


# ------------------------------------------------------------------------------------------- criteria
_BIG = np.iinfo(np.int64).max


def _lowest_class_at_max(cls, values):
    """Per row, the class of the largest value (ties: the lowest class id, as np.argmax on a dense row)."""
    best = values.max(axis=1)
    return np.where(values == best[:, None], cls, _BIG).min(axis=1), best


def confident_learning(probs: SparseProbs, labels, num_classes: int) -> tuple:
    """Confident learning's off-diagonal rule on sparse probabilities: (issue mask (N,), guessed class (N,),
    its probability (N,), per-class thresholds (K,)).

    Per class j, the threshold t_j is the mean probability of class j over the samples labelled j that have one
    (2, never reached, for a class no such sample has; at least 2e-6). A sample is an issue when some class reaches
    p_k >= t_k - 1e-6 and the class guessed from those (the only one, or the arg-max of the row when several
    do) is not its label, unless the row's arg-max is the label (within 1e-6). This is cleanlab's
    `find_label_issues(filter_by='confident_learning')` exactly (the confident joint's off-diagonals), not its
    default 'prune_by_noise_rate', which ranks within each off-diagonal cell by margin and keeps as many as the
    calibrated joint estimates. The sparse approximation: a class not listed for a sample is taken not to
    reach its threshold; exact when the listed classes are all (k = K), or all that reach their threshold.
    """
    labels = np.asarray(labels, dtype=np.int64)
    C = int(num_classes)
    has_prob = ~np.isnan(probs.label_prob)  # a sample never seen or unscored has no say in its class's threshold
    counts = np.bincount(labels[has_prob], minlength=C)
    with np.errstate(invalid="ignore"):
        thresholds = np.bincount(labels[has_prob], weights=probs.label_prob[has_prob], minlength=C) / counts
    thresholds = np.maximum(np.where(counts > 0, thresholds, 2.0), 2e-6)
    n = labels.size
    issue, guess, guess_prob = np.zeros(n, bool), np.full(n, -1, np.int64), np.full(n, np.nan)

    def block(a, b):  # in blocks of rows, on every core: the (rows, m) temporaries stay in cache
        rows = slice(a, b)
        issue[rows], guess[rows], guess_prob[rows] = _confident_rows(
            probs.classes[rows], probs.probs[rows], probs.label_prob[rows], labels[rows], thresholds)

    for_each_block(block, n, _CL_ROWS)
    return issue, guess, guess_prob, thresholds


_CL_ROWS = 1 << 14  # rows per block: (rows, k + 1) temporaries that stay in cache


def _confident_rows(classes, probs, label_prob, labels, thresholds) -> tuple:
    """confident_learning's decision for a block of rows: (issue, guessed class or -1, its probability or NaN)."""
    cls = np.concatenate([classes, labels[:, None]], axis=1)
    p = np.concatenate([probs, np.nan_to_num(label_prob)[:, None]], axis=1)
    listed = cls >= 0
    listed[:, :-1] &= cls[:, :-1] != labels[:, None]  # the label's own column holds its probability
    value = np.where(listed, p, -np.inf)
    confident = listed & (p >= thresholds[np.maximum(cls, 0)] - 1e-6)
    n_confident = confident.sum(axis=1)
    argmax, best = _lowest_class_at_max(cls, value)
    guess = np.where(n_confident > 1, argmax, np.where(confident, cls, _BIG).min(axis=1))
    issue = (n_confident > 0) & (guess != labels)
    value[:, -1] += 1e-6  # cleanlab keeps a sample whose label is the arg-max within this margin
    issue &= _lowest_class_at_max(cls, value)[0] != labels
    guess_prob = np.where(listed & (cls == guess[:, None]), p, -np.inf).max(axis=1)
    issue &= np.isfinite(label_prob)  # never-seen samples are not judged
    return issue, np.where(issue, guess, -1), np.where(issue, guess_prob, np.nan)


def soft_label_flags(probs: SparseProbs, labels, num_classes: int, quantile: float) -> Flags:
    """The trajectory rule on soft labels: mislabeled samples with a suggested identity, and outliers.

    The clean majority is the samples whose soft label's arg-max is their label; their margin is
    log p(label) - log p(runner-up). A sample whose arg-max is another identity is flagged when it prefers
    that identity over its label by at least the majority's margin at `quantile` (`--clean_margin_quantile`):
    it rejects its label as firmly as the model accepts the labels of that share of the majority. A
    flagged sample is mislabeled when its arg-max identity j claims it as confidently as j claims its own
    images on average (p_j >= confident learning's t_j), suggested label j; otherwise no identity claims
    it: an outlier (open-set), removed without a suggestion. No threshold reads the noise ground truth.
    """
    labels = np.asarray(labels, dtype=np.int64)
    seen = np.isfinite(probs.label_prob)
    top, p_top = probs.classes[:, 0], probs.probs[:, 0]
    runner_up = probs.rest_prob  # the listed classes end: the runner-up is any unlisted one
    if probs.classes.shape[1] > 1:
        runner_up = np.where(probs.classes[:, 1] >= 0, probs.probs[:, 1], probs.rest_prob)
    agrees = seen & (top == labels)
    if not agrees.any():
        raise InputError("no sample's soft label agrees with its label: the trajectory says nothing about the "
                         "labels (was the original model trained? are these records of this dataset?)")
    tiny = np.finfo(np.float64).tiny
    log = lambda x: np.log(np.maximum(np.nan_to_num(x), tiny))  # noqa: E731
    majority_margin = log(probs.label_prob[agrees]) - log(runner_up[agrees])
    threshold = float(np.quantile(majority_margin, quantile))
    flagged = seen & (top != labels) & (log(p_top) - log(probs.label_prob) >= threshold)
    counts = np.bincount(labels, minlength=num_classes)
    with np.errstate(invalid="ignore"):
        claim = np.bincount(labels, weights=np.nan_to_num(probs.label_prob), minlength=num_classes) / counts
    claim = np.where(counts > 0, claim, 2.0)
    mislabeled = flagged & (p_top >= claim[np.maximum(top, 0)])
    index = np.flatnonzero(flagged).astype(np.int64)
    outlier = ~mislabeled[index]
    info = {"margin_threshold": threshold, "margin_quantile": quantile, "clean_majority": int(agrees.sum()),
            "mislabeled": int(mislabeled.sum()), "outliers": int(outlier.sum()), "never_seen": int((~seen).sum())}
    return Flags(index, np.where(outlier, -1, top[index]), p_top[index], info, outlier)


# ---------------------------------------------------------------------------------------------- rules
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


# ----------------------------------------------------------------------------------------------- lists
MISLABELED_DTYPE = np.dtype([("index", "<i8"), ("label", "<i8"), ("suggested_label", "<i8"), ("confidence", "<f8")])
OUTLIER_DTYPE = np.dtype([("index", "<i8"), ("label", "<i8"), ("score", "<f8")])


def flag_lists(flags: Flags, labels) -> tuple:
    """(mislabeled, outliers) as structured arrays: mislabeled [index, label, suggested_label, confidence]
    by descending confidence; outliers [index, label, score] (score: the largest class probability, low = no
    identity claims it) by ascending score. Ties keep index order."""
    labels = np.asarray(labels)
    conf = np.full(flags.index.size, np.nan) if flags.confidence is None else np.asarray(flags.confidence, float)
    suggested = np.full(flags.index.size, -1) if flags.suggested_label is None else flags.suggested_label
    m, o = ~flags.outlier, flags.outlier
    mislabeled = np.empty(int(m.sum()), MISLABELED_DTYPE)
    mislabeled["index"], mislabeled["label"] = flags.index[m], labels[flags.index[m]]
    mislabeled["suggested_label"], mislabeled["confidence"] = suggested[m], conf[m]
    outliers = np.empty(int(o.sum()), OUTLIER_DTYPE)
    outliers["index"], outliers["label"], outliers["score"] = flags.index[o], labels[flags.index[o]], conf[o]
    mislabeled = mislabeled[np.argsort(-np.nan_to_num(mislabeled["confidence"], nan=-1.0), kind="stable")]
    outliers = outliers[np.argsort(np.nan_to_num(outliers["score"], nan=2.0), kind="stable")]
    return mislabeled, outliers


def flag_change(previous, current) -> float:
    """How much a round changed the flagged set: |previous xor current| / |previous| (|current| if none before)."""
    previous, current = np.asarray(previous), np.asarray(current)
    changed = np.setxor1d(previous, current).size
    return changed / max(previous.size, 1) if previous.size else float(current.size > 0)


# ---------------------------------------------------------------------------------------- measuring
def cleaning_quality(flagged: np.ndarray, noise: dict, suggested_label=None, outlier=None) -> dict:
    """Precision / recall of the flagged sample indices against the injected noise (noise.json).

    With the rule's `suggested_label` and `outlier` (per flagged sample), also separately: `mislabeled`
    (the flagged samples with a suggestion, against the flips: precision, recall, and relabel accuracy, the
    share of the flips caught whose suggestion is their true identity) and `outliers` (the flagged samples
    without one, against the open-set images)."""
    flips = {int(e["index"]): int(e["true_label"]) for e in noise.get("flipped", [])}
    opens = {int(e["index"]) for e in noise.get("open_set", [])}
    noisy = set(flips) | opens
    flagged = np.asarray(flagged, dtype=np.int64)
    flagged_set = set(flagged.tolist())
    hit = len(flagged_set & noisy)
    out = {"removed": len(flagged_set), "noisy": len(noisy), "true_positives": hit,
           "precision": hit / len(flagged_set) if flagged_set else 0.0,
           "recall": hit / len(noisy) if noisy else 1.0,
           "recall_flipped": len(flagged_set & set(flips)) / len(flips) if flips else None,
           "recall_open_set": len(flagged_set & opens) / len(opens) if opens else None}
    if suggested_label is None and outlier is None:
        return out
    is_outlier = np.zeros(flagged.size, bool) if outlier is None else np.asarray(outlier, bool)
    suggested = np.full(flagged.size, -1) if suggested_label is None else np.asarray(suggested_label)
    mis = {int(i): int(s) for i, s in zip(flagged[~is_outlier], suggested[~is_outlier])}
    caught = [i for i in mis if i in flips]
    right = sum(mis[i] == flips[i] for i in caught)
    out["mislabeled"] = {"flagged": len(mis), "flipped": len(flips), "true_positives": len(caught),
                         "precision": len(caught) / len(mis) if mis else None,
                         "recall": len(caught) / len(flips) if flips else None,
                         "relabel_correct": right, "relabel_accuracy": right / len(caught) if caught else None}
    outs = set(flagged[is_outlier].tolist())
    out["outliers"] = {"flagged": len(outs), "open_set": len(opens), "true_positives": len(outs & opens),
                       "precision": len(outs & opens) / len(outs) if outs else None,
                       "recall": len(outs & opens) / len(opens) if opens else None}
    return out


# ------------------------------------------------------------------------------------------ writing
def write_flag_lists(folder, mislabeled, outliers, dataset, stage: str, cfg, inputs) -> list:
    """`mislabeled.npy/.csv` and `outliers.npy/.csv` in `folder` (see `flag_lists`); the CSVs add the file name
    (image folders) or record key (RecordIO) of each sample. Returns the paths written."""
    from pathlib import Path

    from utils.artifacts.files import atomic_write_csv, save_array

    column, names = sample_names(dataset)
    written = []
    for name, rows in (("mislabeled", mislabeled), ("outliers", outliers)):
        path = Path(folder) / f"{name}.npy"
        save_array(path, rows, stage, dataset.fingerprint, cfg, inputs,
                   {"rule": cfg.clean_rule, "count": int(rows.size), "columns": list(rows.dtype.names)})
        header = list(rows.dtype.names) + ([column] if column else [])
        table = [[int(r[k]) if rows.dtype[k].kind == "i" else f"{r[k]:.6g}" for k in rows.dtype.names]
                 + ([names[int(r["index"])]] if column else []) for r in rows]
        atomic_write_csv(path.with_suffix(".csv"), header, table)
        written += [path, path.with_suffix(".csv")]
    return written
