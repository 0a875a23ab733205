"""utils.pruning (utils/selection/diffprob.py, keep.py, utils/dynamics/dynunc.py) against literal per-identity reference loops (the paper's rules as pseudocode), plus its errors.

The references below are written as plainly as possible, one Python loop per identity. They are the
specification the vectorised code is checked against.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from utils import arrays
from utils.pruning import (diffprob, diffprob_for_fraction, diffprob_loop, diffprob_threshold_for_fraction, dynunc_scores,
                           format_summary, identity_index, keep_top_per_identity, label_map_for,
                           per_identity_counts, random_keep, selection_summary)
from utils.selection import diffprob as diffprob_module
from utils.dynamics.soft_labels import soft_label_entropy


# ============================================================================ references
def ref_identities(labels, excluded=()):
    """Each identity's non-excluded sample indices, one plain list per identity (empty ones skipped)."""
    excluded = set(int(i) for i in np.asarray(excluded, dtype=np.int64).ravel())
    for lab in sorted(set(int(x) for x in labels)):
        mine = [i for i in range(len(labels)) if labels[i] == lab and i not in excluded]
        if mine:
            yield mine


def ref_diffprob(prob, labels, t, min_samples=5, excluded=()):
    """The rule's pseudocode, one plain loop per identity: the library's `diffprob_loop` (pinned by the case worked
    by hand below), in this file's calling convention."""
    return diffprob_loop(prob, labels, t, min_samples, excluded=None if len(excluded) == 0 else excluded)


def ref_k(n, fraction, min_samples):
    k = int(n * fraction)
    if k < min_samples:
        k = min_samples if n > min_samples else n
    return k


def ref_keep_top(scores, labels, fraction, min_samples=5, excluded=()):
    kept = []
    for mine in ref_identities(labels, excluded):
        # highest score first, NaN lowest, ties by lower index
        mine.sort(key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0.0, i))
        kept += mine[:ref_k(len(mine), fraction, min_samples)]
    return np.array(sorted(kept), dtype=np.int64)


def ref_dynunc(history, window):
    E, N = history.shape
    out = np.full(N, np.nan)
    for i in range(N):
        stds = []
        for end in range(window - 1, E - 1):  # windows end at epochs J-1 .. E-2
            v = [float(x) for x in history[end - window + 1:end + 1, i] if not math.isnan(x)]
            if len(v) >= 2:
                m = sum(v) / len(v)
                stds.append(math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)))
        if stds:
            out[i] = sum(stds) / len(stds)
    return out


def entropy_of_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ============================================================================ data
def make_case(seed, n_ids=None, quantum=None):
    """Random identities of 1 .. MIN+3 samples (and some larger), non-contiguous labels, tied probabilities."""
    rng = np.random.default_rng(seed)
    n_ids = n_ids or int(rng.integers(1, 9))
    sizes = rng.integers(1, 9, n_ids)
    sizes[rng.random(n_ids) < 0.25] += rng.integers(5, 25)
    labels = np.repeat(rng.choice(10_000, n_ids, replace=False) * 7 + 3, sizes)
    labels = labels[rng.permutation(labels.size)]
    quantum = quantum or [10, 100, 20, 3, 1e6][seed % 5]
    prob = np.round(rng.random(labels.size) * quantum) / quantum  # ties, and decimals that float rounding bites
    return prob, labels, rng


THRESHOLDS = [0.0, 1e-12, 0.01, 0.05, 0.1, 0.2, 0.3, 0.7, 1.0, 3.0, 1e9, math.inf]


