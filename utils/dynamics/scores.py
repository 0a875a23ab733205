"""Per-sample importance scores from the training records (NumPy only); CCS, which selects by them, is in utils/selection/keep.py.

The pruning methods a data-pruning researcher compares against, computed from what training records
(``utils/training/recording.py``, ``Recorder``) for every epoch and sample:

* ``topk_logits`` (E, N, k) float, ``topk_index`` (E, N, k) int: the k largest margin-free logits
  ``s * cos`` and their classes, descending. An epoch in which a sample was not seen (training drops the
  last partial batch) is recorded with index -1 in every slot and NaN logits;
* ``rest_mean_logit`` (E, N): the mean margin-free logit of the C - k classes outside the top k;
* ``label_logit`` (E, N), optional: the margin-free logit of the labelled class, the ``label_logit`` key
  of ``ShardedClassifier.score`` (same scale as the top-k logits).

Every score function returns float64 (N,) with **higher = more important to keep**, the direction
``keep_top_per_identity`` and ``coreset_order = "descending"`` use; a sample never seen gets NaN, which
ranks lowest. Where a paper's quantity runs the other way (AUM, margin) the function returns its negation
and says so. ``labels`` are the classes of the recorded head, in [0, num_classes). ``epoch`` counts
training epochs from 1, as the record files ``epoch_001 ...`` do, and -1 means the last recorded one.

The full softmax is not recorded. Where a score needs it, it is approximated by the k recorded logits
plus C - k copies of the rest mean (when an exact ``label_logit`` is given and the labelled class is
outside the top k, by that logit plus C - k - 1 copies of the mean of the remaining classes). By
Jensen's inequality sum_c exp(z_c) over the rest is >= (C - k) exp(mean), so the approximation
underestimates the partition function: recorded-class probabilities come out slightly high.

The records are read in blocks of samples, so memory-mapped inputs (``np.load(..., mmap_mode="r")``)
work and the extra memory stays a few MB plus the (N,) outputs.

* ``el2n_scores``: EL2N (Paul et al. 2021);
* ``forgetting_scores``: forgetting events (Toneva et al. 2019);
* ``aum_scores``: area under the margin (Pleiss et al. 2020), negated;
* ``margin_scores`` and ``least_confidence_scores``: the uncertainty of one epoch's prediction;
"""
from __future__ import annotations

import operator

import numpy as np

from utils.dynamics.blocks import chunk_samples, iter_chunks
from utils.errors import InputError

__all__ = ["el2n_scores", "forgetting_scores", "aum_scores", "margin_scores", "least_confidence_scores"]

_BLOCK = 1 << 20  # record entries (epochs x samples x k) per block: a few MB of float32 temporaries


# ============================================================================ validation and block reading
def _check_records(topk_logits, topk_index, rest_mean_logit, num_classes, labels=None, label_logit=None):
    """The inputs as arrays (memory maps stay memory maps), checked: (lg or None, ix, rest or None, C, y, ll)."""
    ix = np.asanyarray(topk_index)
    if ix.ndim != 3:
        raise InputError(f"topk_index must have shape (epochs, samples, k), found shape {ix.shape}")
    E, N, k = ix.shape
    if E == 0 or N == 0 or k == 0:
        raise InputError(f"empty input: topk_index has shape {ix.shape} (epochs, samples and k must be > 0)")
    if ix.dtype.kind not in "iu":
        raise InputError(f"topk_index must be integers, found dtype {ix.dtype}")
    lg = None if topk_logits is None else np.asanyarray(topk_logits)
    if lg is not None:
        if lg.shape != ix.shape:
            raise InputError(f"topk_logits and topk_index shapes differ: {lg.shape} and {ix.shape}")
        if lg.dtype.kind != "f":
            raise InputError(f"topk_logits must be a float array, found dtype {lg.dtype}")
    rest = None
    for name, arr in (("rest_mean_logit", rest_mean_logit), ("label_logit", label_logit)):
        if arr is None:
            continue
        a = np.asanyarray(arr)
        if a.shape != (E, N):
            raise InputError(f"{name} must have shape {(E, N)} (epochs, samples) like the top-k records, "
                             f"found {a.shape}")
        if a.dtype.kind != "f":
            raise InputError(f"{name} must be a float array, found dtype {a.dtype}")
        if name == "rest_mean_logit":
            rest = a
        else:
            label_logit = a
    try:
        C = operator.index(num_classes)
    except TypeError:
        raise InputError(f"num_classes must be an integer, found {num_classes!r}") from None
    if C < max(k, 2):
        raise InputError(f"num_classes ({C}) must be >= 2 and >= the recorded top k ({k})")
    y = None
    if labels is not None:
        y = np.asarray(labels)
        if y.shape != (N,):
            raise InputError(f"labels must have shape ({N},), one class per recorded sample, found {y.shape}")
        if y.dtype.kind not in "iu":
            raise InputError(f"labels must be integers, found dtype {y.dtype}")
        bad = (y < 0) | (y >= C)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(f"label out of range: labels[{i}] = {y[i]}, expected a class in [0, {C})")
        y = y.astype(np.int32 if C < 2 ** 31 else np.int64)
    return lg, ix, rest, C, y, label_logit


