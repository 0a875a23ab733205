"""Dynamic pruning's rules (utils/training/dynamic.py) against literal per-sample loops written from the rules in
the module's docstring: which epochs prune, InfoBatch's drops and weights, UCB's moving mean and variance and its
kept set, and the checks of the keys."""
import math
from types import SimpleNamespace

import numpy as np
import pytest

from utils.training import dynamic as D


def cfg(**kw):
    base = dict(dynamic_method="infobatch", dynamic_ratio=0.5, dynamic_anneal=0.875, dynamic_ema=0.8,
                dynamic_ucb_c=1.0, num_epoch=12, seed=3)
    return SimpleNamespace(**{**base, **kw})


def test_which_epochs_prune():
    # 12 epochs, anneal 0.875: 0 has no loss yet, 1..10 prune (< 10.5), 11 trains on everything
    assert [e for e in range(12) if D.pruning_epoch(cfg(), e)] == list(range(1, 11))
    assert [e for e in range(8) if D.pruning_epoch(cfg(num_epoch=8, dynamic_anneal=0.5), e)] == [1, 2, 3]
    assert not any(D.pruning_epoch(cfg(dynamic_method="none"), e) for e in range(12))


def literal_store(epochs_of_losses, decay):
    """The moving mean and variance one sample at a time: the first loss seen sets the mean (variance 0); then
    d = loss - mean, mean += (1 - decay) * d, var = decay * (var + (1 - decay) * d^2)."""
    n = len(epochs_of_losses[0])
    last, mean, var = [math.nan] * n, [math.nan] * n, [0.0] * n
    for losses in epochs_of_losses:
        for i, x in enumerate(losses):
            if math.isnan(x):
                continue
            last[i] = x
            if math.isnan(mean[i]):
                mean[i] = x
            else:
                d = x - mean[i]
                mean[i] += (1 - decay) * d
                var[i] = decay * (var[i] + (1 - decay) * d * d)
    return last, mean, var


def test_the_store_is_the_literal_moving_mean_and_variance():
    rng = np.random.default_rng(0)
    epochs = [rng.random(9) * 5 for _ in range(4)]
    epochs[1][[2, 5]] = np.nan  # not trained on in epoch 1
    epochs[0][7] = np.nan  # first seen in epoch 1
    store = D.LossStore(9)
    for e in epochs:
        store.update(e, 0.8)
    last, mean, var = literal_store([list(e) for e in epochs], 0.8)
    np.testing.assert_allclose(store.last, last, rtol=1e-12)
    np.testing.assert_allclose(store.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(store.var, var, rtol=1e-12, atol=1e-15)
    restored = D.LossStore(9)
    restored.load_state_dict(store.state_dict())
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(restored.state_dict().values(),
                                                                     store.state_dict().values()))
    with pytest.raises(ValueError, match="store has 9 samples, this training set 8"):
        D.LossStore(8).load_state_dict(store.state_dict())


def literal_infobatch(last, r, draws):
    """InfoBatch, one sample at a time: below the mean of the stored losses -> dropped when its draw < r, else
    kept with weight 1/(1-r); at or above the mean, or never seen: kept, weight 1."""
    seen = [x for x in last if not math.isnan(x)]
    mean = sum(seen) / len(seen)
    kept, weights = [], []
    for i, x in enumerate(last):
        if not math.isnan(x) and x < mean:
            if draws[i] < r:
                weights.append(1.0)  # not trained on: its weight is never used
                continue
            kept.append(i)
            weights.append(1 / (1 - r))
        else:
            kept.append(i)
            weights.append(1.0)
    return kept, weights


@pytest.mark.parametrize("r, seed", [(0.5, 3), (0.3, 7), (0.0, 1)])
def test_infobatch_is_the_literal_rule(r, seed):
    c = cfg(dynamic_ratio=r, seed=seed)
    store = D.LossStore(200)
    losses = np.random.default_rng(seed).gamma(2.0, size=200)
    losses[[4, 9]] = np.nan  # never seen (a skipped image)
    store.update(losses, c.dynamic_ema)
    for epoch in (1, 5):
        plan = D.plan_epoch(c, store, epoch)
        draws = np.random.default_rng([seed, epoch, 0x1FB]).random(200)  # the docstring's generator
        kept, weights = literal_infobatch(list(store.last), r, list(draws))
        assert plan.kept.tolist() == kept and plan.kept.dtype == np.int64
        np.testing.assert_allclose(plan.weights, weights, rtol=1e-7)
        assert plan.weights.dtype == np.float32
    below = np.nansum(losses < np.nanmean(losses))
    if r == 0:
        assert plan.kept.size == 200
    else:  # about r of the below-mean samples dropped: the epochs differ (another draw each)
        assert D.plan_epoch(c, store, 1).kept.tolist() != D.plan_epoch(c, store, 2).kept.tolist()
        assert abs((200 - plan.kept.size) - r * below) < 4 * math.sqrt(below * r * (1 - r))
    full = D.plan_epoch(c, store, 11)  # the annealing tail and epoch 0: everything, weight 1
    assert full.full and full.kept.tolist() == list(range(200))
    assert D.plan_epoch(c, store, 0).full