# ============================================================================ DiffProb
@pytest.mark.parametrize("seed", range(40))
def test_diffprob_matches_reference(seed):
    prob, labels, rng = make_case(seed)
    excluded = rng.choice(labels.size, int(rng.integers(0, labels.size // 3 + 1)), replace=False)
    for t in THRESHOLDS:
        for min_k in (0, 1, 3, 5):
            ex = excluded if seed % 2 else None
            got = diffprob(prob, labels, t, min_k, excluded=ex)
            want = ref_diffprob(prob, labels, t, min_k, excluded=() if ex is None else ex)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed} t {t} MIN {min_k}")


def test_the_readable_loop_on_a_case_worked_by_hand():
    # one identity, probabilities 0.9 0.85 0.6 0.58 0.3 0.1 (indices 0..5), t = 0.1, MIN 3: keep 0.9; 0.85 is
    # within 0.1 of it; 0.6 is not (0.3 > 0.1): keep; 0.58 within; 0.3 keep; 0.1 keep -> 4 kept >= 3
    prob, labels = np.array([0.9, 0.85, 0.6, 0.58, 0.3, 0.1]), np.zeros(6, dtype=np.int64)
    assert diffprob_loop(prob, labels, 0.1, 3).tolist() == [0, 2, 4, 5]
    # MIN 5: round r=0 keeps 4; r=-0.01 keeps (0.9-0.85=0.05 > 0.099? no) the same 4; ... until (1+r)*0.1 < 0.02
    # lets 0.58 in (0.6-0.58=0.02 > (1+r)*0.1 at r=-0.81): five kept, 0.85 still out (0.05 needs r < -0.5 first:
    # at r=-0.51, (1+r)*0.1=0.049 < 0.05, so 0.85 is kept before 0.58): [0, 1, 2, 4, 5]
    assert diffprob_loop(prob, labels, 0.1, 5).tolist() == [0, 1, 2, 4, 5]
    assert diffprob(prob, labels, 0.1, 5).tolist() == [0, 1, 2, 4, 5]


def test_diffprob_float_rounding_is_the_references():
    # 0.3 - 0.1 = 0.19999999999999998 in floats: with t = 0.2 the lower sample is pruned, as in Python.
    labels = np.zeros(2, dtype=np.int64)
    assert diffprob(np.array([0.1, 0.3]), labels, 0.2, 1).tolist() == [1]
    assert diffprob(np.array([0.1, 0.30000000000000004]), labels, 0.2, 1).tolist() == [0, 1]
    # relaxation thresholds are (1 + r) * t with r accumulated by repeated subtraction of 0.01
    prob = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    for t in (0.1, 0.11, 0.15, 0.101, 0.35):
        np.testing.assert_array_equal(diffprob(prob, np.zeros(7, int), t, 5), ref_diffprob(prob, np.zeros(7), t, 5))


def test_diffprob_ties_keep_index_order_and_small_identities_whole():
    prob = np.array([0.5, 0.5, 0.5, 0.9, 0.1, 0.25])
    labels = np.array([4, 4, 4, 4, 9, 9])
    # identity 4: ascending order is [0, 1, 2, 3]; the scan keeps 3, then the first tie met from the top (2)
    assert diffprob(prob, labels, 0.1, 1).tolist() == [2, 3, 4, 5]
    # identities with <= MIN samples are kept whole whatever the threshold
    assert diffprob(prob, labels, 5.0, 4).tolist() == [0, 1, 2, 3, 4, 5]


def test_diffprob_zero_threshold_with_few_distinct_values_terminates_and_keeps_all():
    prob = np.array([0.2] * 4 + [0.7] * 4)  # 8 samples, 2 distinct values, MIN 5
    assert diffprob(prob, np.zeros(8, int), 0.0, 5).tolist() == list(range(8))
    assert diffprob(prob, np.zeros(8, int), 1e-300, 5).tolist() == list(range(8))  # the t -> 0+ limit agrees


def test_diffprob_excluded_forms_and_vanishing_identities():
    prob = np.array([0.1, 0.2, 0.3, 0.4, np.nan, 0.6])
    labels = np.array([1, 1, 1, 2, 2, 3])
    mask = np.array([False, False, False, True, True, False])
    a = diffprob(prob, labels, 0.05, 1, excluded=mask)
    b = diffprob(prob, labels, 0.05, 1, excluded=np.array([3, 4]))
    c = diffprob(prob, labels, 0.05, 1, excluded=[3, 4])
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert 3 not in a and 4 not in a  # identity 2 vanished (NaN allowed on excluded samples)
    assert diffprob(prob, labels, 0.05, 1, excluded=np.ones(6, bool)).size == 0


def test_diffprob_output_contract_on_a_larger_case():
    prob, labels, _ = make_case(7, n_ids=300, quantum=1e4)
    kept = diffprob(prob, labels, 0.05, 5)
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
    ids, counts = per_identity_counts(labels)
    kids, kcounts = per_identity_counts(labels[kept])
    np.testing.assert_array_equal(kids, ids)  # no identity vanishes without exclusion
    np.testing.assert_array_less(np.minimum(counts, 5) - 1, kcounts)  # >= min(n, MIN) per identity
    np.testing.assert_array_equal(kept, ref_diffprob(prob, labels, 0.05, 5))


def test_diffprob_hypothesis():
    hyp = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hyp.settings(max_examples=150, deadline=None)
    @hyp.given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 12)), min_size=1, max_size=40),
               st.sampled_from([0.0, 0.05, 0.1, 0.25, 1 / 3, 0.5, 2.0]), st.integers(0, 6))
    def check(rows, t, min_k):
        labels = np.array([r[0] * 11 for r in rows])
        prob = np.array([r[1] / 12 for r in rows])
        np.testing.assert_array_equal(diffprob(prob, labels, t, min_k), ref_diffprob(prob, labels, t, min_k))

    check()