def _epoch_row(epoch, num_epochs: int) -> int:
    """0-based record row of ``epoch`` (1-based training epoch, -1 = the last recorded)."""
    try:
        e = operator.index(epoch)
    except TypeError:
        raise InputError(f"epoch must be an integer (1-based, -1 = last), found {epoch!r}") from None
    if e == -1:
        return num_epochs - 1
    if not 1 <= e <= num_epochs:
        raise InputError(f"epoch {e} is beyond the recorded epochs 1..{num_epochs} (or -1 for the last)")
    return e - 1


def _blocks(arrays, num_samples: int, entries_per_sample: int):
    """(a, b, [x[:, a:b] for x in arrays]) over blocks of samples of _BLOCK record entries, read a chunk at a time
    (utils/dynamics/blocks.py: file reads of memory-mapped records, so the process never holds the whole file)."""
    step = max(64, _BLOCK // max(1, entries_per_sample))
    for a0, b0, rows in iter_chunks(arrays, num_samples, chunk_samples(arrays, step)):
        for a in range(a0, b0, step):
            b = min(b0, a + step)
            yield a, b, [None if x is None else x[:, a - a0:b - a0] for x in rows]


def _seen(ix: np.ndarray, C: int, a: int) -> np.ndarray:
    """(E, n) bool: epochs in which each sample was seen, from an index block (E, n, k); validates it.

    Training writes -1 to every slot of an unseen epoch, so slot 0 says it. The checks make sure no
    other negative value exists (a -1 in a seen epoch's slot, or a partly -1 record) and every class is < C.
    """
    seen = ix[..., 0] >= 0
    unseen = seen.size - int(np.count_nonzero(seen))
    if int(np.count_nonzero(ix < 0)) != unseen * ix.shape[-1] or (unseen and (ix[~seen] != -1).any()):
        raise InputError(f"topk_index must be in [0, num_classes) where a sample was seen and -1 in every slot "
                         f"where it was not; samples {a}..{a + ix.shape[1] - 1} break this")
    if int(ix.max()) >= C:
        raise InputError(f"topk_index must be in [0, {C}), found {int(ix.max())} (samples {a}..{a + ix.shape[1] - 1})")
    return seen


def _mean_over_seen(values: np.ndarray, seen: np.ndarray, a: int, what: str) -> np.ndarray:
    """Mean over axis 0 of ``values`` (E, n) where seen, NaN where never seen; non-finite seen values are errors."""
    if not np.isfinite(values[seen]).all():
        raise InputError(f"{what} is not finite in an epoch where the sample was seen (samples {a}..): "
                         f"the logits must be finite there")
    count = seen.sum(axis=0)
    total = np.where(seen, values, 0.0).sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _label_slot(ix: np.ndarray, y: np.ndarray):
    """(flat entry of the labelled class in each (epoch, sample) row or of slot 0, found) for ix (E, n, k)."""
    E, n, k = ix.shape
    eq = ix == y[:, None]
    slot = eq.argmax(axis=2).ravel()  # 0 where the label is not in the top k
    flat = np.arange(0, E * n * k, k, dtype=np.int64) + slot
    found = eq.ravel()[flat].reshape(E, n)
    return flat, found


# ============================================================================ EL2N
def el2n_scores(topk_logits, topk_index, rest_mean_logit, labels, num_classes, epoch, label_logit=None) -> np.ndarray:
    """EL2N (Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021). Higher = keep.

    EL2N_e(x, y) = || softmax(z_e(x)) - onehot(y) ||_2 with the margin-free logits z_e of epoch e. The
    score is its mean over the recorded epochs 1..``epoch`` in which the sample was seen (the paper takes
    an early epoch and averages over independent training runs; one run records every epoch, so the
    average here is over epochs). NaN when the sample was never seen by then.

    Approximation: softmax over the k recorded logits and C - k copies of the rest mean. The labelled
    class, when outside the top k, is one of those copies, unless ``label_logit`` (E, N) is given: then
    it has its exact logit and the other C - k - 1 classes the mean that makes the rest add up,
    ((C - k) * rest - label_logit) / (C - k - 1). Computed as sqrt(sum_{c != y} p_c^2 + (1 - p_y)^2)
    with 1 - p_y summed from the other classes (no cancellation when p_y is near 1), in float32.
    """
    lg, ix, rest, C, y, ll = _check_records(topk_logits, topk_index, rest_mean_logit, num_classes, labels,
                                            label_logit)
    if lg is None or rest is None:
        raise InputError("el2n_scores needs topk_logits and rest_mean_logit")
    E, N, k = ix.shape
    rows = _epoch_row(epoch, E) + 1
    out = np.empty(N, dtype=np.float64)
    arrays = (lg[:rows], ix[:rows], rest[:rows], None if ll is None else ll[:rows])
    for a, b, (lg_b, ix_b, rest_b, ll_b) in _blocks(arrays, N, rows * k):
        seen = _seen(ix_b, C, a)
        out[a:b] = _mean_over_seen(_el2n_block(lg_b, ix_b, rest_b, y[a:b], C, ll_b, seen), seen, a, "EL2N")
    return out


def _el2n_block(lg, ix, rest, y, C, ll, seen) -> np.ndarray:
    E, n, k = lg.shape
    t = lg.astype(np.float32)
    flat, found = _label_slot(ix, y)
    # The classes other than the label outside the top k: how many, and the logit they all get.
    n_rest = np.where(found, C - k, C - k - 1).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = rest.astype(np.float32) if C > k else np.zeros((E, n), np.float32)  # C == k: no rest (NaN)
        z_y = np.where(found, t.ravel()[flat].reshape(E, n), r)
        if ll is not None:
            exact = ll.astype(np.float32)
            z_y = np.where(found, z_y, exact)
            r = np.where(found | (n_rest == 0), r, ((C - k) * r - exact) / np.maximum(n_rest, 1))
        if C == k and not found[seen].all():
            raise InputError("topk_index: the labelled class is missing from a full (k == num_classes) top k")
        m = np.maximum(t[..., 0], z_y)
        np.maximum(m, np.where(n_rest > 0, r, m), out=m)
        t -= m[..., None]
        np.exp(t, out=t)
        t.ravel()[flat[found.ravel()]] = 0.0  # the labelled class is not an "other" class
        ones = np.ones(k, np.float32)
        a_rest = np.where(n_rest > 0, np.exp(r - m), 0.0).astype(np.float32)
        others = t @ ones + n_rest * a_rest  # sum_{c != y} exp(z_c - m)
        sq = (t * t) @ ones + n_rest * a_rest * a_rest
        Z = others + np.exp(z_y - m)
        return np.sqrt(sq + others * others) / Z


# ============================================================================ forgetting events
def forgetting_scores(topk_index, labels, num_classes) -> np.ndarray:
    """Forgetting events (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural
    Network Learning", ICLR 2019). Higher = keep.

    A sample is correct in an epoch when its margin-free arg-max class, ``topk_index[e, i, 0]``, is its
    label. A forgetting event is a transition correct -> wrong between two consecutive epochs in which the
    sample was seen (unseen epochs are skipped, not counted as wrong). The score is the number of events.
    A sample never correct in any seen epoch was never learned, which the paper ranks as most forgettable
    ("infinite" events): it scores E + 1, above any possible count (at most E / 2) while staying finite,
    so score ranges (CCS strata) stay usable. A sample never seen scores NaN.

    The paper evaluates correctness at every mini-batch presentation; the records hold one value per
    epoch, taken when the sample was trained on, which is one presentation per epoch.
    """
    _, ix, _, C, y, _ = _check_records(None, topk_index, None, num_classes, labels)
    E, N, k = ix.shape
    out = np.empty(N, dtype=np.float64)
    for a, b, (ix_b,) in _blocks((ix,), N, E * k):
        seen = _seen(ix_b, C, a)
        correct = (ix_b[:, :, 0] == y[a:b]) & seen
        events = np.zeros(b - a, dtype=np.int64)
        last = np.zeros(b - a, dtype=bool)  # correct at the last seen epoch
        for e in range(E):
            events += last & seen[e] & ~correct[e]
            last = np.where(seen[e], correct[e], last)
        learned = correct.any(axis=0)
        out[a:b] = np.where(learned, events, E + 1)
        out[a:b][~seen.any(axis=0)] = np.nan
    return out


# ============================================================================ AUM
def aum_scores(topk_logits, topk_index, rest_mean_logit, label_logit, labels, num_classes) -> np.ndarray:
    """Minus the area under the margin (Pleiss et al., "Identifying Mislabeled Data using the Area Under the
    Margin Ranking", NeurIPS 2020). Higher = keep; the value returned is **-AUM**.

    AUM(x, y) = mean over the epochs in which the sample was seen of (z_y - max_{c != y} z_c), with the
    margin-free logits z (``label_logit`` for z_y). The largest other logit is the top-1 logit, or the
    top-2 logit when the top-1 class is the label. With k == 1 and the label on top, the second logit
    was not recorded: the rest mean stands in for it, which is at most the true second logit, so that
    epoch's margin is overestimated. Low AUM marks mislabeled or hard samples; -AUM puts them first, the
    direction of every score here (keep the hard ones). To drop likely mislabeled samples instead, rank
    ascending.
    """
    lg, ix, rest, C, y, ll = _check_records(topk_logits, topk_index, rest_mean_logit, num_classes, labels,
                                            label_logit)
    if lg is None or ll is None:
        raise InputError("aum_scores needs topk_logits and label_logit")
    E, N, k = ix.shape
    if k == 1 and rest is None:
        raise InputError("aum_scores with k == 1 needs rest_mean_logit (the stand-in for the second logit)")
    out = np.empty(N, dtype=np.float64)
    for a, b, (lg_b, ix_b, rest_b, ll_b) in _blocks((lg, ix, rest if k == 1 else None, ll), N, E * k):
        seen = _seen(ix_b, C, a)
        top = lg_b[:, :, :2].astype(np.float32)
        second = top[..., 1] if k > 1 else rest_b.astype(np.float32)
        label_on_top = ix_b[:, :, 0] == y[a:b]
        with np.errstate(invalid="ignore"):
            margin = ll_b.astype(np.float32) - np.where(label_on_top, second, top[..., 0])
        out[a:b] = -_mean_over_seen(margin, seen, a, "AUM")
    return out


# ============================================================================ margin and least confidence
def _epoch_uncertainty(topk_logits, topk_index, rest_mean_logit, num_classes, epoch, margin: bool):
    """p2 - p1 (``margin``) or 1 - p1 of one epoch, float64 (N,), over the approximated softmax."""
    lg, ix, rest, C, _, _ = _check_records(topk_logits, topk_index, rest_mean_logit, num_classes)
    if lg is None or (rest is None and C > ix.shape[2]):
        raise InputError("needs topk_logits, and rest_mean_logit when k < num_classes")
    E, N, k = ix.shape
    row = _epoch_row(epoch, E)
    out = np.empty(N)
    n_rest = C - k
    arrays = (lg[row:row + 1], ix[row:row + 1], rest[row:row + 1] if n_rest else None)
    for a, b, (lg_b, ix_b, rest_b) in _blocks(arrays, N, k):
        seen = _seen(ix_b, C, a)[0]
        t = lg_b[0].astype(np.float64)
        r = rest_b[0].astype(np.float64) if n_rest else np.full(b - a, -np.inf)
        with np.errstate(invalid="ignore"):
            m = np.maximum(t[:, 0], r)
            ex = np.exp(t - m[:, None])
            a_rest = np.exp(r - m)
            others = ex[:, 1:].sum(axis=1) + n_rest * a_rest  # 1 - p1 from the other entries: exact near p1 = 1
            Z = ex[:, 0] + others
            if margin:  # the second largest entry: top-2, or a rest-mean copy if it is above (or k == 1)
                second = np.maximum(ex[:, 1], a_rest) if k > 1 else a_rest
                value = (second - ex[:, 0]) / Z
            else:
                value = others / Z
        if not np.isfinite(value[seen]).all():
            raise InputError(f"topk_logits / rest_mean_logit of epoch {row + 1} are not finite where a sample was "
                             f"seen (samples {a}..)")
        value[~seen] = np.nan
        out[a:b] = value
    return out


def margin_scores(topk_logits, topk_index, rest_mean_logit, num_classes, epoch=-1) -> np.ndarray:
    """Minus the margin of one epoch's prediction (margin sampling; Scheffer et al. 2001, DeepCore's
    "Margin"). Higher = keep; the value returned is **-(p1 - p2)**.

    p1, p2: the two largest probabilities of the margin-free softmax at ``epoch``, approximated from the
    k recorded logits plus C - k copies of the rest mean (with k == 1, p2 is a rest-mean copy). A small
    margin means an uncertain prediction near a decision boundary: the sample is important. NaN where the
    sample was not seen in that epoch.
    """
    return _epoch_uncertainty(topk_logits, topk_index, rest_mean_logit, num_classes, epoch, margin=True)


def least_confidence_scores(topk_logits, topk_index, rest_mean_logit, num_classes, epoch=-1) -> np.ndarray:
    """Least confidence, 1 - max_c p_c, of one epoch's prediction (Settles 2009; DeepCore's
    "LeastConfidence"). Higher = keep.

    p: the margin-free softmax at ``epoch``, approximated from the k recorded logits plus C - k copies of
    the rest mean; 1 - p1 is summed from the other entries (exact near p1 = 1). NaN where the sample was
    not seen in that epoch. (The scoring stage's ``pred_prob`` gives the exact 1 - p1 of a checkpoint.)
    """
    return _epoch_uncertainty(topk_logits, topk_index, rest_mean_logit, num_classes, epoch, margin=False)
