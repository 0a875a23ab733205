"""Per-identity data-pruning selections for face recognition (NumPy only).

The pruning rules of the DiffProb paper and of the methods it is compared with:

* ``diffprob``: DiffProb (Caldeira et al., FG 2025). Per identity, a sample is dropped when its
  labelled-class probability is within ``t`` of the last kept sample.
* ``diffprob_threshold_for_fraction`` and ``diffprob_for_fraction``: the threshold for a requested kept fraction.
* ``dynunc_scores``: DynUnc (He et al. 2023), the uncertainty computed from per-epoch probabilities.
* the entropy of "Data Pruning Can Do More" (Yang et al., TMLR) is ``utils.dynamics.soft_labels.soft_label_entropy``,
  streamed over the top-k records with the cleaning's soft labels.
* ``keep_top_per_identity``: the one helper that keeps k samples per identity by score. DynUnc, the
  entropy method and Rand all go through it.
* ``random_keep``: Rand, uniformly at random within each identity.

Conventions. ``labels`` holds one non-negative integer identity label per sample. The values can be
anything and need not be contiguous. A *sample index* is a position in these arrays. Every selection returns
the kept sample indices as a sorted, unique ``int64`` array. ``excluded`` is a boolean mask of length N or an
array of sample indices. It removes samples before a method runs (cleaning), and an identity left with no
sample vanishes.

Everything is vectorised. One sort groups the samples by identity, and the per-identity rules run as
segment operations on that order. Python loops only step through positions within an identity, DiffProb
relaxation rounds, windows or bisection steps. They never loop over identities.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple

import numpy as np

from utils.errors import InputError

__all__ = [
    "diffprob", "diffprob_threshold_for_fraction", "diffprob_for_fraction", "dynunc_scores",
    "keep_top_per_identity", "random_keep", "random_key", "per_identity_counts", "identity_index",
    "label_map_for", "selection_summary", "format_summary",
]

_EMPTY = np.empty(0, dtype=np.int64)
_CHUNK = 1 << 14  # elements per vectorised block: small enough that the temporaries stay in cache


# ============================================================================ input validation
def _int_labels(labels) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise InputError(f"labels must be a 1-D array (one identity label per sample), found shape {arr.shape}")
    if arr.size == 0:
        raise InputError("empty input: labels has no sample")
    if arr.dtype.kind in "iu":
        out = arr.astype(np.int64, copy=False)
    elif arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        out = arr.astype(np.int64)
    else:
        raise InputError(f"labels must be integers, found dtype {arr.dtype}")
    if out.min() < 0:
        i = int(np.argmax(out < 0))
        raise InputError(f"labels must be >= 0, found labels[{i}] = {out[i]}")
    return out


def _excluded_mask(excluded, n: int) -> np.ndarray | None:
    """``excluded`` (None, a bool mask of length n, or sample indices) as a bool mask, or None."""
    if excluded is None:
        return None
    ex = np.asarray(excluded)
    if ex.dtype == bool:
        if ex.shape != (n,):
            raise InputError(f"excluded: a boolean mask must have shape ({n},), found {ex.shape}")
        return ex if ex.any() else None
    if ex.size == 0:
        return None
    if ex.dtype.kind not in "iu" or ex.ndim != 1:
        raise InputError(f"excluded must be a boolean mask of length {n} or a 1-D array of sample indices, "
                         f"found dtype {ex.dtype} shape {ex.shape}")
    if ex.min() < 0 or ex.max() >= n:
        bad = ex[(ex < 0) | (ex >= n)][0]
        raise InputError(f"excluded: sample index {bad} outside [0, {n})")
    mask = np.zeros(n, dtype=bool)
    mask[ex] = True
    return mask


def _check_fraction(fraction, name: str = "fraction") -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in (0, 1], found {fraction!r}") from None
    if not 0.0 < f <= 1.0:  # also rejects NaN
        raise InputError(f"{name} must be in (0, 1], found {fraction}")
    return f


def _check_scores(scores, n: int) -> np.ndarray:
    """One numeric score per sample (any numeric dtype; NaN allowed)."""
    scores = np.asarray(scores)
    if scores.shape != (n,):
        raise InputError(f"scores and labels differ in length: scores shape {scores.shape}, {n} labels")
    if scores.dtype.kind not in "fiub":
        raise InputError(f"scores must be a numeric array, found dtype {scores.dtype}")
    return scores


def _check_int(value, name: str, minimum: int, why: str = "") -> int:
    """`value` as an int of at least `minimum`, else an InputError naming `name` (and `why` the minimum)."""
    try:
        v = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer >= {minimum}, found {value!r}") from None
    if v < minimum:
        raise InputError(f"{name} must be >= {minimum}{why}, found {v}")
    return v


def _check_min(min_samples_per_id) -> int:
    return _check_int(min_samples_per_id, "min_samples_per_id", 0)


def _check_prob(prob, n: int, mask: np.ndarray | None) -> np.ndarray:
    p = np.asarray(prob)
    if p.ndim != 1:
        raise InputError(f"prob must be a 1-D array (one probability per sample), found shape {p.shape}")
    if p.shape[0] != n:
        raise InputError(f"prob and labels differ in length: {p.shape[0]} probabilities, {n} labels")
    if p.dtype.kind not in "fiu":
        raise InputError(f"prob must be a float array, found dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    bad = ~(p >= 0) | (p == np.inf)  # NaN, negative, +inf
    if mask is not None:
        bad &= ~mask
    if bad.any():
        i = int(np.argmax(bad))
        raise InputError(f"prob must be finite and >= 0 (exclude the sample instead), found prob[{i}] = {p[i]}"
                         f" ({int(bad.sum())} such samples)")
    return p + 0.0  # -0.0 -> +0.0, and a private copy


# ============================================================================ grouping by identity
def _dense_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(identities ascending, dense label 0..K-1 of each sample) for int64 labels >= 0."""
    n = labels.size
    lmax = int(labels.max())
    if lmax <= 2 * n + (1 << 20):  # a lookup table beats a sort when labels are not too sparse
        present = np.zeros(lmax + 1, dtype=bool)
        present[labels] = True
        identities = np.flatnonzero(present)
        remap = np.cumsum(present, dtype=np.int64) - 1
        return identities.astype(np.int64), remap[labels]
    identities, dense = np.unique(labels, return_inverse=True)
    return identities.astype(np.int64), dense.astype(np.int64).reshape(-1)


