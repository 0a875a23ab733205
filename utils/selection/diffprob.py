"""DiffProb (Caldeira et al., FG 2025): per identity, drop a sample whose labelled-class probability is within
the threshold ``t`` of the last kept one, relaxing ``t`` until the identity keeps ``MIN`` samples; and the
threshold that keeps a requested fraction (NumPy only).

The rule as the paper writes it is ``diffprob_loop``: one plain Python loop per identity, the first thing a
reader of the paper looks for. ``diffprob`` is the same rule vectorised over identities (one sort groups the
samples; Python loops only step through positions within an identity and the relaxation rounds); the tests
check it against ``diffprob_loop`` for every threshold, ``MIN`` and exclusion they try.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from utils.arrays import (EMPTY, check_fraction, check_min, check_prob, dense_labels, excluded_mask, group_order, int_labels,
                          stable_order)
from utils.errors import InputError

_CHUNK = 1 << 14  # elements per vectorised block: small enough that the temporaries stay in cache


def diffprob_loop(prob, labels, threshold, min_samples_per_id=5, excluded=None) -> np.ndarray:
    """DiffProb exactly as the paper's pseudocode reads, one identity at a time: what ``diffprob`` computes.

    For each identity: ``O`` is its samples sorted by probability ascending (ties in index order). With at most
    ``MIN`` samples, all are kept. Otherwise, with ``r = 0``, repeat: keep ``O[-1]``; for ``x`` from ``O[-2]``
    down to ``O[0]``, keep ``x`` when ``last - p(x) > (1 + r) * t``, ``last`` being the last kept probability;
    then ``r = r - 0.01``; until at least ``MIN`` are kept. At ``t = 0`` an identity with fewer than ``MIN``
    distinct probabilities keeps all (the paper's loop would never end there). Slow: for reading and tests.
    """
    t, min_k = check_threshold(threshold), check_min(min_samples_per_id)
    labels = int_labels(labels)
    prob = np.asarray(prob, dtype=np.float64)
    mask = excluded_mask(excluded, labels.size)
    kept = []
    for identity in np.unique(labels if mask is None else labels[~mask]):
        mine = [i for i in np.flatnonzero(labels == identity).tolist() if mask is None or not mask[i]]
        O = sorted(mine, key=lambda i: (float(prob[i]), i))
        if len(O) <= min_k:
            kept += O
            continue
        r = 0
        while True:
            keep, last = [O[-1]], float(prob[O[-1]])
            for x in O[-2::-1]:
                if last - float(prob[x]) > (1 + r) * t:
                    keep.append(x)
                    last = float(prob[x])
            r = r - 0.01
            if len(keep) >= min_k:
                break
            if t == 0:  # every later round is the same: keep all
                keep = O
                break
        kept += keep
    return np.array(sorted(kept), dtype=np.int64)


# ============================================================================ DiffProb
class _Segments(NamedTuple):
    """Non-excluded samples grouped by identity, each identity's run sorted by probability."""
    order: np.ndarray  # (M,) sample indices: by identity (ascending label), ascending prob, ties by index
    s: np.ndarray  # (M,) float64 prob[order]
    starts: np.ndarray  # (K,) first position of each identity in `order`
    ends: np.ndarray  # (K,) one past its last position
    identities: np.ndarray  # (K,) labels
    num_images: int  # N, excluded samples included


def _prepare_diffprob(prob, labels, excluded) -> _Segments:
    labels = int_labels(labels)
    n = labels.size
    mask = excluded_mask(excluded, n)
    p = check_prob(prob, n, mask)
    sel = None if mask is None else np.flatnonzero(~mask)
    if sel is not None:
        if sel.size == 0:
            return _Segments(EMPTY, np.empty(0), EMPTY, EMPTY, EMPTY, n)
        p, labels = p[sel], labels[sel]
    identities, dense = dense_labels(labels)
    local = group_order(dense, stable_order(p))
    order = local if sel is None else sel[local]
    counts = np.bincount(dense, minlength=identities.size).astype(np.int64)
    ends = np.cumsum(counts)
    return _Segments(order, p[local], ends - counts, ends, identities, n)


def _relaxed_thresholds(t: float) -> np.ndarray:
    """The thresholds of the relaxation rounds, T_k = (1 + r_k) * t with r_0 = 0 and r_k = r_{k-1} - 0.01.

    The arithmetic is done in Python floats exactly as the reference loop writes it. The sequence ends at
    the first negative T, a round in which every sample is kept, so every identity is satisfied there.
    For t = 0 every round has T = 0. The reference then never ends for an identity with more than MIN
    samples but fewer than MIN distinct probabilities. Here the sequence ends in a virtual round with
    T = -inf, which keeps such an identity whole. That is also the limit of the rule as t -> 0+.
    ``(1 + r) * inf`` is NaN when ``1 + r == 0``. That value compares like +inf, so it is stored as +inf.
    """
    if t == 0.0:
        return np.array([0.0, -math.inf])
    seq = []
    r = 0.0
    while True:
        thr = (1 + r) * t
        if thr != thr:
            thr = math.inf
        seq.append(thr)
        if thr < 0:
            return np.array(seq)
        r = r - 0.01
        if len(seq) > 1_000_000:  # cannot happen for t > 0 (|1 + r| grows without bound); a guard, not a rule
            raise RuntimeError(f"DiffProb relaxation did not reach a negative threshold for t = {t!r}")


def _next_kept(s: np.ndarray, first: np.ndarray, cur: np.ndarray, thr) -> np.ndarray:
    """For each current position ``cur``, the next sample the DiffProb scan keeps below it.

    That is the largest ``j`` in ``[first, cur - 1]`` with ``s[cur] - s[j] > thr``, or ``first - 1`` when
    there is none. ``s`` is ascending within ``[first, cur]``, so the condition holds on a prefix of
    positions. The scan ``for x in O[-2]..O[0]`` keeps the first x that satisfies it, which is the last
    position of that prefix. A branch-free binary search finds it, vectorised over all queries and using
    the reference's exact floating comparison. ``thr`` is a scalar or an array like ``cur``.
    """
    out = np.empty_like(cur)
    scalar = np.ndim(thr) == 0
    for a in range(0, cur.size, _CHUNK):
        c = cur[a:a + _CHUNK]
        f = first[a:a + _CHUNK]
        t = thr if scalar else thr[a:a + _CHUNK]
        hi = c - 1
        pos = f - 1
        width = int((c - f).max()) if c.size else 0
        sc = s[c]
        step = 1 << max(width.bit_length() - 1, 0)
        while step and width:
            cand = pos + step
            ok = cand <= hi
            ok &= sc - s[np.minimum(cand, hi)] > t
            np.copyto(pos, cand, where=ok)
            step >>= 1
        out[a:a + _CHUNK] = pos
    return out


def _walk(seg: _Segments, ids: np.ndarray, thr, want_positions: bool):
    """Full DiffProb scans of the identities ``ids`` at threshold ``thr`` (a scalar or one value per id).

    Returns ``(counts per id, kept positions or None)``. One vectorised search gives the next kept
    position below every position, and then the chains are followed from the top samples. The number
    of Python steps is the longest chain, not the number of identities. The identities are processed
    from small to large, so each block of the search only runs as many bisection steps as its own
    identities need.
    """
    lens_in = seg.ends[ids] - seg.starts[ids]
    by_len = np.argsort(lens_in, kind="stable")
    first = seg.starts[ids][by_len]
    lens = lens_in[by_len]
    total = int(lens.sum())
    off = np.cumsum(lens) - lens  # where each id's block starts in the local arrays
    local = np.arange(total, dtype=np.int64)
    first_l = np.repeat(first, lens)
    pos = local + np.repeat(first - off, lens)  # global positions
    thr_l = thr if np.ndim(thr) == 0 else np.repeat(np.asarray(thr)[by_len], lens)
    nxt = _next_kept(seg.s, first_l, pos, thr_l)
    # local index of the next kept sample, -1 at the end of a chain
    nxt_local = np.where(nxt >= first_l, nxt - first_l + np.repeat(off, lens), -1)
    del nxt, first_l, thr_l
    cur = off + lens - 1
    order_slot = np.arange(ids.size)  # which (length-sorted) id each chain head belongs to
    counts_sorted = np.zeros(ids.size, dtype=np.int64)
    chain = []
    step = 0
    while cur.size:
        step += 1
        if want_positions:
            chain.append(cur)
        cur = nxt_local[cur]
        alive = cur >= 0
        counts_sorted[order_slot[~alive]] = step
        cur, order_slot = cur[alive], order_slot[alive]
    counts = np.empty(ids.size, dtype=np.int64)
    counts[by_len] = counts_sorted
    if not want_positions:
        return counts, None
    return counts, pos[np.concatenate(chain)] if chain else EMPTY


def _reaches(seg: _Segments, ids: np.ndarray, thr: np.ndarray, need: int) -> np.ndarray:
    """Whether the DiffProb scan of each identity at its threshold keeps at least ``need`` samples.

    The chains are followed lazily and stop after ``need`` samples, because only the count matters here."""
    ok = np.zeros(ids.size, dtype=bool)
    slot = np.arange(ids.size)
    first = seg.starts[ids]
    cur = seg.ends[ids] - 1
    t = thr
    for _ in range(need - 1):
        if not slot.size:
            return ok
        nxt = _next_kept(seg.s, first, cur, t)
        alive = nxt >= first
        slot, first, cur, t = slot[alive], first[alive], nxt[alive], t[alive]
    ok[slot] = True
    return ok


def _evaluate(seg: _Segments, ids: np.ndarray, t: float, min_k: int, want_positions: bool = False):
    """DiffProb at threshold ``t`` on the identities ``ids``, all of which have more than MIN samples.

    Returns ``(counts, rounds, positions)``. ``rounds`` is the relaxation round at which each identity
    stopped. ``positions`` holds the kept positions when ``want_positions`` is set, else it is None.
    The kept count at a fixed threshold does not increase as the threshold grows (the greedy
    chain at a smaller threshold dominates step by step). So "round k keeps at least MIN" can only
    change from false to true as k grows. The first such round is then found by a per-identity
    binary search over the rounds instead of trying them one by one.
    """
    counts, pos = _walk(seg, ids, t, want_positions)
    rounds = np.zeros(ids.size, dtype=np.int64)
    short = np.flatnonzero(counts < min_k)
    if short.size:
        seq = _relaxed_thresholds(t)
        lo = np.zeros(short.size, dtype=np.int64)  # round lo keeps < MIN (round 0 did)
        hi = np.full(short.size, seq.size - 1, dtype=np.int64)  # round hi keeps >= MIN (T < 0 keeps all)
        while True:
            open_ = np.flatnonzero(hi - lo > 1)
            if not open_.size:
                break
            mid = (lo[open_] + hi[open_]) >> 1
            thr = seq[mid]
            ok = thr < 0
            test = np.flatnonzero(~ok)
            if test.size:
                ok[test] = _reaches(seg, ids[short[open_[test]]], thr[test], min_k)
            hi[open_[ok]] = mid[ok]
            lo[open_[~ok]] = mid[~ok]
        rounds[short] = hi
        thr = seq[hi]
        neg = thr < 0  # keeps the whole identity
        lens = seg.ends[ids[short]] - seg.starts[ids[short]]
        counts[short[neg]] = lens[neg]
        rest = np.flatnonzero(~neg)
        if rest.size:
            c2, p2 = _walk(seg, ids[short[rest]], thr[rest], want_positions)
            counts[short[rest]] = c2
        if want_positions:
            redone = np.zeros(seg.s.size, dtype=bool)  # positions of the relaxed identities
            redone[_ranges(seg.starts[ids[short]], seg.ends[ids[short]])] = True
            parts = [pos[~redone[pos]]]
            whole = ids[short[neg]]
            if whole.size:
                parts.append(_ranges(seg.starts[whole], seg.ends[whole]))
            if rest.size:
                parts.append(p2)
            pos = np.concatenate(parts)
    return counts, rounds, pos


def _ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Concatenation of range(starts[i], ends[i]) for all i."""
    lens = ends - starts
    off = np.cumsum(lens) - lens
    return np.arange(int(lens.sum()), dtype=np.int64) + np.repeat(starts - off, lens)


def check_threshold(threshold) -> float:
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number >= 0, found {threshold!r}") from None
    if not t >= 0:
        raise InputError(f"threshold must be >= 0, found {threshold}")
    return t


def _diffprob_positions(seg: _Segments, t: float, min_k: int, return_rank: bool = False):
    lens = seg.ends - seg.starts
    big = np.flatnonzero(lens > min_k)
    small = np.flatnonzero(lens <= min_k)
    parts = [_ranges(seg.starts[small], seg.ends[small])]
    if big.size:
        parts.append(_evaluate(seg, big, t, min_k, want_positions=True)[2])
    positions = np.concatenate(parts)
    kept = seg.order[positions]
    kept.sort()
    return (kept, _diffprob_rank(seg, positions)) if return_rank else kept


def _diffprob_rank(seg: _Segments, positions: np.ndarray) -> np.ndarray:
    """Each sample's place in its identity in the order of the DiffProb scan: the kept samples as the scan
    keeps them (highest probability first), then the dropped ones, highest probability first (equal values:
    the later sample first, as the scan meets them); -1 for excluded samples."""
    m = seg.order.size
    kept = np.zeros(m, dtype=bool)
    kept[positions] = True
    below = np.cumsum(kept)  # kept positions at or below each position, over all identities
    lens = seg.ends - seg.starts
    last = np.repeat(seg.ends - 1, lens)  # each position's identity ends here
    kept_above = below[last] - below  # kept positions above this one in its identity
    above = last - np.arange(m, dtype=np.int64)
    kept_in_id = np.repeat(below[seg.ends - 1] - below[seg.starts] + kept[seg.starts], lens)
    rank = np.full(seg.num_images, -1, dtype=np.int64)
    rank[seg.order] = np.where(kept, kept_above, kept_in_id + above - kept_above)
    return rank


def diffprob(prob, labels, threshold, min_samples_per_id=5, excluded=None, return_rank=False):
    """DiffProb selection at threshold ``t``. Returns the kept sample indices (sorted, unique int64), and with
    ``return_rank`` also each sample's place in its identity in the scan's order (``_diffprob_rank``).

    For each identity (the paper's rule): ``O`` is its samples sorted by ``prob`` ascending, and equal
    values keep index order. If ``len(O) <= MIN``, all are kept. Otherwise, with ``r = 0``, it repeats
    {keep ``O[-1]``; then for ``x`` in ``O[-2] .. O[0]`` keep ``x`` when ``last - p(x) > (1 + r) * t``,
    where ``last`` is the last kept value; then ``r = r - 0.01``} until at least MIN are kept. The float64
    arithmetic is the reference's: ``r`` accumulates by repeated subtraction, and the comparison is
    ``fl(last - p) > fl(fl(1 + r) * t)``.

    One deliberate difference: when ``t == 0``, an identity with more than MIN samples but fewer than MIN
    distinct probabilities keeps all of its samples. The reference loops forever on it. Keeping all is the
    limit of the rule as t -> 0+, because every t > 0 relaxes until the threshold is negative, and that
    round keeps everything.

    ``prob`` (N,) are finite probabilities >= 0 (any values on excluded samples). ``labels`` (N,) are
    identity labels >= 0. ``excluded`` drops samples before the rule runs (cleaning), and an identity left
    with nothing vanishes.
    """
    t = check_threshold(threshold)
    min_k = check_min(min_samples_per_id)
    seg = _prepare_diffprob(prob, labels, excluded)
    if seg.order.size == 0:
        return (EMPTY, np.full(seg.num_images, -1, dtype=np.int64)) if return_rank else EMPTY
    return _diffprob_positions(seg, t, min_k, return_rank)


# ---------------------------------------------------------------------------- threshold for a fraction
def _midpoint(lo: float, hi: float) -> float:
    """A point strictly between lo < hi, or lo/hi themselves when they are adjacent floats.

    When the bracket spans a wide ratio, the midpoint of the float64 bit patterns (a geometric mean for
    non-negative floats) reaches any scale in a few steps. Otherwise it uses the arithmetic mean."""
    if hi > 2.0 * lo:
        a = np.array([lo, hi], dtype=np.float64).view(np.int64)
        return float(np.array([(int(a[0]) + int(a[1])) // 2], dtype=np.int64).view(np.float64)[0])
    return lo + (hi - lo) / 2.0


class _Bracket(NamedTuple):
    t: float
    counts: np.ndarray
    rounds: np.ndarray

    @property
    def kept(self) -> int:
        return int(self.counts.sum())


def _bisect(seg, ids, target, lo: _Bracket, hi: _Bracket, min_k: int, rel_tol: float = 0.0) -> _Bracket:
    """Closest kept count to ``target`` on ``ids``, given ``lo.kept > target > hi.kept`` and ``lo.t < hi.t``.

    Each step evaluates only the identities that can differ inside the bracket. An identity that stops
    at the same relaxation round k at both ends stops at k everywhere between (the round it needs does
    not decrease as t grows). Within one round its count does not increase in t, so equal counts at both
    ends mean the count is constant in between. The other identities take their value at ``lo``.
    """
    while True:
        mid = _midpoint(lo.t, hi.t)
        if mid <= lo.t or mid >= hi.t or (rel_tol and hi.t - lo.t <= rel_tol * hi.t):
            break
        act = np.flatnonzero((lo.counts != hi.counts) | (lo.rounds != hi.rounds))
        counts, rounds = lo.counts.copy(), lo.rounds.copy()
        counts[act], rounds[act], _ = _evaluate(seg, ids[act], mid, min_k)
        here = _Bracket(mid, counts, rounds)
        if here.kept == target:
            return here
        if here.kept > target:
            lo = here
        else:
            hi = here
    return lo if abs(lo.kept - target) <= abs(hi.kept - target) else hi


# Random identity subsets (in samples) that narrow the threshold before the full data is searched, with
# the relative bracket width each level stops at and the first half-width tried around the previous estimate.
_SEARCH_LEVELS = ((20_000, 1e-2, 0.05), (200_000, 1e-3, 0.03))
_FULL_STEP = 0.01


def _search_threshold(seg: _Segments, target: float, min_k: int) -> float:
    """Threshold whose DiffProb selection keeps a count closest to ``target`` (see the public docstring)."""
    lens = seg.ends - seg.starts
    big = np.flatnonzero(lens > min_k)
    if not big.size:
        return 0.0  # every identity is kept whole at any threshold
    target_big = target - float(lens.sum() - lens[big].sum())
    t_max = float((seg.s[seg.ends[big] - 1] - seg.s[seg.starts[big]]).max())

    def at(ids, t):
        c, r, _ = _evaluate(seg, ids, t, min_k)
        return _Bracket(t, c, r)

    def below_top(ids, tgt, top, rel_tol):
        # The top of the range still keeps >= tgt. Near the top, K(t) is not monotone: relaxed identities
        # land on rounds 0.01 t apart, so the overshoot grows with t. Scan a geometric grid for a smaller
        # selection, and bisect on the first crossing if there is one.
        grid = [at(ids, t) for t in t_max * np.geomspace(1e-3, 1.0, 25)[:-1]] + [top]
        for i, here in enumerate(grid):
            if here.kept <= tgt:
                if here.kept == tgt:
                    return here
                lo = grid[i - 1] if i else at(ids, 0.0)
                return _bisect(seg, ids, tgt, lo, here, min_k, rel_tol) if lo.kept > tgt else lo
        return min(grid, key=lambda e: (e.kept, e.t))  # every selection is larger than asked: the smallest

    def solve(ids, tgt, t_est, step, rel_tol):
        if t_est is None:  # no estimate yet: the whole range
            lo = at(ids, 0.0)
            if lo.kept <= tgt:
                return lo
            hi = at(ids, t_max)
            if hi.kept >= tgt:
                return below_top(ids, tgt, hi, rel_tol)
            return _bisect(seg, ids, tgt, lo, hi, min_k, rel_tol)
        est = at(ids, t_est)
        if est.kept == tgt:
            return est
        lo = hi = est
        if est.kept > tgt:  # too many kept: widen upwards until the count falls to the target
            while hi.kept > tgt:
                lo = hi
                if hi.t >= t_max:
                    return below_top(ids, tgt, hi, rel_tol)
                hi = at(ids, min(t_max, t_est * (1 + step) if t_est > 0 else t_max * step))
                step *= 4
        else:
            while lo.kept < tgt:
                hi = lo
                if lo.t <= 0.0:
                    return lo
                lo = at(ids, t_est * (1 - step) if step < 0.5 else 0.0)
                step *= 4
        for end in (lo, hi):
            if end.kept == tgt:
                return end
        return _bisect(seg, ids, tgt, lo, hi, min_k, rel_tol)

    n_big = int(lens[big].sum())
    draw = np.random.default_rng(0).random(big.size)  # one draw: every level's subset contains the smaller ones
    t_est = None
    for size, rel_tol, step in _SEARCH_LEVELS + ((None, 0.0, _FULL_STEP),):
        if size is None:
            ids, tgt = big, target_big
        else:
            ids = big[draw < size / n_big]
            if 2 * size >= n_big or ids.size < 50:
                continue  # the subset would be the data, or too small to say anything
            tgt = target_big * lens[ids].sum() / n_big
        t_est = solve(ids, tgt, t_est, step, rel_tol).t
    return t_est


def diffprob_threshold_for_fraction(prob, labels, keep_fraction, min_samples_per_id=5, excluded=None) -> float:
    """The DiffProb threshold whose selection keeps the fraction closest to ``keep_fraction``.

    The fraction is of all N samples, excluded ones included. So ``0.5`` with cleaning keeps half of the
    original dataset, and cleaned and uncleaned selections are then of equal size (the paper's columns).
    When two thresholds keep counts equally close to the target, the smaller threshold (the larger
    selection) wins.

    Range. The search covers ``[0, R]``, where R is the largest probability range (max - min) of an
    identity with more than MIN samples. At t = 0 the selection is largest. At ``t >= R`` every such
    identity keeps one sample in round 0 and relaxes to at least MIN. Above R the relaxation makes
    K(t) climb back: for a huge t the rounds only end at a negative threshold, and that round keeps
    everything. So thresholds above R never serve a request.

    Method. The kept count K(t) is piecewise constant and falls overall. Without relaxation (MIN <= 1)
    it is monotone. With relaxation, an identity lands in rounds 0.01 * t apart, so its count can jump
    back up as t grows. First, t is estimated by bisection on random subsets of the identities (about
    20k, then 200k samples). Then the full data is bracketed around that estimate, and bisection runs
    down to adjacent floats or an exact hit. Each step re-evaluates only the identities whose result
    can still change inside the bracket: those with different counts or different relaxation rounds at
    its two ends. That is exact for every threshold visited. The answer is the closer side of the
    crossing of K(t) with the target. It is the global optimum whenever K is monotone, which the tests
    check by brute force. A target below K(R), about MIN per identity, falls where K is not monotone.
    There a geometric grid over the range looks for the first crossing, or else for the smallest
    selection (best effort: a few isolated thresholds may keep slightly fewer).
    """
    keep_fraction = check_fraction(keep_fraction, "keep_fraction")
    min_k = check_min(min_samples_per_id)
    seg = _prepare_diffprob(prob, labels, excluded)
    if seg.order.size == 0:
        raise InputError("every sample is excluded: there is nothing to select a threshold for")
    return _search_threshold(seg, keep_fraction * seg.num_images, min_k)


def diffprob_for_fraction(prob, labels, keep_fraction, min_samples_per_id=5, excluded=None, return_rank=False):
    """``(kept, threshold)``: ``diffprob`` at ``diffprob_threshold_for_fraction`` (one preparation for both);
    ``(kept, threshold, rank)`` with ``return_rank`` (see ``diffprob``)."""
    keep_fraction = check_fraction(keep_fraction, "keep_fraction")
    min_k = check_min(min_samples_per_id)
    seg = _prepare_diffprob(prob, labels, excluded)
    if seg.order.size == 0:
        raise InputError("every sample is excluded: there is nothing to select a threshold for")
    t = _search_threshold(seg, keep_fraction * seg.num_images, min_k)
    if return_rank:
        kept, rank = _diffprob_positions(seg, t, min_k, True)
        return kept, t, rank
    return _diffprob_positions(seg, t, min_k), t
