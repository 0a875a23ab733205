"""Soft labels of a training trajectory, from its top-k records, in one streamed pass.

"Data Pruning Can Do More" (Yang et al.) averages a sample's logits over the training epochs and takes the
softmax: the soft label. Only the top k logits of each epoch are recorded (utils/training/recording.py), with the
mean of the others: a class outside an epoch's top k takes that epoch's rest mean, and the classes never in
any top k share one value, so the softmax over all classes is exact in closed form for that vector (and
the vector is the true mean logit vector when k = num_classes). One kernel serves the entropy selection
(`soft_label_entropy`, here) and the cleaning rules (`utils.cleaning.probabilities.trajectory_soft_labels`).

Per sample, a compiled kernel (`utils.dynamics.soft_kernel`, numba) groups the E x k records by class in a small hash
table and sums each class's logits above the epoch's rest mean; the entropy, the labelled class's
probability and the `keep` most probable classes follow from those groups. No N x num_classes array, no
Python per sample.

The records are read in chunks of samples by `utils.dynamics.blocks.iter_chunks` (at Glint360K scale they are
21 GB: file reads, not memory-mapped pages, so the process holds a chunk at a time), and each chunk is
computed in blocks on every core (the kernel releases the GIL).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np

from utils.dynamics.blocks import chunk_samples, for_each_block, iter_chunks
from utils.errors import InputError
from utils.dynamics.soft_kernel import CLASS_RANGE, HALF, REPEATED_CLASS, REST_NOT_FINITE, soft_block

__all__ = ["SparseProbs", "soft_labels", "soft_label_entropy", "checked_records"]

BLOCK_ENTRIES = 1 << 19  # (sample, epoch, slot) entries per block a thread computes (one call of the kernel)


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
    by the number of seen epochs; the other classes sit at 0. A per-sample hash table of the classes groups
    the entries (`soft_labels`, `utils.dynamics.soft_kernel`).
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
    class's probability, the probability of an unlisted class and the `keep` most probable classes (without
    labels, those fields are empty arrays).

    Inputs: `topk_logits` (E, N, k) margin-free logits (any float dtype), `topk_index` (E, N, k) their
    classes, -1 where the sample was not seen that epoch, `rest_mean_logit` (E, N) the mean logit of the
    classes outside that epoch's top k (ignored when k = num_classes).
    A sample is seen in an epoch when all k classes are set and all k logits are finite; its mean is over
    the epochs it was seen in; a sample never seen gets NaN everywhere. Relative to the tail (the mean of
    the seen rest means), a listed class sits at x_c = sum over the seen epochs with c in the top k of
    (logit - that epoch's rest mean) / seen epochs, every other class at 0; all in float64. Classes are
    ranked by descending probability, ties (equal mean logits) to the lower class id. Raises InputError
    (naming the sample) for a class outside [0, num_classes), a class repeated within an epoch's top k, or a
    non-finite rest mean of a seen epoch.
    The arrays' shapes and types are the caller's to check (`checked_records`).
    """
    lg, ix, rest = topk_logits, topk_index, rest_mean_logit
    E, N, k = lg.shape
    C = int(num_classes)
    keep = int(keep) if labels is not None else 0
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    n = N if labels is not None else 0  # without labels only the entropy is computed (and allocated)
    out = SparseProbs(np.full((n, keep), -1, np.int64), np.zeros((n, keep)), np.full(n, np.nan),
                      np.full(n, np.nan), np.full(N, np.nan), source)
    block = max(1, BLOCK_ENTRIES // (E * k))
    chunk = chunk_samples((lg, ix, rest), block)

    for a, b, (lg_c, ix_c, rest_c) in iter_chunks((lg, ix, rest), N, chunk):
        def on_block(s, t):
            _block(lg_c[:, s:t], ix_c[:, s:t], rest_c[:, s:t], C, a + s,
                   None if labels is None else labels[a + s:a + t], out)

        for_each_block(on_block, b - a, block)  # on every core
    return out


_FLOATS, _INTS = (np.dtype(np.float32), np.dtype(np.float64)), (np.dtype(np.int32), np.dtype(np.int64))


def _kernel_float(x):
    """Logits in a type the compiled kernel takes (each type is compiled once, then cached on disk)."""
    if x.dtype in _FLOATS:
        return x
    return x.astype(np.float32 if x.dtype == np.float16 else np.float64)


def _block(lg, ix, rest, C: int, offset: int, labels, out: SparseProbs):
    E, n, k = lg.shape
    rows = slice(offset, offset + n)
    half = lg.dtype == rest.dtype == np.float16  # the usual records: widened in the kernel
    lg, rest = (lg.view(np.uint16), rest.view(np.uint16)) if half else (_kernel_float(lg), _kernel_float(rest))
    ix = ix if ix.dtype in _INTS else ix.astype(np.int64)
    status = np.zeros(3, np.int64)
    with_labels = labels is not None
    labels = labels if with_labels else np.zeros(0, np.int64)
    soft_block(lg, ix, rest, C, labels, with_labels, k < C, HALF, out.entropy[rows],
               out.label_prob[rows], out.rest_prob[rows], out.classes[rows], out.probs[rows], status)
    code, i, value = (int(v) for v in status)
    if code == CLASS_RANGE:
        raise InputError(f"topk_index must be in [0, {C}), found class {value} (sample {offset + i}): top-k records "
                         f"that name a class the dataset does not have belong to another dataset")
    if code == REPEATED_CLASS:
        raise InputError(f"topk_index repeats a class within one epoch's top k (class {value}, sample {offset + i})")
    if code == REST_NOT_FINITE:
        raise InputError(f"rest_mean_logit must be finite for every epoch a sample was seen in when k < num_classes; "
                         f"it is not for sample {offset + i} in epoch {value}")