def literal_ucb(mean, var, c, r):
    n = len(mean)
    score = [math.inf if math.isnan(m) else m + c * math.sqrt(v) for m, v in zip(mean, var)]
    order = sorted(range(n), key=lambda i: (-score[i], i))
    return sorted(order[:math.ceil((1 - r) * n)])


@pytest.mark.parametrize("r, c", [(0.5, 1.0), (0.25, 0.0), (0.75, 2.5)])
def test_ucb_is_the_literal_rule(r, c):
    conf = cfg(dynamic_method="ucb", dynamic_ratio=r, dynamic_ucb_c=c)
    rng = np.random.default_rng(1)
    store = D.LossStore(50)
    epochs = [np.round(rng.random(50) * 4, 1) for _ in range(3)]  # rounded: ties happen
    epochs[0][[3, 8]] = np.nan
    epochs[1][3] = np.nan
    epochs[2][3] = np.nan  # 3 is never seen: it comes first
    for e in epochs:
        store.update(e, conf.dynamic_ema)
    plan = D.plan_epoch(conf, store, 2)
    _, mean, var = literal_store([list(e) for e in epochs], conf.dynamic_ema)
    assert plan.kept.tolist() == literal_ucb(mean, var, c, r)
    assert plan.weights is None and plan.kept.size == math.ceil((1 - r) * 50) and 3 in plan.kept


def test_keys_are_checked_by_the_method_that_reads_them():
    assert D.dynamic_config_errors(cfg(dynamic_method="none", dynamic_ratio=5)) == []
    assert D.dynamic_config_errors(cfg(dynamic_ratio=1.0)) == ["dynamic_ratio=1.0 must be in [0, 1) (the share pruned)"]
    assert D.dynamic_config_errors(cfg(dynamic_anneal=0)) == [
        "dynamic_anneal=0 must be in (0, 1] (the share of the epochs that prune)"]
    assert D.dynamic_config_errors(cfg(dynamic_ema=1.0)) == []  # infobatch does not read it
    assert D.dynamic_config_errors(cfg(dynamic_method="ucb", dynamic_ema=1.0, dynamic_ucb_c=-1)) == [
        "dynamic_ema=1.0 must be in [0, 1)", "dynamic_ucb_c=-1 must be >= 0"]
    assert D.dynamic_choices() == ("none", "infobatch", "ucb")


def test_the_ratio_of_a_cost_and_each_runs_cost():
    from utils.pipeline.steps import add_costs

    c = cfg(num_epoch=12, dynamic_anneal=0.875)  # epochs 1..10 prune: 10 of 12
    assert D.pruning_epochs(c) == 10
    assert [D.ratio_for_cost(c, f) for f in (0.75, 0.5, 0.25)] == pytest.approx([0.3, 0.6, 0.9])
    with pytest.raises(ValueError, match="a cost of 10% is out of reach with 10 pruning epochs of 12"):
        D.ratio_for_cost(c, 0.1)
    runs = [dict(method="full", trainee="a", seed_offset=0, sample_passes=1000),
            dict(method="full", trainee="a", seed_offset=1, sample_passes=800),
            dict(method="diffprob", trainee="a", seed_offset=0, sample_passes=500),
            dict(method="rand", trainee="a", seed_offset=1, sample_passes=400),
            dict(method="ucb", trainee="a", seed_offset=0, sample_passes=250),
            dict(method="diffprob", trainee="b", seed_offset=0, sample_passes=300)]
    add_costs(runs, {"diffprob"})
    # seed +1's full run is 800: Rand's cost is over it; the scoring run (the original: trainee a, seed 0) is
    # 1000 passes, in units of each run's own full-data run; trainee b has no full run of its own: the original's
    assert [r["cost"] for r in runs] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.3]
    assert [r["cost_with_scoring"] for r in runs] == [1.0, 1.0, 1.5, 0.5, 0.25, 1.3]
