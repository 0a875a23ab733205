"""Per-identity arrays, shared by the selection methods and the per-sample scores: input checks (labels,
fractions, scores, probabilities, excluded samples), identities as dense labels, stable orders, per-identity
counts, label maps and the one-line summary of a selection (NumPy only).

Every kept list is a sorted, unique ``int64`` array of sample indices. ``labels`` holds one non-negative
integer identity label per sample; values need not be contiguous.
"""
from __future__ import annotations

import operator

import numpy as np

from utils.errors import InputError

EMPTY = np.empty(0, dtype=np.int64)


# ============================================================================ input validation
def int_labels(labels) -> np.ndarray:
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


def excluded_mask(excluded, n: int) -> np.ndarray | None:
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


def check_fraction(fraction, name: str = "fraction") -> float:
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number in (0, 1], found {fraction!r}") from None
    if not 0.0 < f <= 1.0:  # also rejects NaN
        raise InputError(f"{name} must be in (0, 1], found {fraction}")
    return f


def check_scores(scores, n: int) -> np.ndarray:
    """One numeric score per sample (any numeric dtype; NaN allowed)."""
    scores = np.asarray(scores)
    if scores.shape != (n,):
        raise InputError(f"scores and labels differ in length: scores shape {scores.shape}, {n} labels")
    if scores.dtype.kind not in "fiub":
        raise InputError(f"scores must be a numeric array, found dtype {scores.dtype}")
    return scores


def check_int(value, name: str, minimum: int, why: str = "") -> int:
    """`value` as an int of at least `minimum`, else an InputError naming `name` (and `why` the minimum)."""
    try:
        v = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer >= {minimum}, found {value!r}") from None
    if v < minimum:
        raise InputError(f"{name} must be >= {minimum}{why}, found {v}")
    return v


def check_min(min_samples_per_id) -> int:
    return check_int(min_samples_per_id, "min_samples_per_id", 0)


def check_prob(prob, n: int, mask: np.ndarray | None) -> np.ndarray:
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
def dense_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def stable_order(values: np.ndarray) -> np.ndarray:
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


def group_order(dense: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Indices sorted by (dense label, position in the order ``o``); ``o`` is a permutation of range(n)."""
    n = dense.size
    rank = np.empty(n, dtype=np.int64)
    rank[o] = np.arange(n, dtype=np.int64)
    key = dense * n + rank
    key.sort()
    return o[key % n]


def per_identity_counts(labels) -> tuple[np.ndarray, np.ndarray]:
    """(identities, counts): the distinct labels in ascending order and the number of samples of each."""
    labels = int_labels(labels)
    identities, dense = dense_labels(labels)
    return identities, np.bincount(dense, minlength=identities.size).astype(np.int64)


def identity_index(labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label dictionary, identity -> sample indices, in CSR form: ``(identities, starts, order)``.

    ``identities`` (K,) are the distinct labels in ascending order. ``order`` (N,) lists the sample indices
    grouped by identity, ascending within each identity. ``starts`` (K,) is where each identity begins in
    ``order``. Identity ``identities[i]`` owns ``order[starts[i]:starts[i + 1]]``, and the last one runs
    to ``len(order)``. All arrays are int64.
    """
    labels = int_labels(labels)
    n = labels.size
    identities, dense = dense_labels(labels)
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
    labels = int_labels(labels)
    kept = as_kept(kept, labels.size)
    present = np.unique(labels[kept])
    return {int(old): new for new, old in enumerate(present.tolist())}


def as_kept(kept, n: int) -> np.ndarray:
    kept = np.asarray(kept)
    if kept.size == 0:
        return EMPTY
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
    labels = int_labels(labels)
    kept = np.unique(as_kept(kept, labels.size))
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


# ============================================================================ samples without a score
def first_few(values, shown: int = 5) -> str:
    """The first `shown` of `values`, comma-separated, with ", ..." when there are more (for one-line reports)."""
    values = list(values)
    return ", ".join(map(str, values[:shown])) + (", ..." if len(values) > shown else "")


def unscored_line(unscored) -> str:
    """The line a selection or a cleaning prints when the scores it read have no value for some samples
    (eval_trainset.py --skip_bad_images true: images it could not decode): they are left out of the kept list."""
    unscored = np.asarray(unscored, dtype=np.int64)
    count = "1 sample has" if unscored.size == 1 else f"{unscored.size} samples have"
    return (f"{count} no score (bad images): left out of the kept list (sample{'s' * (unscored.size > 1)} "
            f"{first_few(unscored.tolist())})")