# ---------------------------------------------------------------------------- threshold for a fraction
def _relax_factors():
    out, r = [], 0.0
    while 1 + r > 0:
        out.append(1 + r)
        r = r - 0.01
    return out


def achievable_counts(prob, labels, min_k, excluded=None):
    """Brute force over the search range [0, largest probability range of an identity]: the kept count at
    every threshold where it can change (pairwise gaps / (1 + r_k), +- one ulp)."""
    ex = np.zeros(labels.size, bool) if excluded is None else arrays.excluded_mask(excluded, labels.size)
    gaps = {0.0}
    top = 0.0
    for lab in np.unique(labels[~ex]):
        s = np.sort(prob[(labels == lab) & ~ex])
        d = s[:, None] - s[None, :]
        gaps.update(d[d > 0].tolist())
        if s.size > min_k:
            top = max(top, float(s[-1] - s[0]))
    factors = _relax_factors() if min_k > 1 else [1.0]
    cands = {top}
    for g in gaps:
        for f in factors:
            t = g / f
            for x in (t, np.nextafter(t, np.inf), np.nextafter(t, 0.0)):
                if x <= top:
                    cands.add(float(x))
    return {t: diffprob(prob, labels, t, min_k, excluded=excluded).size for t in sorted(cands)}


@pytest.mark.parametrize("seed", range(12))
def test_threshold_search_is_the_closest_achievable(seed):
    rng = np.random.default_rng(100 + seed)
    sizes = rng.integers(1, 10, int(rng.integers(2, 6)))
    labels = np.repeat(rng.choice(1000, sizes.size, replace=False), sizes)
    prob = np.round(rng.random(labels.size) * [10, 100, 1e6][seed % 3]) / 100
    excluded = rng.choice(labels.size, 2, replace=False) if seed % 4 == 0 and labels.size > 4 else None
    # MIN 3 (relaxation) multiplies the candidate thresholds by ~100 rounds: only on the tied cases
    for min_k in (1, 3) if seed % 3 != 2 else (1,):
        counts = achievable_counts(prob, labels, min_k, excluded)
        seg = diffprob_module._prepare_diffprob(prob, labels, excluded)
        lens = seg.ends - seg.starts
        top = float(max((seg.s[e - 1] - seg.s[s] for s, e in zip(seg.starts, seg.ends)), default=0.0))
        k_top = diffprob(prob, labels, top, min_k, excluded=excluded).size
        for f in (0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0):
            target = f * labels.size  # the fraction is of ALL samples, excluded ones included
            t = diffprob_threshold_for_fraction(prob, labels, f, min_k, excluded=excluded)
            got = diffprob(prob, labels, t, min_k, excluded=excluded).size
            best = min(abs(c - target) for c in counts.values())
            if min_k == 1 or target > k_top or lens.max() <= min_k:
                # K(t) is monotone here: the search must be exactly the closest
                assert abs(got - target) <= best + 1e-9, (seed, min_k, f, got, target, best)
            # never worse than the neighbouring thresholds
            for nb in (np.nextafter(t, 0.0), np.nextafter(t, np.inf)):
                assert abs(got - target) <= abs(diffprob(prob, labels, nb, min_k, excluded=excluded).size
                                                - target) + 1e-9


