"""utils/dynamics/scores.py against literal per-sample loops of each definition, on random records with unseen epochs."""
import math

import numpy as np
import pytest

from utils.pruning import keep_top_per_identity
from utils.dynamics.soft_labels import soft_label_entropy
from utils.dynamics.scores import aum_scores, el2n_scores, forgetting_scores, least_confidence_scores, margin_scores
from utils.selection.keep import ccs_keep


def records(seed, E=6, N=40, C=9, k=3, dtype=np.float32):
    """Top-k records of random full logit vectors, as training writes them; some epochs unseen, sample 1 never.

    Returns (topk_logits, topk_index, rest_mean_logit, label_logit, labels, full logits (E, N, C))."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, N)
    full = rng.normal(0, 3, (E, N, C))
    full[:, np.arange(N), labels] += rng.uniform(0, 6, N)  # the label tends to win, more for some samples
    full = full.astype(dtype).astype(np.float64)
    idx = np.argsort(-full, axis=2, kind="stable")[..., :k]
    top = np.take_along_axis(full, idx, 2)
    rest = (full.sum(2) - top.sum(2)) / (C - k) if C > k else np.full((E, N), np.nan)
    label_logit = full[:, np.arange(N), labels]
    unseen = rng.random((E, N)) < 0.15
    unseen[:, 1] = True
    top, idx, rest, label_logit = top.astype(dtype), idx.astype(np.int32), rest.astype(dtype), label_logit.astype(dtype)
    top[unseen], idx[unseen], rest[unseen], label_logit[unseen] = np.nan, -1, np.nan, np.nan
    return top, idx, rest, label_logit, labels, full


def approx_logits(top, idx, rest, C, label=None, label_logit=None):
    """The full logit vector the module approximates: top k, the rest mean elsewhere (exact label if given)."""
    k = len(top)
    z = np.full(C, float(rest) if C > k else np.nan)
    for j in range(k):
        z[idx[j]] = float(top[j])
    if label_logit is not None and label not in idx.tolist():
        z[label] = float(label_logit)
        others = [c for c in range(C) if c not in idx.tolist() and c != label]
        if others:
            z[others] = ((C - k) * float(rest) - float(label_logit)) / len(others)
    return z


def softmax(z):
    p = np.exp(z - z.max())
    return p / p.sum()


def mean_or_nan(values):
    return sum(values) / len(values) if values else math.nan


# ============================================================================ EL2N
def el2n_loop(top, idx, rest, labels, C, epoch, label_logit=None):
    E, N, k = idx.shape
    rows = E if epoch == -1 else epoch
    out = []
    for i in range(N):
        vals = []
        for e in range(rows):
            if idx[e, i, 0] < 0:
                continue
            z = approx_logits(top[e, i], idx[e, i], rest[e, i], C, labels[i],
                              None if label_logit is None else label_logit[e, i])
            target = np.zeros(C)
            target[labels[i]] = 1.0
            vals.append(float(np.linalg.norm(softmax(z) - target)))
        out.append(mean_or_nan(vals))
    return np.array(out)


@pytest.mark.parametrize("k, use_label_logit, epoch", [(3, False, -1), (3, True, 4), (1, True, -1), (8, True, 2)])
def test_el2n_matches_the_literal_definition(k, use_label_logit, epoch):
    top, idx, rest, ll, labels, _ = records(1, k=k)
    C = 9
    got = el2n_scores(top, idx, rest, labels, C, epoch, label_logit=ll if use_label_logit else None)
    want = el2n_loop(top, idx, rest, labels, C, epoch, ll if use_label_logit else None)
    assert got.dtype == np.float64 and got.shape == (40,)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
    assert np.isnan(got[1])


def test_el2n_is_exact_when_k_is_num_classes_and_reads_float16_memory_maps(tmp_path):
    top, idx, rest, _, labels, full = records(2, C=5, k=5, dtype=np.float16)
    got = el2n_scores(top, idx, rest, labels, 5, -1)
    for i in [0, 2, 3]:
        seen = [e for e in range(6) if idx[e, i, 0] >= 0]
        exact = [np.linalg.norm(softmax(full[e, i]) - np.eye(5)[labels[i]]) for e in seen]
        assert got[i] == pytest.approx(np.mean(exact), rel=1e-5)
    for name, arr in (("lg", top), ("ix", idx), ("rest", rest)):
        np.save(tmp_path / f"{name}.npy", arr)
    mm = [np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("lg", "ix", "rest")]
    np.testing.assert_array_equal(el2n_scores(*mm, labels, 5, -1), got)


def test_el2n_of_a_confident_sample_keeps_precision():
    # p_y = 1 - 1e-9: 1 - p_y must come from the other classes, not from 1 - p_y in float32
    top = np.array([[[30.0, 9.3]]], np.float32)
    idx = np.array([[[0, 1]]], np.int32)
    rest = np.array([[0.0]], np.float32)
    z = approx_logits(top[0, 0], idx[0, 0], rest[0, 0], 4)
    want = np.linalg.norm(softmax(z) - np.eye(4)[0])
    assert el2n_scores(top, idx, rest, np.array([0]), 4, 1)[0] == pytest.approx(want, rel=1e-5)


# ============================================================================ forgetting
def forgetting_loop(idx, labels):
    E, N, _ = idx.shape
    out = []
    for i in range(N):
        seen = [e for e in range(E) if idx[e, i, 0] >= 0]
        correct = [bool(idx[e, i, 0] == labels[i]) for e in seen]
        if not seen:
            out.append(math.nan)
        elif not any(correct):
            out.append(E + 1)
        else:
            out.append(sum(1 for a, b in zip(correct, correct[1:]) if a and not b))
    return np.array(out, dtype=float)


def test_forgetting_matches_the_literal_definition():
    for seed in range(3):
        _, idx, _, _, labels, _ = records(seed, E=12, N=200)
        np.testing.assert_array_equal(forgetting_scores(idx, labels, 9), forgetting_loop(idx, labels))


def test_forgetting_skips_unseen_epochs_and_ranks_never_learned_highest():
    top1 = np.array([[1, 0, 1, 0, 0],     # correct, wrong, correct, wrong, wrong: 2 events
                     [0, -1, 1, 0, 0],    # wrong, (unseen), correct, wrong, wrong: 1 event
                     [1, -1, 0, -1, 1],   # correct, (unseen), wrong, (unseen), correct: 1 event across the gap
                     [1, 1, -1, 1, 1],    # always correct: 0
                     [0, 2, 0, -1, 2],    # never correct: E + 1
                     [-1, -1, -1, -1, -1]]).T  # never seen: NaN
    idx = np.stack([top1, np.where(top1 >= 0, 3, -1)], axis=2).astype(np.int32)  # (E=5, N=6, k=2)
    got = forgetting_scores(idx, np.ones(6, int), 4)
    np.testing.assert_array_equal(got, [2, 1, 1, 0, 6, np.nan])


# ============================================================================ AUM
def aum_loop(top, idx, rest, label_logit, labels):
    E, N, k = idx.shape
    out = []
    for i in range(N):
        margins = []
        for e in range(E):
            if idx[e, i, 0] < 0:
                continue
            others = [float(top[e, i, j]) for j in range(k) if idx[e, i, j] != labels[i]]
            largest_other = max(others) if others else float(rest[e, i])
            margins.append(float(label_logit[e, i]) - largest_other)
        out.append(mean_or_nan(margins))
    return np.array(out)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aum_is_minus_the_literal_area_under_the_margin(k):
    top, idx, rest, ll, labels, _ = records(3, k=k)
    got = aum_scores(top, idx, rest, ll, labels, 9)
    np.testing.assert_allclose(got, -aum_loop(top, idx, rest, ll, labels), rtol=1e-6, atol=1e-5)
    assert np.isnan(got[1])


# ============================================================================ margin and least confidence
@pytest.mark.parametrize("k, epoch", [(3, -1), (1, 2), (9, 5)])
def test_margin_and_least_confidence_match_the_literal_definitions(k, epoch):
    top, idx, rest, _, labels, _ = records(4, k=k)
    row = 5 if epoch == -1 else epoch - 1
    margin = margin_scores(top, idx, rest, 9, epoch)
    lc = least_confidence_scores(top, idx, rest, 9, epoch)
    for i in range(40):
        if idx[row, i, 0] < 0:
            assert np.isnan(margin[i]) and np.isnan(lc[i])
            continue
        p = np.sort(softmax(approx_logits(top[row, i], idx[row, i], rest[row, i], 9)))[::-1]
        assert margin[i] == pytest.approx(-(p[0] - p[1]), abs=1e-12)
        assert lc[i] == pytest.approx(1 - p[0], rel=1e-9, abs=1e-15)


# ============================================================================ validation
def test_errors_say_what_is_wrong():
    top, idx, rest, ll, labels, _ = records(5)
    with pytest.raises(ValueError, match="shapes differ"):
        el2n_scores(top[:, :, :2], idx, rest, labels, 9, 1)
    with pytest.raises(ValueError, match="label out of range"):
        el2n_scores(top, idx, rest, np.where(labels == labels[0], 9, labels), 9, 1)
    with pytest.raises(ValueError, match="beyond the recorded epochs 1..6"):
        el2n_scores(top, idx, rest, labels, 9, 7)
    with pytest.raises(ValueError, match="beyond the recorded epochs"):
        margin_scores(top, idx, rest, 9, 0)
    with pytest.raises(ValueError, match="empty input"):
        forgetting_scores(idx[:, :, :0], labels, 9)
    with pytest.raises(ValueError, match="rest_mean_logit must have shape"):
        aum_scores(top, idx, rest[:, :3], ll, labels, 9)
    with pytest.raises(ValueError, match="label_logit must have shape"):
        aum_scores(top, idx, rest, ll.T, labels, 9)
    with pytest.raises(ValueError, match=r"must be in \[0, 9\)"):
        forgetting_scores(np.where(idx >= 0, idx + 1, idx), labels, 9)
    bad = idx.copy()
    bad[0, 0, 1] = -1  # a partly -1 record
    with pytest.raises(ValueError, match="-1 in every slot"):
        forgetting_scores(bad, labels, 9)
    nan_seen = top.copy()
    nan_seen[np.nonzero(idx[..., 0] >= 0)[0][0], np.nonzero(idx[..., 0] >= 0)[1][0]] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        el2n_scores(nan_seen, idx, rest, labels, 9, -1)
    with pytest.raises(ValueError, match="num_classes"):
        least_confidence_scores(top, idx, rest, 2)
    with pytest.raises(ValueError, match="integers"):
        forgetting_scores(idx.astype(float), labels, 9)


# ============================================================================ CCS
def ccs_loop(scores, labels, fraction, min_k, beta, S, seed, excluded=None):
    """Algorithm 1 of Zheng et al. 2023 per identity, literally, with the random order of ccs_keep."""
    n = len(labels)
    random_rank = np.random.default_rng(seed).permutation(n)
    ex = set() if excluded is None else set(np.flatnonzero(excluded).tolist())
    kept = []
    for ident in sorted(set(labels.tolist())):
        members = [i for i in range(n) if labels[i] == ident and i not in ex]
        if not members:
            continue
        size = len(members)
        k = int(size * fraction)
        if k < min_k:
            k = min(size, min_k)
        hardest_first = sorted(members, key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i])
                                                       else 0.0, i))
        remain = hardest_first[min(int(size * beta), size - k):]
        finite = [scores[i] for i in remain if not math.isnan(scores[i])]
        lo, hi = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        strata = [[] for _ in range(S)]
        for i in remain:
            s = scores[i]
            b = 0 if math.isnan(s) or hi == lo else min(S - 1, max(0, math.floor((s - lo) / (hi - lo) * S)))
            strata[b].append(i)
        budget = k
        visit = sorted(range(S), key=lambda b: (len(strata[b]), b))
        for j, b in enumerate(visit):
            take = min(len(strata[b]), budget // (S - j))
            budget -= take
            kept += sorted(strata[b], key=lambda i: random_rank[i])[:take]
    return np.array(sorted(kept), dtype=np.int64)


def ccs_case(seed, n_ids=30):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, n_ids)
    labels = np.repeat(rng.permutation(1000)[:n_ids] * 7, sizes)[rng.permutation(sizes.sum())]
    scores = np.round(rng.gamma(2, 1, labels.size), 1)  # ties, skew: some strata empty, some crowded
    scores[rng.random(labels.size) < 0.05] = np.nan
    return scores, labels


@pytest.mark.parametrize("seed, fraction, beta, S", [(0, 0.5, 0.1, 50), (1, 0.3, 0.2, 5), (2, 0.8, 0.0, 3),
                                                      (3, 0.1, 0.5, 1), (4, 0.25, 0.1, 10)])
def test_ccs_equals_the_literal_algorithm(seed, fraction, beta, S):
    scores, labels = ccs_case(seed)
    got = ccs_keep(scores, labels, fraction, 5, beta, S, seed=seed)
    np.testing.assert_array_equal(got, ccs_loop(scores, labels, fraction, 5, beta, S, seed))
    assert got.dtype == np.int64
    # every identity keeps exactly the quota keep_top_per_identity gives
    same_quota = keep_top_per_identity(np.zeros(labels.size), labels, fraction, 5)
    np.testing.assert_array_equal(np.unique(labels[got], return_counts=True)[1],
                                  np.unique(labels[same_quota], return_counts=True)[1])


def test_ccs_with_excluded_samples_and_its_invariants():
    scores, labels = ccs_case(7, n_ids=50)
    excluded = np.random.default_rng(1).random(labels.size) < 0.1
    got = ccs_keep(scores, labels, 0.4, 5, 0.1, 8, seed=3, excluded=excluded)
    np.testing.assert_array_equal(got, ccs_loop(scores, labels, 0.4, 5, 0.1, 8, 3, excluded))
    assert not excluded[got].any()
    # where an identity has enough samples, none of its hardest floor(beta * n) is kept
    for ident in np.unique(labels):
        members = np.flatnonzero((labels == ident) & ~excluded)
        if members.size >= 20:
            finite = members[np.isfinite(scores[members])]
            hardest = finite[np.argsort(-scores[finite], kind="stable")][:int(members.size * 0.1)]
            assert not np.isin(hardest, got).any()
    assert ccs_keep(scores, labels, 0.4, seed=3).tolist() == ccs_keep(scores, labels, 0.4, seed=3).tolist()


def test_ccs_errors():
    scores, labels = ccs_case(0)
    with pytest.raises(ValueError, match="finite or NaN"):
        ccs_keep(np.where(np.arange(labels.size) == 3, np.inf, scores), labels, 0.5)
    with pytest.raises(ValueError, match="beta"):
        ccs_keep(scores, labels, 0.5, beta=1.0)
    with pytest.raises(ValueError, match="strata"):
        ccs_keep(scores, labels, 0.5, strata=0)
    with pytest.raises(ValueError, match="differ in length"):
        ccs_keep(scores[:-1], labels, 0.5)


# ============================================================================ soft-label entropy
def entropy_loop(top, idx, rest, C):
    """The soft label of "Data Pruning Can Do More", literally: mean over seen epochs of the approximated
    logit vector, then the entropy of its softmax. tests/test_pruning.py held the implementation before
    the block rewrite to this definition at rel 1e-9 (all epochs seen), so agreement here, unseen epochs
    included, bounds the change far below 1e-6."""
    E, N, k = idx.shape
    out = []
    for i in range(N):
        seen = [e for e in range(E) if (idx[e, i] >= 0).all() and np.isfinite(top[e, i]).all()]
        if not seen:
            out.append(math.nan)
            continue
        z = np.mean([approx_logits(top[e, i], idx[e, i], rest[e, i] if C > k else 0.0, C) for e in seen], axis=0)
        p = softmax(z)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)


@pytest.mark.parametrize("k, C, dtype", [(3, 9, np.float32), (1, 9, np.float16), (9, 9, np.float32),
                                         (4, 300, np.float32)])
def test_soft_label_entropy_matches_the_literal_definition(k, C, dtype):
    top, idx, rest, _, _, _ = records(6, E=7, N=300 if C < 300 else 60, C=C, k=k, dtype=dtype)
    got = soft_label_entropy(top, idx, rest, C)
    np.testing.assert_allclose(got, entropy_loop(top, idx, rest, C), rtol=1e-9, atol=1e-9)
