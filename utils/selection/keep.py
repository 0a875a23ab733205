"""Keep k samples per identity: by score (`keep_top_per_identity`, which DynUnc, the entropy method and every
score method go through), uniformly at random (`random_keep`, the paper's Rand baseline), or by CCS's coverage
of the score range (`ccs_keep`, Zheng et al., ICLR 2023: the hardest share dropped first, the budget spread
over score strata) (NumPy only). The scores come from utils/dynamics/."""
from __future__ import annotations

import numpy as np

from utils.arrays import (EMPTY, check_fraction, check_int, check_min, check_scores, dense_labels, excluded_mask,
                          group_order, int_labels, stable_order)
from utils.errors import InputError


# ============================================================================ per identity, keep k by score
def keep_top_per_identity(scores, labels, fraction, min_samples_per_id=5, excluded=None, return_rank=False):
    """Per identity, the ``k`` samples with the highest ``scores``.

    An identity with ``n`` (non-excluded) samples keeps ``k = int(n * fraction)``. If ``k < MIN``, it keeps
    ``MIN`` when ``n > MIN`` and all ``n`` otherwise (the rule of DynUnc and Rand in the DiffProb paper).
    Equal scores keep the lower sample index first, and NaN counts as the lowest score. This is the single
    place that implements "per identity, keep k by score", and every score-based method and Rand calls it.

    With ``return_rank`` it returns ``(kept, rank)``: ``rank`` (N,) int64 is each sample's place in its
    identity in that order (0 = the highest score), -1 for excluded samples; ``kept`` is ``rank < k``.
    """
    labels = int_labels(labels)
    n = labels.size
    scores = check_scores(scores, n)
    fraction = check_fraction(fraction)
    min_k = check_min(min_samples_per_id)
    mask = excluded_mask(excluded, n)
    sel = None if mask is None else np.flatnonzero(~mask)
    # Integer scores (Rand's random order) stay integers: exact, and the fast 32-bit sort path applies.
    sc = scores.astype(np.int64) if scores.dtype.kind in "iub" else scores.astype(np.float64)
    lab = labels
    if sel is not None:
        if sel.size == 0:
            return (EMPTY, np.full(n, -1, dtype=np.int64)) if return_rank else EMPTY
        sc, lab = sc[sel], labels[sel]
    identities, dense = dense_labels(lab)
    # Ascending order of -score means descending score with ties by index, and NaN (= -NaN) last.
    order = group_order(dense, stable_order(-sc))
    counts = np.bincount(dense, minlength=identities.size)
    k = (counts * fraction).astype(np.int64)  # int(n * fraction): truncation, as the reference code does
    k = np.where(k < min_k, np.minimum(counts, min_k), k)
    starts = np.zeros(identities.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    rank_in_id = np.arange(lab.size, dtype=np.int64) - np.repeat(starts, counts)
    chosen = order[rank_in_id < np.repeat(k, counts)]
    if sel is not None:
        chosen = sel[chosen]
    chosen.sort()
    if not return_rank:
        return chosen
    rank = np.full(n, -1, dtype=np.int64)
    rank[order if sel is None else sel[order]] = rank_in_id
    return chosen, rank


def random_keep(labels, fraction, min_samples_per_id=5, seed=0, excluded=None) -> np.ndarray:
    """Rand: per identity, the same number of samples as ``keep_top_per_identity`` keeps, drawn uniformly at
    random. ``np.random.default_rng(seed)`` draws one random order of all N samples (excluding samples
    does not change it), and the first ones of each identity in that order are kept. (The paper repository keeps the last
    samples of every identity instead. That is a defect, and this function does not copy it.)"""
    labels = int_labels(labels)
    return keep_top_per_identity(random_key(labels.size, seed), labels, fraction, min_samples_per_id,
                                 excluded=excluded)


def random_key(num_samples: int, seed=0) -> np.ndarray:
    """Rand's sort key: one uniformly random order of all N samples (``np.random.default_rng(seed).permutation``);
    per identity, the highest keys are kept first."""
    return np.random.default_rng(seed).permutation(num_samples)


# ============================================================================ CCS
def ccs_keep(scores, labels, fraction, min_samples_per_id=5, beta=0.1, strata=50, seed=0, excluded=None,
             return_rank=False):
    """Coverage-centric coreset selection (Zheng, Liu, Li, Prakash, "Coverage-centric Coreset Selection for
    High Pruning Rates", ICLR 2023, Algorithm 1), run within each identity. Returns sorted unique int64
    sample indices.

    ``scores``: any importance, higher = harder (every function of this module). Per identity with n
    (non-excluded) samples and quota k (``keep_top_per_identity``'s rule: k = int(n * fraction), at least
    min(n, MIN)):

    1. drop the d = min(floor(beta * n), n - k) hardest samples (highest scores; ties: the lower index is
       harder, NaN is easiest), so the quota can always be met from the rest;
    2. split the range [lo, hi] of the remaining scores into ``strata`` strata of equal width; a sample
       goes to floor((s - lo) / (hi - lo) * strata), the maximum to the last stratum, everything to
       stratum 0 when hi == lo, NaN scores to stratum 0;
    3. the paper's budget allocation: visit the strata by size ascending (equal sizes: lower stratum
       first); each takes min(its size, floor(remaining budget / strata not yet visited));
    4. within a stratum, take the samples that come first in one random order of all N samples
       (``np.random.default_rng(seed).permutation(N)``; excluding samples does not change it).

    The paper cuts and stratifies the whole dataset; here every identity is its own dataset, so each keeps
    its quota, and strata follow each identity's score range.

    Vectorised: the allocation of step 3 equals taking samples round by round (the first of every
    stratum, then the second, ...), and within the last, partial round the strata visited last first.
    That order is an integer priority, and ``keep_top_per_identity`` keeps the top k of it. With
    ``return_rank``, ``(kept, rank)``: each sample's place in its identity in that priority order (-1:
    excluded). The priority depends on the fraction, so a prefix of it is CCS at this fraction only.
    """
    labels = int_labels(labels)
    n = labels.size
    sc = check_scores(scores, n).astype(np.float64)
    if np.isinf(sc).any():
        raise InputError(f"scores must be finite or NaN (equal-width strata need a finite range), found "
                         f"scores[{int(np.argmax(np.isinf(sc)))}] = {sc[np.isinf(sc)][0]}")
    fraction = check_fraction(fraction)
    min_k = check_min(min_samples_per_id)
    try:
        beta_f = float(beta)
    except (TypeError, ValueError):
        raise InputError(f"beta must be a number in [0, 1), found {beta!r}") from None
    if not 0.0 <= beta_f < 1.0:
        raise InputError(f"beta (the hardest fraction dropped) must be in [0, 1), found {beta}")
    S = check_int(strata, "strata", 1)
    random_rank = np.random.default_rng(seed).permutation(n)  # drawn before excluding: same order either way
    mask = excluded_mask(excluded, n)
    sel = None if mask is None else np.flatnonzero(~mask)
    if sel is None:
        priority = _ccs_priority(sc, labels, random_rank, fraction, min_k, beta_f, S)
    elif sel.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return (empty, np.full(n, -1, dtype=np.int64)) if return_rank else empty
    else:  # excluded samples get any priority: keep_top_per_identity leaves them out
        priority = np.zeros(n, dtype=np.int64)
        priority[sel] = _ccs_priority(sc[sel], labels[sel], random_rank[sel], fraction, min_k, beta_f, S)
    return keep_top_per_identity(priority, labels, fraction, min_k, excluded, return_rank=return_rank)


def _ccs_priority(sc, labels, random_rank, fraction, min_k, beta, S) -> np.ndarray:
    """int64 priority whose top k per identity is the CCS selection (see ``ccs_keep``)."""
    m = sc.size
    identities, dense = dense_labels(labels)
    K = identities.size
    counts = np.bincount(dense, minlength=K)
    k = (counts * fraction).astype(np.int64)  # keep_top_per_identity's quota
    k = np.where(k < min_k, np.minimum(counts, min_k), k)
    drop = np.minimum((counts * beta).astype(np.int64), counts - k)  # beta < 1: never the whole identity
    starts = np.zeros(K, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    # Frame: samples by identity, hardest first (NaN last); the first `drop` of every identity are cut.
    order = group_order(dense, stable_order(-sc))
    ident = dense[order]
    kept = np.arange(m, dtype=np.int64) - starts[ident] >= drop[ident]
    v = sc[order]
    first = starts + drop  # the hardest remaining sample: the top of the range
    finite = np.bincount(ident, weights=~np.isnan(v), minlength=K).astype(np.int64)
    last = np.maximum(starts + finite - 1, first)  # the easiest finite one: the bottom (NaN if none)
    hi, lo = v[first][ident], v[last][ident]
    with np.errstate(invalid="ignore", divide="ignore"):
        stratum = np.floor((v - lo) / (hi - lo) * S)
    stratum = np.where(np.isfinite(stratum), np.clip(stratum, 0, S - 1), 0).astype(np.int64)
    stratum[~kept] = S  # the cut samples: a group of their own, below every stratum
    # Runs of (identity, stratum), each in the random order.
    group = ident * (S + 1) + stratum
    rr = random_rank[order]
    n_all = int(random_rank.max()) + 1
    if K * (S + 1) * n_all < 2 ** 62:
        by_group = np.argsort(group * n_all + rr)  # unique keys: any sort is stable
    else:
        by_group = np.lexsort((rr, group))
    g = group[by_group]
    is_new = np.empty(m, dtype=bool)
    is_new[0] = True
    np.not_equal(g[1:], g[:-1], out=is_new[1:])
    run_start = np.flatnonzero(is_new)
    run_size = np.diff(np.append(run_start, m))
    run_group = g[run_start]
    run_ident, run_stratum = run_group // (S + 1), run_group % (S + 1)
    within = np.arange(m, dtype=np.int64) - np.repeat(run_start, run_size)  # position in the random order
    # The paper's visiting order within each identity: by size, then stratum (the cut group last; unused).
    visit = np.lexsort((run_stratum, np.where(run_stratum == S, m + 1, run_size), run_ident))
    pos = np.empty(run_start.size, dtype=np.int64)
    first_run = np.flatnonzero(np.append(True, run_ident[visit][1:] != run_ident[visit][:-1]))
    pos[visit] = np.arange(visit.size) - np.repeat(first_run, np.diff(np.append(first_run, visit.size)))
    # Round by round, and in the last round the strata visited last first.
    pr = np.repeat(pos, run_size) - within * S
    pr[g % (S + 1) == S] = -(int(within.max()) + 2) * S
    out = np.empty(m, dtype=np.int64)
    out[order[by_group]] = pr
    return out
