"""The compiled soft-label kernel (utils/dynamics/soft_kernel.py) against a plain dictionary reference, where its hash
table probes (many classes, classes equal in their low bits) and on every float16 bit pattern."""
import math

import numpy as np
import pytest

from utils.cleaning import probabilities


def test_float16_records_give_the_soft_labels_of_their_exact_values_for_every_bit_pattern():
    """Float16 records go to the kernel as their bits; each of the 65,536 patterns, as a sample's logit, gives
    exactly what the same value as float64 gives (inf and NaN: an epoch not seen)."""
    lg = np.arange(1 << 16, dtype=np.uint16).view(np.float16).reshape(1, -1, 1)
    ix = np.zeros(lg.shape, np.int32)
    rest = np.full(lg.shape[:2], -1.5, np.float16)
    labels = np.zeros(lg.shape[1], np.int64)
    half = probabilities.trajectory_soft_labels(lg, ix, rest, labels, 3)
    wide = probabilities.trajectory_soft_labels(lg.astype(np.float64), ix, rest.astype(np.float64), labels, 3)
    for name in ("entropy", "label_prob", "rest_prob", "probs", "classes"):
        np.testing.assert_array_equal(getattr(half, name), getattr(wide, name), err_msg=name)
    assert np.isnan(half.entropy).sum() == 2 * 1024  # exponent 31: the two infinities and 2,046 NaNs
    assert np.isfinite(half.entropy).sum() == (1 << 16) - 2048


def reference(lg, ix, rest, labels, C, keep):
    """Per sample, literally: a dict class -> summed (logit - rest mean) over the seen epochs, / seen epochs;
    every other class at 0; softmax over all C classes in closed form."""
    E, N, k = ix.shape
    out = []
    for i in range(N):
        seen = [e for e in range(E) if (ix[e, i] >= 0).all() and np.isfinite(lg[e, i]).all()]
        if not seen:
            out.append(None)
            continue
        x = {}
        for e in seen:
            for j in range(k):
                c = int(ix[e, i, j])
                x[c] = x.get(c, 0.0) + float(lg[e, i, j]) - (float(rest[e, i]) if k < C else 0.0)
        x = {c: v / len(seen) for c, v in x.items()}
        tail = C - len(x)
        m = max(max(x.values()), 0.0 if tail else -math.inf)
        z = sum(math.exp(v - m) for v in x.values()) + tail * math.exp(-m)
        p = {c: math.exp(v - m) / z for c, v in x.items()}
        rest_p = math.exp(-m) / z if tail else 0.0
        ent = -sum(q * math.log(q) for q in p.values() if q > 0) - (tail * rest_p * math.log(rest_p) if tail else 0)
        top = sorted(x, key=lambda c: (-x[c], c))[:keep]
        out.append((ent, p.get(int(labels[i]), rest_p), rest_p, top, [p[c] for c in top]))
    return out


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_kernel_equals_the_dictionary_reference_with_probing_and_huge_class_ids(dtype):
    rng = np.random.default_rng(3)
    E, N, k, C, keep = 6, 200, 5, 1 << 30, 4
    pool = np.unique(np.concatenate([np.arange(8) << 22, rng.integers(0, C, 12)]))  # equal low bits: probing
    ix = np.stack([[rng.choice(pool, k, replace=False) for _ in range(N)] for _ in range(E)])
    lg = (rng.normal(size=(E, N, k)) * 2 + 3).astype(dtype)
    rest = rng.normal(size=(E, N)).astype(dtype)
    ix[1, 7], lg[4, 9, 2], lg[:, 11] = -1, np.nan, np.nan  # sample 7, 9 partly seen, 11 never
    labels = np.where(rng.random(N) < 0.5, ix[0, :, 0], rng.integers(0, C, N))
    soft = probabilities.trajectory_soft_labels(lg, ix, rest, labels, C, keep=keep)
    for i, want in enumerate(reference(lg, ix, rest, labels, C, keep)):
        if want is None:
            assert i == 11 and np.isnan([soft.entropy[i], soft.label_prob[i], soft.rest_prob[i]]).all()
            assert soft.classes[i].tolist() == [-1] * keep
            continue
        ent, label_p, rest_p, top, top_p = want
        assert soft.entropy[i] == pytest.approx(ent, rel=1e-12)
        assert soft.label_prob[i] == pytest.approx(label_p, rel=1e-12)
        assert soft.rest_prob[i] == pytest.approx(rest_p, rel=1e-12)
        assert soft.classes[i].tolist() == top
        np.testing.assert_allclose(soft.probs[i], top_p, rtol=1e-12)


def test_fewer_classes_than_kept_pad_with_minus_one_and_zero():
    ix = np.array([[[3, 1]], [[1, 3]]], dtype=np.int64)  # one sample: classes 1 and 3 of 5
    lg = np.array([[[2.0, 1.0]], [[2.0, 1.0]]])
    soft = probabilities.trajectory_soft_labels(lg, ix, np.zeros((2, 1)), np.array([4]), 5, keep=4)
    assert soft.classes.tolist() == [[1, 3, -1, -1]]  # tied at 1.5 above the rest: the lower class first
    assert soft.probs[0, 2:].tolist() == [0.0, 0.0]
    assert soft.label_prob[0] == soft.rest_prob[0]
    np.testing.assert_allclose(soft.probs.sum() + 3 * soft.rest_prob[0], 1.0)
