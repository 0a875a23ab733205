"""The compiled per-sample kernel of `utils.dynamics.soft_labels`: a block of top-k records to soft-label statistics.

One sample's records are E epochs x k (class, logit) pairs. Grouping them by class is the work: a small
open-addressing hash table per block (reset by a per-sample stamp, never cleared) sums each class's logits
above the epoch's rest mean in epoch order; the entropy, the labelled class's probability and the `keep`
most probable classes follow from the groups. Compiled with numba (no Python per sample, no GIL: the
blocks of a chunk run on every core), cached on disk after the first call.

Float16 records arrive as their uint16 bits (numba has no float16) and are widened here by a table, exactly.
Errors come back in `status` (code, sample in the block, value) for the caller to word.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

__all__ = ["soft_block", "HALF", "CLASS_RANGE", "REPEATED_CLASS", "REST_NOT_FINITE"]

CLASS_RANGE, REPEATED_CLASS, REST_NOT_FINITE = 1, 2, 3  # status codes; 0: no error


HALF = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # binary16 bits -> value


def _widen(h, half):
    """A record's value as float64: an integer h is the bits of an IEEE binary16, looked up in `half` (HALF)."""
    return float(half[h]) if isinstance(h, (int, np.integer)) else float(h)


@overload(_widen, inline="always")
def _widen_compiled(h, half):
    if isinstance(h, types.Integer):
        return lambda h, half: np.float64(half[h])
    return lambda h, half: np.float64(h)


@numba.njit(nogil=True, cache=True, inline="always")
def _slot(c, mask):
    """A class's first slot in the hash table (its high bits folded in, so ids equal in their low bits spread)."""
    return ((c ^ (c >> 11) ^ (c >> 22)) * 2654435761) & mask


@numba.njit(nogil=True, cache=True)
def soft_block(lg, ix, rest, num_classes, labels, with_labels, use_rest, half, entropy, label_prob, rest_prob,
               top_c, top_p, status):
    """Soft-label statistics of one block of samples, written into the output views.

    lg (E, n, k) logits: floats, or the uint16 bits of binary16 values, widened through `half` (HALF);
    ix (E, n, k) integer classes; rest (E, n) rest means, typed as lg, read only when `use_rest`; labels (n,)
    int64, read only `with_labels`, and only then are rest_prob, label_prob, top_c and top_p written.
    Outputs (n,) float64, top_c (n, keep) int64 and top_p (n, keep) float64, pre-filled by the caller with
    NaN / -1 / 0 and left so for a sample never seen. status (3,) int64: error code, sample, value.
    """
    E, n, k = lg.shape
    L = E * k
    bits = 1
    while (1 << bits) < 2 * L:
        bits += 1
    H = 1 << bits
    mask = H - 1
    stamp = np.full(H, -1, np.int64)  # the table's slot belongs to sample `stamp` (no clearing between samples)
    slot_cls = np.empty(H, np.int64)
    slot_g = np.empty(H, np.int64)
    gcls = np.empty(L, np.int64)  # per group (class of the sample): its class, summed distance, last epoch
    gx = np.empty(L, np.float64)
    glast = np.empty(L, np.int64)
    cbuf = np.empty(k, np.int64)  # one epoch's entries
    dbuf = np.empty(k, np.float64)
    keep = top_c.shape[1]
    best = np.empty(max(keep, 1), np.int64)
    for i in range(n):
        n_seen = 0
        ng = 0
        for e in range(E):
            ok = True  # seen: all k classes set and all k logits finite
            for j in range(k):
                c = np.int64(ix[e, i, j])
                if c >= num_classes:
                    status[0], status[1], status[2] = CLASS_RANGE, i, c
                    return
                cbuf[j] = c
                dbuf[j] = _widen(lg[e, i, j], half)
                ok &= c >= 0 and np.isfinite(dbuf[j])
            if not ok:
                continue
            n_seen += 1
            r = _widen(rest[e, i], half) if use_rest else 0.0
            if not np.isfinite(r):
                status[0], status[1], status[2] = REST_NOT_FINITE, i, e
                return
            for j in range(k):
                c = cbuf[j]
                d = dbuf[j] - r  # the logit above its epoch's rest mean
                h = _slot(c, mask)
                while True:
                    if stamp[h] != i:  # a free slot: the class's first entry
                        stamp[h] = i
                        slot_cls[h] = c
                        slot_g[h] = ng
                        gcls[ng] = c
                        gx[ng] = d
                        glast[ng] = e
                        ng += 1
                        break
                    if slot_cls[h] == c:
                        g = slot_g[h]
                        if glast[g] == e:
                            status[0], status[1], status[2] = REPEATED_CLASS, i, c
                            return
                        glast[g] = e
                        gx[g] += d
                        break
                    h = (h + 1) & mask
        if n_seen == 0:
            continue
        # Relative to the tail (every class never in a seen top k, at 0), x_c = summed distance / seen epochs.
        tail = num_classes - ng
        m = -np.inf
        for g in range(ng):
            gx[g] /= n_seen
            m = max(m, gx[g])
        if tail > 0:
            m = max(m, 0.0)
        at = tail * np.exp(-m)
        z = at
        s = -at * m
        for g in range(ng):
            xm = gx[g] - m
            a = np.exp(xm)
            z += a
            s += a * xm
        entropy[i] = np.log(z) - s / z  # -sum p log p with p = a / z, a = exp(x - m)
        if not with_labels:
            continue
        rp = np.exp(-m) / z if tail > 0 else 0.0
        rest_prob[i] = rp
        lab = labels[i]
        lp = rp
        h = _slot(lab, mask)
        while stamp[h] == i:
            if slot_cls[h] == lab:
                lp = np.exp(gx[slot_g[h]] - m) / z
                break
            h = (h + 1) & mask
        label_prob[i] = lp
        # The keep most probable classes: by descending x, ties to the lower class (insertion into a short list).
        nb = 0
        for g in range(ng):
            x = gx[g]
            c = gcls[g]
            p = nb
            while p > 0:
                q = best[p - 1]
                if gx[q] > x or (gx[q] == x and gcls[q] < c):
                    break
                p -= 1
            if p >= keep:
                continue
            if nb < keep:
                nb += 1
            for t in range(nb - 1, p, -1):
                best[t] = best[t - 1]
            best[p] = g
        for t in range(nb):
            top_c[i, t] = gcls[best[t]]
            top_p[i, t] = np.exp(gx[best[t]] - m) / z
