"""Each cleaning rule as a ranking: the per-sample quantity the rule thresholds, and the precision-recall curve against
the injected noise obtained by sweeping that threshold (tools/cleaning_curves.py draws and tabulates them).

A quantity is a `Suspicion`: per sample a value (higher = flagged first; NaN = never flagged: unscored or never seen)
and optionally a tier (a condition of the rule that does not move with the threshold: every sample of tier 1 ranks
before every sample of tier 0). Sweeping the threshold flags the samples whose (tier, value) reaches it, so a curve
has a point per distinct (tier, value). The quantities (`QUANTITIES`, by rule name):

- argmax: minus the margin-free p(label) of the scores (`gt_prob`): the lowest first. The rule flags where the arg-max
  is another class, which is not a threshold on p(label): its point may lie off the curve.
- trajectory: log p(top other) - log p(label) of the soft label, where "top other" is the most probable class that is
  not the label; tier: the soft label's arg-max is not the label. The samples whose arg-max is the label rank after
  all others, by minus their margin log p(label) - log p(runner-up). The rule flags tier 1 at a value reaching the
  majority's margin at `--clean_margin_quantile`: sweeping the quantile walks along the tier-1 part of this curve.
- confident_learning: the largest p_k / t_k over the listed classes k other than the label (t_k: confident learning's
  threshold of class k, the mean p_k of the samples labelled k; p_k + 1e-6 as the rule's tolerance); tier: the label
  is not the row's arg-max (within 1e-6). The rule flags tier 1 at a value >= 1: its point lies on the curve. (The
  rule does not threshold p(label) / t_label: that is the `self_confidence` reference.)
- center_angle: theta_y - theta_o in degrees (the angle to the own identity's centre minus the angle to the nearest
  other centre; a sample whose identity has no centre: +inf). The rule's mislabeled branch is this value > 0; its
  outlier branch (farther from its own centre than Tukey's fence allows) is a second condition, so its point (both
  branches) may lie off the curve; the mislabeled branch's point lies on it.
- subcenter: the angle in degrees to the identity's dominant sub-center; tier: the nearest sub-center is not the
  dominant one. The rule flags tier 1 and the tier-0 samples beyond `--clean_angle`: its point lies on the curve.

Two references (`REFERENCES`), rankings no rule thresholds:
- aum: the area under the margin (Pleiss et al. 2020) from the top-k records, the mean over the epochs of
  (label logit - largest other logit), ascending (`utils.dynamics.scores.aum_scores`).
- self_confidence: p(label) / t_label on the confident_learning rule's probabilities, ascending (cleanlab ranks
  label issues by the self-confidence p(label) by default; here divided by the label's class threshold).

No quantity reads noise.json: `pr_curve` takes the noisy samples only as the yardstick.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from utils.artifacts.records import SUBCENTER_KEY
from utils.cleaning.geometry import degrees, subcenter_geometry
from utils.cleaning.probabilities import PROB_SOURCES, trajectory_probs
from utils.cleaning.rules import confident_learning
from utils.dynamics.scores import aum_scores
from utils.errors import InputError

TARGET_RECALL = 0.8


@dataclass
class Suspicion:
    value: np.ndarray  # float64 (N,): higher = flagged first; NaN: never flagged
    tier: Optional[np.ndarray] = None  # bool (N,): tier 1 ranks before tier 0 whatever the value


@dataclass
class Curve:
    """One point per distinct (tier, value), from the most suspicious: flagging every sample up to that point."""
    flagged: np.ndarray  # int64: how many samples are flagged
    precision: np.ndarray
    recall: np.ndarray
    value: np.ndarray  # the threshold: the value of the last flagged group
    tier: np.ndarray  # and its tier

    @property
    def f1(self) -> np.ndarray:
        s = self.precision + self.recall
        return np.divide(2 * self.precision * self.recall, s, out=np.zeros_like(s), where=s > 0)


def _ranked(s: Suspicion) -> tuple:
    """(order of the flaggable samples from the most suspicious, each sample's group rank (-1: never flagged), where
    each group starts in that order, the values, the tiers)."""
    value = np.asarray(s.value, dtype=np.float64)
    tier = np.zeros(value.size, bool) if s.tier is None else np.asarray(s.tier, bool)
    valid = np.flatnonzero(~np.isnan(value))
    order = valid[np.lexsort((-value[valid], ~tier[valid]))]
    v, t = value[order], tier[order]
    new_group = np.ones(order.size, bool)
    new_group[1:] = (v[1:] != v[:-1]) | (t[1:] != t[:-1])
    rank = np.full(value.size, -1, np.int64)
    rank[order] = np.cumsum(new_group) - 1
    return order, rank, new_group, value, tier


def pr_curve(s: Suspicion, noisy: np.ndarray) -> Curve:
    """The precision-recall curve of flagging by `s` against the `noisy` mask. Recall counts every noisy sample,
    the never-flagged (NaN) ones too."""
    noisy = np.asarray(noisy, bool)
    order, _, new_group, value, tier = _ranked(s)
    ends = np.append(np.flatnonzero(new_group)[1:], order.size) - 1  # the last sample of each group
    tp = np.cumsum(noisy[order])[ends]
    flagged = ends + 1
    return Curve(flagged.astype(np.int64), tp / flagged, tp / max(int(noisy.sum()), 1), value[order[ends]],
                 tier[order[ends]])


def on_curve(flagged_index, s: Suspicion) -> bool:
    """Whether the flagged samples are a point of the curve: every flagged sample ranks strictly before every
    flaggable sample left out (no group split, nothing never-flaggable flagged)."""
    rank = _ranked(s)[1]
    flagged = np.zeros(rank.size, bool)
    flagged[np.asarray(flagged_index, dtype=np.int64)] = True
    if (rank[flagged] < 0).any():
        return False
    left = rank[~flagged & (rank >= 0)]
    return bool(not flagged.any() or not left.size or rank[flagged].max() < left.min())


def summary(curve: Curve, target_recall: float = TARGET_RECALL) -> dict:
    """Precision at recall `target_recall` (the largest at any threshold reaching it; None where none does) and the
    best F1 with its precision, recall, flagged count and threshold."""
    reach = curve.recall >= target_recall - 1e-12
    best = int(np.argmax(curve.f1)) if curve.f1.size else None
    out = {"precision_at_recall": float(curve.precision[reach].max()) if reach.any() else None,
           "target_recall": target_recall, "best_f1": None}
    if best is not None:
        out["best_f1"] = {"f1": float(curve.f1[best]), "precision": float(curve.precision[best]),
                          "recall": float(curve.recall[best]), "flagged": int(curve.flagged[best]),
                          "threshold": float(curve.value[best]), "tier": bool(curve.tier[best])}
    return out


def thinned(curve: Curve, most: int = 400) -> dict:
    """The curve as lists, at most `most` points (evenly along the points, the first, the last and the best-F1 one
    kept), for a JSON file or a plot."""
    n = curve.flagged.size
    keep = np.arange(n) if n <= most else np.unique(np.r_[np.linspace(0, n - 1, most).round().astype(int),
                                                          np.argmax(curve.f1)])
    return {"flagged": curve.flagged[keep].tolist(), "precision": np.round(curve.precision[keep], 4).tolist(),
            "recall": np.round(curve.recall[keep], 4).tolist()}


# ----------------------------------------------------------------------------------------- the quantities
_TINY = np.finfo(np.float64).tiny


def _log(x) -> np.ndarray:
    return np.log(np.maximum(np.nan_to_num(np.asarray(x, np.float64)), _TINY))


def argmax_suspicion(rec, cfg) -> Suspicion:
    return Suspicion(-np.asarray(rec.scores["gt_prob"], dtype=np.float64))


def trajectory_suspicion(rec, cfg) -> Suspicion:
    probs = trajectory_probs(rec, cfg, keep=2)  # what the rule reads: the top class and the runner-up
    labels = np.asarray(rec.labels, np.int64)
    top = probs.classes[:, 0]
    runner_up = probs.rest_prob
    if probs.classes.shape[1] > 1:
        runner_up = np.where(probs.classes[:, 1] >= 0, probs.probs[:, 1], probs.rest_prob)
    top_other = np.where(top != labels, probs.probs[:, 0], runner_up)
    value = _log(top_other) - _log(probs.label_prob)
    seen = np.isfinite(probs.label_prob)
    return Suspicion(np.where(seen, value, np.nan), seen & (top != labels))


def confident_suspicion(rec, cfg) -> Suspicion:
    probs = PROB_SOURCES[cfg.clean_probs][0](rec, cfg)
    labels = np.asarray(rec.labels, np.int64)
    _, _, _, thresholds = confident_learning(probs, labels, rec.num_classes)
    other = (probs.classes >= 0) & (probs.classes != labels[:, None])
    cls = np.maximum(probs.classes, 0)
    ratio = np.where(other, (probs.probs + 1e-6) / thresholds[cls], 0.0).max(axis=1)
    best_other = np.where(other, probs.probs, -np.inf).max(axis=1)
    seen = np.isfinite(probs.label_prob)
    return Suspicion(np.where(seen, ratio, np.nan), seen & (best_other > probs.label_prob + 1e-6))


def center_angle_value(label_cos, other_cos) -> np.ndarray:
    """theta_y - theta_o in degrees: +inf where the identity has no centre (label_cos NaN, other_cos finite), -inf
    where there is no other centre, NaN where unscored."""
    theta_y, theta_o = degrees(label_cos), degrees(other_cos)
    value = theta_y - theta_o
    value[np.isnan(theta_y) & np.isfinite(theta_o)] = np.inf
    value[np.isfinite(theta_y) & np.isnan(theta_o)] = -np.inf
    return value


def center_angle_suspicion(rec, cfg) -> Suspicion:
    s = rec.scores
    return Suspicion(center_angle_value(s["label_cos"], s["other_cos"]))


def subcenter_suspicion(rec, cfg) -> Suspicion:
    seen, not_dominant, _, angle = subcenter_geometry(rec.scores[SUBCENTER_KEY], rec.labels, rec.num_classes)
    return Suspicion(np.where(seen, angle, np.nan), seen & not_dominant)


def aum_suspicion(rec, cfg) -> Suspicion:
    t = rec.topk
    if "label_logit" not in t:
        raise InputError("the top-k records lack label_logit (recorded since 2026-12): train the original model again")
    # aum_scores returns -AUM (higher = keep the hard ones): the lowest AUM, the most suspicious, is its largest
    return Suspicion(aum_scores(t["topk_logits"], t["topk_index"], t["rest_mean_logit"], t["label_logit"], rec.labels,
                                rec.num_classes))


def self_confidence_suspicion(rec, cfg) -> Suspicion:
    probs = PROB_SOURCES[cfg.clean_probs][0](rec, cfg)
    labels = np.asarray(rec.labels, np.int64)
    thresholds = confident_learning(probs, labels, rec.num_classes)[3]
    return Suspicion(-probs.label_prob / thresholds[labels])


REFERENCES = ("aum", "self_confidence")
# rule (or reference) -> (its quantity: (Records, cfg) -> Suspicion, what that is and what is flagged first)
QUANTITIES = {
    "argmax": (argmax_suspicion, "p(label) of the scores, lowest first"),
    "trajectory": (trajectory_suspicion, "soft label: log p(top other) - log p(label), arg-max not the label first"),
    "confident_learning": (confident_suspicion, "max p_k / t_k over k != label, label not the arg-max first"),
    "center_angle": (center_angle_suspicion, "theta_y - theta_o (degrees), largest first"),
    "subcenter": (subcenter_suspicion, "angle to the dominant sub-center, not-dominant first"),
    "aum": (aum_suspicion, "AUM (mean label logit - largest other), lowest first; a reference, no rule"),
    "self_confidence": (self_confidence_suspicion, "p(label) / t_label (confident learning's probabilities), lowest "
                                                   "first; a reference, no rule"),
}