def _stable_order(values: np.ndarray) -> np.ndarray:
    """Indices sorting ``values`` ascending (NaN last), with equal values in index order.

    Fast path: float values that are exact in float32 (scores saved as float32 are), and integers
    that fit in 32 bits, map to order-preserving 32-bit keys. A key packed with the index is unique,
    so one plain (SIMD) value sort gives the stable order. Any other float64 input runs a general
    argsort, then sorts packed (run of equal values, index) keys to put ties back into index order.
    """
    n = values.size
    key32 = _sortable_u32(values) if n < 2 ** 32 else None
    if key32 is not None:
        key = (key32.astype(np.uint64) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
        key.sort()
        return (key & np.uint64(0xFFFFFFFF)).astype(np.int64)
    o = np.argsort(values)
    sv = values[o]
    same = sv[1:] == sv[:-1]
    if sv.dtype.kind == "f":
        nan = np.isnan(sv)
        if nan.any():
            same |= nan[1:] & nan[:-1]
    if not same.any():
        return o
    run = np.zeros(n, dtype=np.int64)
    np.cumsum(~same, out=run[1:])
    key = run * n + o
    key.sort()
    return key % n


def _sortable_u32(values: np.ndarray) -> np.ndarray | None:
    """uint32 keys with the order of ``values`` (NaN last, -0.0 == 0.0), or None if 32 bits cannot hold them."""
    if values.dtype.kind in "iu":
        if values.size and (values.min() < -2 ** 31 or values.max() >= 2 ** 31):
            return None
        return (values.astype(np.int64) + 2 ** 31).astype(np.uint32)
    f = values.astype(np.float32)
    nan = np.isnan(values)
    if not ((f == values) | nan).all():
        return None
    f += np.float32(0.0)  # -0.0 -> +0.0
    f[nan] = np.float32(np.nan)  # one NaN pattern, positive: above +inf
    bits = f.view(np.uint32)
    # IEEE order as unsigned integers: flip every bit of negatives, set the sign bit of positives
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))


