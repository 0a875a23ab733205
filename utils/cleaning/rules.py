"""What the cleaning rules decide on per-sample probabilities: confident learning's off-diagonal rule
(`confident_learning`), the soft-label margin rule (`soft_label_flags`), and `Flags`, what every rule returns.

The registered rules (utils/cleaning/registry.py) read their probabilities (utils/cleaning/probabilities.py) and
decide with these. Probabilities are sparse (`SparseProbs`): per sample a few classes and the labelled one, never an
N x K matrix, so the rules run at Glint360K scale (17M images, 360K identities).
"""
from __future__ import annotations

import numpy as np

from utils.cleaning.flags import Flags
from utils.dynamics.blocks import for_each_block
from utils.dynamics.soft_labels import SparseProbs
from utils.errors import InputError


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
