"""Where the cleaning rules' probabilities come from: the scoring model's scores, or the soft labels of the
original training's top-k records over a window of epochs, as sparse `SparseProbs`.

* `argmax` (the paper's): the scoring model's margin-free arg-max class (`scores/...npz`, the last epoch
  by default; in a cleaning round the round's retrained model): `scores_probs`.
* `trajectory` ("Data Pruning Can Do More", Yang et al.): the soft label of the original training's
  top-k records over the epochs `--clean_epochs` (`trajectory_soft_labels`, `trajectory_probs`).
* `confident_learning` (Northcutt et al. 2021): either, by `--clean_probs` (`PROB_SOURCES`; trajectory by default).

Probabilities are sparse (`SparseProbs`): per sample a few classes and the labelled one, never an
N x K matrix, so the rules run at Glint360K scale (17M images, 360K identities).
"""
from __future__ import annotations

import re

import numpy as np

from utils.artifacts.records import Records
from utils.dynamics.soft_labels import SparseProbs, checked_records, soft_labels
from utils.errors import InputError


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


def trajectory_soft_labels(topk_logits, topk_index, rest_mean_logit, labels, num_classes: int,
                           keep: int = None) -> SparseProbs:
    """The soft label of "Data Pruning Can Do More": softmax of each sample's logits averaged over epochs.

    Inputs are the training records (utils/training/recording.py): `topk_logits` (E, N, k) margin-free, `topk_index`
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


def default_prob_source() -> str:
    """The `clean_probs` a config has unless told otherwise: the soft labels over the training trajectory."""
    return "trajectory"


def prob_source_choices() -> tuple:
    """The values `clean_probs` accepts."""
    return tuple(PROB_SOURCES)