def test_threshold_search_levels_agree_with_a_direct_search(monkeypatch):
    # On ~6k samples, force the random-subset levels and compare them with the single-level search (MIN 1:
    # K(t) monotone, so both must reach the same closest count).
    prob, labels, _ = make_case(3, n_ids=400, quantum=1e5)
    for f in (0.3, 0.6, 0.9):
        monkeypatch.setattr(diffprob_module, "_SEARCH_LEVELS", ())
        direct = diffprob(prob, labels, diffprob_threshold_for_fraction(prob, labels, f, 1), 1).size
        monkeypatch.setattr(diffprob_module, "_SEARCH_LEVELS", ((300, 1e-2, 0.05), (1500, 1e-3, 0.03)))
        kept, t = diffprob_for_fraction(prob, labels, f, 1)
        assert abs(kept.size - f * labels.size) == abs(direct - f * labels.size)
        np.testing.assert_array_equal(kept, diffprob(prob, labels, t, 1))


def test_threshold_search_at_the_ends_and_with_cleaning():
    prob, labels, rng = make_case(11, n_ids=200, quantum=1e6)
    assert diffprob_threshold_for_fraction(prob, labels, 1.0) == 0.0  # all distinct: t = 0 keeps everything
    t_small = diffprob_threshold_for_fraction(prob, labels, 0.01)  # below what MIN per identity allows
    assert diffprob(prob, labels, t_small).size <= diffprob(prob, labels, 0.02).size
    excluded = rng.random(labels.size) < 0.2
    kept, t = diffprob_for_fraction(prob, labels, 0.5, excluded=excluded)
    assert not excluded[kept].any()
    assert abs(kept.size - 0.5 * labels.size) <= 3  # half of ALL samples, not of the non-excluded ones
    with pytest.raises(ValueError, match="every sample is excluded"):
        diffprob_threshold_for_fraction(prob, labels, 0.5, excluded=np.ones(labels.size, bool))