def _group_order(dense: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Indices sorted by (dense label, position in the order ``o``); ``o`` is a permutation of range(n)."""
    n = dense.size
    rank = np.empty(n, dtype=np.int64)
    rank[o] = np.arange(n, dtype=np.int64)
    key = dense * n + rank
    key.sort()
    return o[key % n]


def per_identity_counts(labels) -> tuple[np.ndarray, np.ndarray]:
    """(identities, counts): the distinct labels in ascending order and the number of samples of each."""
    labels = _int_labels(labels)
    identities, dense = _dense_labels(labels)
    return identities, np.bincount(dense, minlength=identities.size).astype(np.int64)


def identity_index(labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label dictionary, identity -> sample indices, in CSR form: ``(identities, starts, order)``.

    ``identities`` (K,) are the distinct labels in ascending order. ``order`` (N,) lists the sample indices
    grouped by identity, ascending within each identity. ``starts`` (K,) is where each identity begins in
    ``order``. Identity ``identities[i]`` owns ``order[starts[i]:starts[i + 1]]``, and the last one runs
    to ``len(order)``. All arrays are int64.
    """
    labels = _int_labels(labels)
    n = labels.size
    identities, dense = _dense_labels(labels)
    key = dense * n + np.arange(n, dtype=np.int64)
    key.sort()  # packed keys are unique, so a plain (SIMD) value sort is enough and is stable by construction
    order = key % n
    counts = np.bincount(dense, minlength=identities.size)
    starts = np.zeros(identities.size, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    return identities, starts, order


def label_map_for(kept, labels) -> dict[int, int]:
    """Old label -> new contiguous label (0, 1, ... in ascending old-label order), for the identities with
    at least one kept sample. It gives the number of classes and the labels of the retrained head."""
    labels = _int_labels(labels)
    kept = _as_kept(kept, labels.size)
    present = np.unique(labels[kept])
    return {int(old): new for new, old in enumerate(present.tolist())}


def _as_kept(kept, n: int) -> np.ndarray:
    kept = np.asarray(kept)
    if kept.size == 0:
        return _EMPTY
    if kept.ndim != 1 or kept.dtype.kind not in "iu":
        raise InputError(f"kept must be a 1-D integer array of sample indices, found dtype {kept.dtype} "
                         f"shape {kept.shape}")
    kept = kept.astype(np.int64, copy=False)
    if kept.min() < 0 or kept.max() >= n:
        bad = kept[(kept < 0) | (kept >= n)][0]
        raise InputError(f"kept: sample index {bad} outside [0, {n})")
    return kept


def selection_summary(kept, labels, num_images: int | None = None) -> dict:
    """Kept images, kept fraction (of ``num_images``, default ``len(labels)``), identities kept out of all,
    and the min / median / max number of kept images per kept identity."""
    labels = _int_labels(labels)
    kept = np.unique(_as_kept(kept, labels.size))
    total = labels.size if num_images is None else int(num_images)
    _, per_id = np.unique(labels[kept], return_counts=True)
    num_ids = int(np.unique(labels).size)
    return {
        "kept_images": int(kept.size),
        "num_images": total,
        "kept_fraction": kept.size / total if total else 0.0,
        "identities_kept": int(per_id.size),
        "identities": num_ids,
        "images_per_identity_min": int(per_id.min()) if per_id.size else 0,
        "images_per_identity_median": float(np.median(per_id)) if per_id.size else 0.0,
        "images_per_identity_max": int(per_id.max()) if per_id.size else 0,
    }


def format_summary(summary: dict) -> str:
    """One line for logs, from ``selection_summary``'s dict."""
    s = summary
    return (f"kept {s['kept_images']:,} of {s['num_images']:,} images ({s['kept_fraction']:.2%}), "
            f"{s['identities_kept']:,} of {s['identities']:,} identities, images per kept identity "
            f"min {s['images_per_identity_min']} / median {s['images_per_identity_median']:g} / "
            f"max {s['images_per_identity_max']}")


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
    labels = _int_labels(labels)
    n = labels.size
    scores = _check_scores(scores, n)
    fraction = _check_fraction(fraction)
    min_k = _check_min(min_samples_per_id)
    mask = _excluded_mask(excluded, n)
    sel = None if mask is None else np.flatnonzero(~mask)
    # Integer scores (Rand's random order) stay integers: exact, and the fast 32-bit sort path applies.
    sc = scores.astype(np.int64) if scores.dtype.kind in "iub" else scores.astype(np.float64)
    lab = labels
    if sel is not None:
        if sel.size == 0:
            return (_EMPTY, np.full(n, -1, dtype=np.int64)) if return_rank else _EMPTY
        sc, lab = sc[sel], labels[sel]
    identities, dense = _dense_labels(lab)
    # Ascending order of -score means descending score with ties by index, and NaN (= -NaN) last.
    order = _group_order(dense, _stable_order(-sc))
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
    labels = _int_labels(labels)
    return keep_top_per_identity(random_key(labels.size, seed), labels, fraction, min_samples_per_id,
                                 excluded=excluded)


def random_key(num_samples: int, seed=0) -> np.ndarray:
    """Rand's sort key: one uniformly random order of all N samples (``np.random.default_rng(seed).permutation``);
    per identity, the highest keys are kept first."""
    return np.random.default_rng(seed).permutation(num_samples)


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
    labels = _int_labels(labels)
    n = labels.size
    mask = _excluded_mask(excluded, n)
    p = _check_prob(prob, n, mask)
    sel = None if mask is None else np.flatnonzero(~mask)
    if sel is not None:
        if sel.size == 0:
            return _Segments(_EMPTY, np.empty(0), _EMPTY, _EMPTY, _EMPTY, n)
        p, labels = p[sel], labels[sel]
    identities, dense = _dense_labels(labels)
    local = _group_order(dense, _stable_order(p))
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
    return counts, pos[np.concatenate(chain)] if chain else _EMPTY


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


def _check_threshold(threshold) -> float:
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
    t = _check_threshold(threshold)
    min_k = _check_min(min_samples_per_id)
    seg = _prepare_diffprob(prob, labels, excluded)
    if seg.order.size == 0:
        return (_EMPTY, np.full(seg.num_images, -1, dtype=np.int64)) if return_rank else _EMPTY
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
    keep_fraction = _check_fraction(keep_fraction, "keep_fraction")
    min_k = _check_min(min_samples_per_id)
    seg = _prepare_diffprob(prob, labels, excluded)
    if seg.order.size == 0:
        raise InputError("every sample is excluded: there is nothing to select a threshold for")
    return _search_threshold(seg, keep_fraction * seg.num_images, min_k)


def diffprob_for_fraction(prob, labels, keep_fraction, min_samples_per_id=5, excluded=None, return_rank=False):
    """``(kept, threshold)``: ``diffprob`` at ``diffprob_threshold_for_fraction`` (one preparation for both);
    ``(kept, threshold, rank)`` with ``return_rank`` (see ``diffprob``)."""
    keep_fraction = _check_fraction(keep_fraction, "keep_fraction")
    min_k = _check_min(min_samples_per_id)
    seg = _prepare_diffprob(prob, labels, excluded)
    if seg.order.size == 0:
        raise InputError("every sample is excluded: there is nothing to select a threshold for")
    t = _search_threshold(seg, keep_fraction * seg.num_images, min_k)
    if return_rank:
        kept, rank = _diffprob_positions(seg, t, min_k, True)
        return kept, t, rank
    return _diffprob_positions(seg, t, min_k), t


# ============================================================================ DynUnc
def dynunc_scores(history, window=10) -> np.ndarray:
    """DynUnc uncertainty (He et al. 2023) of every sample, float64 (N,).

    ``history`` (E, N) holds the labelled-class probability of each sample after each epoch, and NaN where a
    sample was not seen in that epoch. For every window of ``J = window`` consecutive epochs ending at epoch
    ``J-1 .. E-2`` (0-based, the last epoch's window is left out as in the reference code), the uncertainty
    is the sample standard deviation (ddof = 1) of the window's available values. It needs at least 2, or
    the window has no value. The score is the mean over the windows that have a value, and NaN when none
    has (``keep_top_per_identity`` ranks NaN lowest).

    Vectorised over samples, in blocks that stay in cache. The window means come from running sums
    over epochs. The squared deviations are then summed around those means (two passes), so windows of
    tiny variance, such as converged samples, keep full precision. A one-pass sum-of-squares would
    cancel there.
    """
    J = _check_int(window, "window", 2, " (a standard deviation needs two epochs)")
    h = np.asarray(history)
    if h.ndim != 2:
        raise InputError(f"history must have shape (num_epochs, num_samples), found shape {h.shape}")
    E, N = h.shape
    if N == 0:
        raise InputError("empty input: history has no sample")
    if E < J + 1:
        raise InputError(f"dynunc_scores needs at least window + 1 = {J + 1} epochs (windows end at epochs "
                         f"J-1 .. E-2), found {E}")
    if h.dtype.kind not in "fiu":
        raise InputError(f"history must be a float array, found dtype {h.dtype}")
    out = np.empty(N, dtype=np.float64)
    chunk = max(64, (1 << 14) // E)  # ~500 samples at E = 34: the block stays in L2
    for a in range(0, N, chunk):
        out[a:a + chunk] = _dynunc_block(h[:E - 1, a:a + chunk], J)  # the last epoch is never in a window
    return out


def _dynunc_block(block: np.ndarray, J: int) -> np.ndarray:
    x = block.astype(np.float64)
    if np.isinf(x).any():
        raise InputError("history must hold probabilities (finite, or NaN for an unseen sample), found inf")
    valid = ~np.isnan(x)
    has_nan = not valid.all()
    if has_nan:
        x = np.where(valid, x, 0.0)
    E1, C = x.shape
    W = E1 - J + 1  # windows starting at epochs 0 .. E-1-J
    run = np.empty((E1 + 1, C))  # running sums over epochs, row by row (contiguous; faster than cumsum(axis=0))
    run[0] = 0.0
    for e in range(E1):
        np.add(run[e], x[e], out=run[e + 1])
    s1 = run[J:] - run[:W]
    if has_nan:
        cnt = np.empty((E1 + 1, C))
        cnt[0] = 0.0
        for e in range(E1):
            np.add(cnt[e], valid[e], out=cnt[e + 1])
        n = cnt[J:] - cnt[:W]
    else:
        n = np.full((W, C), float(J))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
    m2 = np.empty((W, C))
    for w in range(W):
        d = x[w:w + J] - mean[w]
        if has_nan:
            d *= valid[w:w + J]
        np.einsum("ij,ij->j", d, d, out=m2[w])
    ok = n >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(m2 / (n - 1))
        n_win = ok.sum(axis=0)
        total = np.where(ok, std, 0.0).sum(axis=0)
        return np.where(n_win > 0, total / n_win, np.nan)

