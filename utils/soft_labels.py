"""Soft labels of a training trajectory, from its top-k records, in one streamed pass.

"Data Pruning Can Do More" (Yang et al.) averages a sample's logits over the training epochs and takes the
softmax: the soft label. Only the top k logits of each epoch are recorded (utils/training.py), with the
mean of the others: a class outside an epoch's top k takes that epoch's rest mean, and the classes never in
any top k share one value, so the softmax over all classes is exact in closed form for that vector (and
the vector is the true mean logit vector when k = num_classes). One kernel serves the entropy selection
(`soft_label_entropy`, here) and the cleaning rules (`utils.cleaning.trajectory_soft_labels`).

Per block of samples, the (class, epoch, slot) keys of a row are sorted (one short integer sort per
sample), which groups each class's entries; segment sums give each class's mean logit above the rest, and
the entropy and labelled-class probability follow, and one more short sort per sample ranks the classes
for the `keep` most probable; no N x num_classes array.

The records are read in chunks of samples by `utils.blocks.iter_chunks` (at Glint360K scale they are
21 GB: file reads, not memory-mapped pages, so the process holds a chunk at a time), and each chunk is
computed in blocks on every core.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from utils.blocks import chunk_samples, for_each_block, iter_chunks
from utils.errors import InputError

__all__ = ["SparseProbs", "soft_labels", "soft_label_entropy", "checked_records"]

BLOCK_ENTRIES = 1 << 17  # (sample, epoch, slot) entries per block a thread computes: its temporaries stay in cache


@dataclass
class SparseProbs:
    """Per sample the probabilities of a few classes (no N x K matrix).

    `classes` (N, m) int64, by descending probability, -1 where fewer are known; `probs` (N, m) float64
    (0 where `classes` is -1); `label_prob` (N,) the labelled class's probability (NaN: the sample was never
    seen); `rest_prob` (N,) the probability of each class not listed (NaN: unknown), `entropy` (N,) nats of
    the whole distribution where it is known.
    """
    classes: np.ndarray
    probs: np.ndarray
    label_prob: np.ndarray
    rest_prob: np.ndarray
    entropy: Optional[np.ndarray] = None
    source: str = ""


# ----------------------------------------------------------------------------------------------- kernel
def soft_label_entropy(topk_logits, topk_index, rest_mean_logit, num_classes) -> np.ndarray:
    """Importance from "Data Pruning Can Do More" (Yang et al., TMLR): the entropy (nats) of the soft label.

    The soft label is the softmax of the mean over epochs of the full logit vector. Only the top k logits
    of each epoch were recorded, so the mean logit vector is approximated:

    * ``topk_logits`` (E, N, k) float, ``topk_index`` (E, N, k) int in [0, num_classes), distinct within an
      epoch's top k;
    * ``rest_mean_logit`` (E, N): the mean of the logits outside that epoch's top k.

    The mean logit of a class c that entered some epoch's top k is the mean over epochs of its logit
    where it is in the top k, and the epoch's rest mean elsewhere. Every class never in any top k gets
    the mean of the rest means. The entropy of softmax over all ``num_classes`` entries of that vector is
    exact, because the equal tail values enter the log-sum-exp and the entropy in closed form. With
    ``k == num_classes`` there is no approximation: this is the entropy of softmax(mean logits), and
    ``rest_mean_logit`` is ignored. Returns float64 (N,). Keep the most uncertain samples by passing it
    to ``keep_top_per_identity``.

    Epochs in which a sample was not seen (training drops the last partial batch) are recorded with
    index -1 / NaN logits; the mean is then over the epochs the sample was seen in, and a sample never
    seen gets NaN (ranked lowest). Inputs may be float16 and memory-mapped: they are read in blocks of
    samples.

    Computation: relative to the tail value t = mean of the seen rest means, class c sits at
    x_c = sum over the seen epochs that have c in the top k of (logit - that epoch's rest mean), divided
    by the number of seen epochs; the other classes sit at 0. One sort of packed (class, epoch, slot)
    keys per sample groups the entries by class, and segment sums give the x_c (`soft_labels`).
    """
    lg, ix, rest, C = checked_records(topk_logits, topk_index, rest_mean_logit, num_classes)
    if lg.shape[1] == 0:
        raise InputError(f"empty input: topk arrays have shape {lg.shape}")
    return soft_labels(lg, ix, rest, C).entropy


def checked_records(topk_logits, topk_index, rest_mean_logit, num_classes) -> tuple:
    """(topk_logits, topk_index, rest_mean_logit, num_classes) checked for `soft_labels`; memory maps stay
    memory maps (they are read in chunks)."""
    lg, ix, rest = (np.asanyarray(x) for x in (topk_logits, topk_index, rest_mean_logit))
    C = operator.index(num_classes)
    if lg.ndim != 3 or ix.shape != lg.shape:
        raise InputError(f"topk_logits and topk_index must both have shape (epochs, samples, k), found "
                         f"{lg.shape} and {ix.shape}")
    E, N, k = lg.shape
    if E == 0 or k == 0:
        raise InputError(f"empty input: top-k records of shape {lg.shape} hold no logits (top-k of 0 or no epoch): "
                         f"train the original model with --record_topk K (K > 0)")
    if rest.shape != (E, N):
        raise InputError(f"rest_mean_logit must have shape {(E, N)}, found {rest.shape}")
    if ix.dtype.kind not in "iu":
        raise InputError(f"topk_index must be integers, found dtype {ix.dtype}")
    if C < k:
        raise InputError(f"num_classes ({C}) is smaller than the recorded top k ({k})")
    return lg, ix, rest, C


def soft_labels(topk_logits, topk_index, rest_mean_logit, num_classes: int, labels=None, keep: int = 0,
                source: str = "trajectory") -> SparseProbs:
    """The soft labels of (E, N, k) top-k records: always the entropy; with `labels`, also the labelled
    class's probability, the probability of an unlisted class and the `keep` most probable classes.

    Inputs: `topk_logits` (E, N, k) margin-free logits (any float dtype), `topk_index` (E, N, k) their
    classes, -1 where the sample was not seen that epoch, `rest_mean_logit` (E, N) the mean logit of the
    classes outside that epoch's top k (ignored when k = num_classes).
    A sample is seen in an epoch when all k classes are set and all k logits are finite; its mean is over
    the epochs it was seen in; a sample never seen gets NaN everywhere. Relative to the tail (the mean of
    the seen rest means), a listed class sits at x_c = sum over the seen epochs with c in the top k of
    (logit - that epoch's rest mean) / seen epochs, every other class at 0; all in float64. Classes are
    ranked by descending probability, ties to the lower class id (classes whose distances below the row's
    most probable class agree to float32 precision, relative 6e-8, count as tied). Raises InputError for a class outside
    [0, num_classes), a class repeated within an epoch's top k, or a non-finite rest mean of a seen epoch.
    The arrays' shapes and types are the caller's to check (`checked_records`).
    """
    lg, ix, rest = topk_logits, topk_index, rest_mean_logit
    E, N, k = lg.shape
    C = int(num_classes)
    keep = int(keep) if labels is not None else 0
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    out = SparseProbs(np.full((N, keep), -1, np.int64), np.zeros((N, keep)), np.full(N, np.nan),
                      np.full(N, np.nan), np.full(N, np.nan), source)
    block = max(1, BLOCK_ENTRIES // (E * k))
    chunk = chunk_samples((lg, ix, rest), block)

    for a, b, (lg_c, ix_c, rest_c) in iter_chunks((lg, ix, rest), N, chunk):
        def on_block(s, t):
            _block(lg_c[:, s:t], ix_c[:, s:t], rest_c[:, s:t], C, a + s,
                   None if labels is None else labels[a + s:a + t], out)

        for_each_block(on_block, b - a, block)  # on every core
    return out


def _block(lg, ix, rest, C: int, offset: int, labels, out: SparseProbs):
    E, n, k = lg.shape
    L = E * k
    rows = slice(offset, offset + n)
    hi = int(ix.max(initial=-1))
    if hi >= C:
        raise InputError(f"topk_index must be in [0, {C}), found class {hi} (samples {offset}..{offset + n - 1}): "
                         f"top-k records that name a class the dataset does not have belong to another dataset")
    # Keys class * L + (epoch * k + slot), one row of L per sample; an unseen epoch's slot j gets class C + j,
    # so its keys stay distinct, sort last and are dropped.
    kdt = np.int32 if (C + k) * L < 2 ** 31 else np.int64
    key = np.ascontiguousarray(ix.transpose(1, 0, 2), dtype=kdt)  # (n, E, k)
    d = np.ascontiguousarray(lg.transpose(1, 0, 2), dtype=np.float64)
    bad = key < 0
    bad |= ~np.isfinite(d)
    seen = np.ones((n, E), dtype=bool)
    rows_bad = bad.reshape(n, L).any(axis=1)  # few rows have an unseen epoch: per (sample, epoch) only for those
    any_bad = bool(rows_bad.any())
    if any_bad:
        seen[rows_bad] = ~bad[rows_bad].any(axis=2)
    if k < C:
        r = np.ascontiguousarray(rest.T, dtype=np.float64)
        if not np.isfinite(r[seen]).all():
            raise InputError(f"rest_mean_logit must be finite for every epoch a sample was seen in when k < "
                             f"num_classes; it is not for a sample in {offset}..{offset + n - 1}")
        d -= r[:, :, None]  # logit above its epoch's rest mean
    if any_bad:
        unseen = ~seen
        d[unseen] = 0.0
        key[unseen] = C + np.arange(k, dtype=kdt)
    key *= L
    key += np.arange(L, dtype=kdt).reshape(E, k)
    key = key.reshape(n, L)
    key.sort(axis=1)
    q = key // L  # class
    if ((key[:, 1:] // k) == (key[:, :-1] // k)).any():  # the same class * E + epoch twice
        raise InputError("topk_index repeats a class within one epoch's top k")
    entry = key - q * L
    entry += np.arange(0, n * L, L, dtype=kdt if n * L < 2 ** 31 else np.int64)[:, None]
    ds = d.ravel().take(entry.ravel())
    new = np.empty((n, L), dtype=bool)
    new[:, 0] = True
    np.not_equal(q[:, 1:], q[:, :-1], out=new[:, 1:])
    starts = np.flatnonzero(new)
    x = np.bincount(np.cumsum(new.ravel(), dtype=np.intp) - 1, weights=ds, minlength=starts.size)  # group sums
    cls = q.ravel()[starts]
    if any_bad:
        real = cls < C
        starts, x, cls = starts[real], x[real], cls[real]
    grow = starts // L  # the sample of each (sample, class) group, ascending; classes ascending within it
    n_seen = seen.sum(axis=1)
    x /= n_seen[grow]
    first = np.searchsorted(grow, np.arange(n + 1))  # each sample's first group
    n_u = np.diff(first)
    ok = n_seen > 0  # a seen sample has at least one class group
    seg = first[:-1][ok]
    tail = (C - n_u[ok]).astype(np.float64)  # classes never in a seen top k, all at 0
    m = np.maximum.reduceat(x, seg) if seg.size else np.zeros(0)
    m = np.where(tail > 0, np.maximum(m, 0.0), m)
    xm = x - np.repeat(m, n_u[ok])
    a = np.exp(xm)
    at = tail * np.exp(-m)
    Z = (np.add.reduceat(a, seg) if seg.size else np.zeros(0)) + at
    S = (np.add.reduceat(a * xm, seg) if seg.size else np.zeros(0)) - at * m
    # H = -sum p log p = log Z - sum_c a_c (x_c - m) / Z   with a_c = exp(x_c - m), Z = sum_c a_c
    entropy = np.full(n, np.nan)
    entropy[ok] = np.log(Z) - S / Z
    out.entropy[rows] = entropy
    if labels is None:
        return
    z_row = np.ones(n)
    z_row[ok] = Z  # a group's probability is a / z_row[its row]
    rest_p = np.full(n, np.nan)
    rest_p[ok] = np.where(tail > 0, np.exp(-m) / Z, 0.0)
    out.rest_prob[rows] = rest_p
    gkey = grow * C + cls  # ascending (int64: grow is)
    want = np.arange(n, dtype=np.int64) * C + labels
    pos = np.minimum(np.searchsorted(gkey, want), max(gkey.size - 1, 0))
    found = gkey[pos] == want if gkey.size else np.zeros(n, bool)
    label_p = np.where(found, a[pos] / z_row, rest_p) if gkey.size else rest_p
    out.label_prob[rows] = np.where(ok, label_p, np.nan)
    keep = out.classes.shape[1]
    if keep == 0 or a.size == 0:
        return
    # Per row, the groups by descending mean logit (so probability), ties to the lower class: one short sort per row
    # of int64 keys (the distance below the row's top, >= +0.0, as float32 bits, then the group's place in its row,
    # where classes ascend; pads sort last). Distances that agree to float32 precision (relative 6e-8) count as tied.
    place_bits = max(1, int(L - 1).bit_length())
    dist = np.subtract(0.0, xm, out=np.empty(xm.size, np.float32), casting="same_kind")
    order = np.left_shift(dist.view(np.int32), place_bits, dtype=np.int64)
    order |= np.arange(order.size) - first[grow]
    pad = np.iinfo(np.int64).max
    dense = np.full((n, L), pad)
    dense.ravel()[starts] = order
    dense.sort(axis=1)
    top = dense[:, :keep]
    r, c = np.nonzero(top != pad)
    g = first[r] + (top[r, c] & ((1 << place_bits) - 1))
    top_c = np.full(top.shape, -1, np.int64)
    top_p = np.zeros(top.shape)
    top_c[r, c] = cls[g]
    top_p[r, c] = a[g] / z_row[r]
    out.classes[rows, :top.shape[1]] = top_c
    out.probs[rows, :top.shape[1]] = top_p