# ============================================================================ keep k by score, Rand
@pytest.mark.parametrize("seed", range(25))
def test_keep_top_per_identity_matches_reference(seed):
    prob, labels, rng = make_case(seed)
    scores = np.round(rng.normal(size=labels.size), 1)  # ties
    scores[rng.random(labels.size) < 0.15] = np.nan
    excluded = rng.choice(labels.size, int(rng.integers(0, labels.size // 4 + 1)), replace=False)
    for fraction in (0.01, 0.25, 0.5, 0.7, 1.0):
        for min_k in (0, 1, 5):
            ex = excluded if seed % 2 else None
            got = keep_top_per_identity(scores, labels, fraction, min_k, excluded=ex)
            want = ref_keep_top(scores, labels, fraction, min_k, excluded=() if ex is None else ex)
            np.testing.assert_array_equal(got, want, err_msg=f"seed {seed} fraction {fraction} MIN {min_k}")


def test_keep_top_per_identity_order_and_nan():
    labels = np.array([5, 5, 5, 5, 5, 5, 5, 8])
    scores = np.array([0.3, np.nan, 0.9, 0.3, -np.inf, 0.9, 0.3, np.nan])
    assert keep_top_per_identity(scores, labels, 2 / 7, 1).tolist() == [2, 5, 7]  # n <= MIN (identity 8): all
    assert keep_top_per_identity(scores, labels, 3 / 7, 1).tolist() == [0, 2, 5, 7]  # tie: lower index first
    assert keep_top_per_identity(scores, labels, 6 / 7, 1).tolist() == [0, 2, 3, 4, 5, 6, 7]  # NaN below -inf


def test_random_keep_counts_determinism_and_uniformity():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(0, 4000, 2), 10)[rng.permutation(20_000)]
    a = random_keep(labels, 0.3, 2, seed=1)
    np.testing.assert_array_equal(a, random_keep(labels, 0.3, 2, seed=1))
    assert not np.array_equal(a, random_keep(labels, 0.3, 2, seed=2))
    _, kc = per_identity_counts(labels[a])
    assert (kc == 3).all()
    # Uniform: the rank of a kept sample within its identity (by sample index) is uniform over 0..9.
    identities, starts, order = identity_index(labels)
    rank = np.empty(labels.size, dtype=np.int64)
    rank[order] = np.arange(labels.size) - np.repeat(starts, 10)
    hits = np.bincount(rank[a], minlength=10)
    expected = a.size / 10
    chi2 = ((hits - expected) ** 2 / expected).sum()
    assert chi2 < 40, hits  # 9 dof: p ~ 5e-6
    # not the paper repository's "last samples" either
    assert hits[:3].sum() > 0.2 * a.size


def test_random_keep_small_identities_and_excluded():
    labels = np.array([1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3])
    kept = random_keep(labels, 0.5, 5, seed=3)
    _, kc = per_identity_counts(labels[kept])
    assert kc.tolist() == [3, 5, 1]  # n <= MIN: all; n > MIN: max(int(n f), MIN)
    ex = random_keep(labels, 0.5, 1, seed=3, excluded=[0, 1, 2])
    assert not np.isin(ex, [0, 1, 2]).any()
    # the draw is over all N samples, so excluding identity 1 does not change the others' choice
    np.testing.assert_array_equal(ex, random_keep(labels, 0.5, 1, seed=3)[np.isin(random_keep(labels, 0.5, 1, seed=3),
                                                                                   [0, 1, 2], invert=True)])


# ============================================================================ DynUnc
@pytest.mark.parametrize("seed", range(12))
def test_dynunc_matches_reference_with_nan(seed):
    rng = np.random.default_rng(seed)
    J = int(rng.integers(2, 6))
    E = J + 1 + int(rng.integers(0, 5))
    h = rng.random((E, 60))
    h[:, :8] = 0.999999 + 1e-10 * rng.random((E, 8))  # converged: tiny variance next to a large mean
    h[:, 8:14] = np.where(np.arange(E)[:, None] < E // 2, 0.05, 0.99 + 1e-9 * rng.random((E, 6)))
    h[:, 14] = 0.3
    h[rng.random(h.shape) < 0.25] = np.nan
    h[:, 15] = np.nan  # never seen
    h[:, 16] = np.nan
    h[::2, 16] = 0.5  # at most one value per window when J == 2
    got = dynunc_scores(h.astype(np.float32) if seed % 3 == 0 else h, J)
    want = ref_dynunc(h.astype(np.float32).astype(np.float64) if seed % 3 == 0 else h, J)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-6, atol=1e-12)


def test_dynunc_window_range_is_j_minus_1_to_e_minus_2():
    J, E = 3, 6  # windows end at epochs 2, 3, 4: epochs 0..4 used, epoch 5 never
    base = np.tile(np.array([[0.1], [0.5], [0.2], [0.9], [0.4], [0.6]]), (1, 3))
    last = base.copy()
    last[5] = [0.0, 1.0, 123.0]  # the last epoch must not matter
    np.testing.assert_array_equal(dynunc_scores(base, J), dynunc_scores(last, J))
    first = base.copy()
    first[0] += 0.3  # the first epoch must
    assert not np.allclose(dynunc_scores(base, J), dynunc_scores(first, J))
    col = base[:, 0]
    want = np.mean([np.std(col[e - J + 1:e + 1], ddof=1) for e in range(J - 1, E - 1)])
    np.testing.assert_allclose(dynunc_scores(base, J), want, rtol=1e-12)
    # exactly window + 1 epochs: one window (epochs 0..J-1)
    np.testing.assert_allclose(dynunc_scores(base[:J + 1], J), np.std(col[:J], ddof=1), rtol=1e-12)


def test_dynunc_errors():
    with pytest.raises(ValueError, match="window \\+ 1 = 11 epochs"):
        dynunc_scores(np.zeros((10, 4)), 10)
    with pytest.raises(ValueError, match="window must be >= 2"):
        dynunc_scores(np.zeros((10, 4)), 1)
    with pytest.raises(ValueError, match="shape"):
        dynunc_scores(np.zeros(10), 3)


# ============================================================================ soft-label entropy
def test_soft_label_entropy_exact_when_k_is_num_classes():
    rng = np.random.default_rng(0)
    E, N, C = 5, 40, 6
    full = rng.normal(0, 4, (E, N, C))
    idx = np.argsort(-full, axis=2)
    got = soft_label_entropy(np.take_along_axis(full, idx, 2), idx, np.full((E, N), np.nan), C)
    want = [entropy_of_softmax(full[:, i].mean(0)) for i in range(N)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # uniform soft label: log C
    np.testing.assert_allclose(soft_label_entropy(np.zeros((2, 1, C)), np.tile(np.arange(C), (2, 1, 1)),
                                                  np.zeros((2, 1)), C), [math.log(C)])


def test_soft_label_entropy_topk_approximation_matches_the_literal_definition():
    rng = np.random.default_rng(1)
    E, N, C, k = 4, 30, 9, 3
    full = rng.normal(0, 2, (E, N, C))
    full[..., 2] += 3  # a class that is usually in the top k
    idx = np.argsort(-full, axis=2)[..., :k]
    top = np.take_along_axis(full, idx, 2)
    rest = (full.sum(2) - top.sum(2)) / (C - k)
    got = soft_label_entropy(top.astype(np.float32), idx, rest.astype(np.float32), C)
    for i in range(N):
        union = set(idx[:, i].ravel().tolist())
        z = np.full(C, rest[:, i].astype(np.float32).astype(np.float64).mean())
        for c in union:
            vals = []
            for e in range(E):
                where = np.flatnonzero(idx[e, i] == c)
                vals.append(float(np.float32(top[e, i, where[0]])) if where.size else float(np.float32(rest[e, i])))
            z[c] = np.mean(vals)
        assert got[i] == pytest.approx(entropy_of_softmax(z), rel=1e-9, abs=1e-12)


def test_soft_label_entropy_errors():
    lg = np.zeros((2, 3, 2))
    ix = np.tile(np.array([0, 1]), (2, 3, 1))
    with pytest.raises(ValueError, match="repeats a class"):
        soft_label_entropy(lg, np.zeros((2, 3, 2), int), np.zeros((2, 3)), 5)
    with pytest.raises(ValueError, match="topk_index must be in"):
        soft_label_entropy(lg, ix + 4, np.zeros((2, 3)), 5)
    with pytest.raises(ValueError, match="rest_mean_logit must have shape"):
        soft_label_entropy(lg, ix, np.zeros((3, 2)), 5)
    with pytest.raises(ValueError, match="rest_mean_logit must be finite"):
        soft_label_entropy(lg, ix, np.full((2, 3), np.nan), 5)


# ============================================================================ helpers
def test_identity_index_label_map_and_summary():
    labels = np.array([30, 7, 30, 99, 7, 30])
    identities, starts, order = identity_index(labels)
    assert identities.tolist() == [7, 30, 99]
    assert starts.tolist() == [0, 2, 5]
    assert order.tolist() == [1, 4, 0, 2, 5, 3]
    ids, counts = per_identity_counts(labels)
    assert ids.tolist() == [7, 30, 99] and counts.tolist() == [2, 3, 1]
    kept = np.array([0, 3, 5])
    assert label_map_for(kept, labels) == {30: 0, 99: 1}
    s = selection_summary(kept, labels)
    assert s["kept_images"] == 3 and s["identities_kept"] == 2 and s["identities"] == 3
    assert s["kept_fraction"] == 0.5 and s["images_per_identity_min"] == 1 and s["images_per_identity_max"] == 2
    line = format_summary(s)
    assert "\n" not in line and "3 of 6 images" in line and "2 of 3 identities" in line


def test_identity_index_sparse_labels():
    labels = np.array([10 ** 12, 5, 10 ** 12, 0])  # too sparse for a lookup table: the np.unique path
    identities, starts, order = identity_index(labels)
    assert identities.tolist() == [0, 5, 10 ** 12] and starts.tolist() == [0, 1, 2] and order.tolist() == [3, 1, 0, 2]


# ============================================================================ validation
@pytest.mark.parametrize("call, message", [
    (lambda: diffprob([0.1, 0.2], [0], 0.1), "differ in length"),
    (lambda: diffprob([0.1, np.nan], [0, 0], 0.1), "finite and >= 0"),
    (lambda: diffprob([0.1, -0.2], [0, 0], 0.1), "prob\\[1\\] = -0.2"),
    (lambda: diffprob([0.1, 0.2], [0, 0], -0.1), "threshold must be >= 0"),
    (lambda: diffprob([0.1, 0.2], [0, 0], float("nan")), "threshold must be >= 0"),
    (lambda: diffprob([], [], 0.1), "empty input"),
    (lambda: diffprob([0.1], [-1], 0.1), "labels must be >= 0"),
    (lambda: diffprob([0.1], [0.5], 0.1), "labels must be integers"),
    (lambda: diffprob([0.1, 0.2], [0, 0], 0.1, excluded=[2]), "outside"),
    (lambda: diffprob_threshold_for_fraction([0.1], [0], 0.0), "keep_fraction must be in \\(0, 1\\]"),
    (lambda: diffprob_threshold_for_fraction([0.1], [0], 1.5), "keep_fraction must be in"),
    (lambda: keep_top_per_identity([0.1], [0], float("nan")), "fraction must be in"),
    (lambda: keep_top_per_identity([0.1, 0.2], [0], 0.5), "differ in length"),
    (lambda: random_keep([0], 0.0), "fraction must be in"),
    (lambda: random_keep([0], 0.5, -1), "min_samples_per_id must be >= 0"),
    (lambda: dynunc_scores(np.zeros((12, 0)), 10), "empty input"),
])
def test_errors_name_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_nan_probability_allowed_on_excluded_samples():
    kept = diffprob([0.1, np.nan, 0.3], [0, 0, 0], 0.1, 1, excluded=[1])
    assert kept.tolist() == [0, 2]


# ============================================================================ plot
def test_plot_selection_writes_a_png(tmp_path):
    from utils.evaluation.plots import plot_selection

    prob, labels, _ = make_case(5, n_ids=60, quantum=1e4)
    kept = diffprob(prob, labels, 0.1)
    scores = prob.copy()
    scores[:3] = np.nan
    out = plot_selection(tmp_path / "sub" / "plot.png", scores, labels, kept, "diffprob t=0.1", "p(label)")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_selection(tmp_path / "rand.png", None, labels, random_keep(labels, 0.5), "rand", "none")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["plot.png", "rand.png", "sub"]  # no temp file left


def test_entropy_averages_over_the_epochs_a_sample_was_seen_in():

    rng = np.random.default_rng(7)
    E, N, k, C = 4, 6, 3, 9
    lg = rng.normal(size=(E, N, k))
    ix = np.stack([[rng.permutation(C)[:k] for _ in range(N)] for _ in range(E)])
    rest = rng.normal(size=(E, N)) - 2
    full = soft_label_entropy(lg, ix, rest, C)
    lg2, ix2, rest2 = lg.copy(), ix.copy(), rest.copy()
    lg2[1, 2], ix2[1, 2], rest2[1, 2] = np.nan, -1, np.nan  # sample 2 not seen in epoch 1
    lg2[:, 4], ix2[:, 4], rest2[:, 4] = np.nan, -1, np.nan  # sample 4 never seen
    got = soft_label_entropy(lg2, ix2, rest2, C)
    keep = [0, 2, 3]
    expect2 = soft_label_entropy(lg[keep][:, [2]], ix[keep][:, [2]], rest[keep][:, [2]], C)[0]
    assert np.isclose(got[2], expect2) and not np.isclose(got[2], full[2])
    assert np.isnan(got[4])
    others = [0, 1, 3, 5]
    np.testing.assert_allclose(got[others], full[others])
