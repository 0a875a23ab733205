"""Each cleaning rule's precision-recall curve (utils/cleaning/curves.py, tools/cleaning_curves.py): the curve on a
hand-worked ranking, each rule's default point against its curve, and the tool on a tiny experiment."""

import numpy as np
import pytest

from config.config import parse_config
from tests.helpers import crafted_records
from utils.cleaning import curves, quality, registry

# Ten samples from the most suspicious down; N: noisy, C: clean. Flagging the first k:
#   k       1    2    3    4    5    6    7    8    9    10
#   TP      1    2    2    3    4    4    5    5    5    5
#   P       1    1   2/3  3/4  4/5  2/3  5/7  5/8  5/9  1/2
#   R      .2   .4   .4   .6   .8   .8    1    1    1    1
# precision at recall 0.8: the best of k = 5..10, 4/5 (k = 5); best F1: k = 7, 2 (5/7) / (5/7 + 1) = 5/6
# (k = 5 gives 0.8).
HAND = "NNCNNCNCCC"


def hand_example():
    value = np.arange(10, 0, -1, dtype=float)
    return curves.Suspicion(value), np.array([c == "N" for c in HAND])


def test_curve_by_hand():
    s, noisy = hand_example()
    c = curves.pr_curve(s, noisy)
    assert c.flagged.tolist() == list(range(1, 11))
    assert np.allclose(c.precision, [1, 1, 2 / 3, 3 / 4, 4 / 5, 2 / 3, 5 / 7, 5 / 8, 5 / 9, 1 / 2])
    assert np.allclose(c.recall, [.2, .4, .4, .6, .8, .8, 1, 1, 1, 1])
    out = curves.summary(c)
    assert out["precision_at_recall"] == pytest.approx(0.8)
    best = out["best_f1"]
    assert best["f1"] == pytest.approx(5 / 6) and best["flagged"] == 7
    assert best["precision"] == pytest.approx(5 / 7) and best["recall"] == 1.0 and best["threshold"] == 4.0


def test_ties_tiers_and_never_flagged_samples():
    s, noisy = hand_example()
    value = s.value.copy()
    value[2] = value[3]  # samples 2 (clean) and 3 (noisy) tie: one point flags both
    value = np.append(value, [np.nan, 0.5])  # a noisy sample never flagged; a clean one last, but in tier 1
    noisy = np.append(noisy, [True, False])
    tier = np.zeros(12, bool)
    tier[11] = True
    c = curves.pr_curve(curves.Suspicion(value, tier), noisy)
    assert c.flagged.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11]  # sample 11 first; 2 and 3 at once
    assert c.precision[0] == 0 and c.tier[0] and c.value[0] == 0.5
    assert c.recall[-1] == pytest.approx(5 / 6)  # the NaN sample counts in the recall, never flagged
    assert curves.summary(c)["precision_at_recall"] == pytest.approx(5 / 8)  # recall 5/6 first reached at k = 8
    assert curves.on_curve([11, 0, 1], curves.Suspicion(value, tier))
    assert not curves.on_curve([11, 0, 1, 2], curves.Suspicion(value, tier))  # splits the tie
    assert not curves.on_curve([0, 1], curves.Suspicion(value, tier))  # skips the tier-1 sample
    assert not curves.on_curve([11, 10], curves.Suspicion(value, tier))  # NaN: never flagged
    assert curves.on_curve([], curves.Suspicion(value, tier))


def crafted(seed):
    rec = crafted_records(np.random.default_rng(seed))
    noise = {"flipped": [{"index": i, "label": 0, "true_label": 1} for i in range(0, 12, 2)],
             "open_set": [{"index": 13, "label": 0}]}
    return rec, noise


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name,options", [("trajectory", []), ("trajectory", ["--clean_margin_quantile", "0.6"]),
                                          ("confident_learning", []),
                                          ("confident_learning", ["--clean_probs", "scores"]), ("subcenter", []),
                                          ("subcenter", ["--clean_angle", "30"])])
def test_a_rules_default_point_lies_on_its_curve(seed, name, options):
    rec, noise = crafted(seed)
    cfg = parse_config(["--clean_rule", name, *options])
    flags = registry.run_rule(registry.get_rule(name), rec, cfg)
    s = curves.QUANTITIES[name][0](rec, cfg)
    assert curves.on_curve(flags.index, s)
    c = curves.pr_curve(s, curves.noisy_mask(noise, len(rec.labels)))
    q = quality.cleaning_quality(flags.index, noise)
    if flags.index.size:
        at = np.flatnonzero(c.flagged == flags.index.size)
        assert at.size == 1 and c.precision[at[0]] == pytest.approx(q["precision"])
        assert c.recall[at[0]] == pytest.approx(q["recall"])


@pytest.mark.parametrize("seed", range(3))
def test_center_angle_mislabeled_branch_is_the_threshold_0_point(seed):
    rec, noise = crafted(seed)
    rec.scores["label_cos"][20], rec.scores["other_cos"][20] = -0.5, -0.55  # nearer its own centre, but far from it
    cfg = parse_config(["--clean_rule", "center_angle"])
    flags = registry.run_rule(registry.get_rule("center_angle"), rec, cfg)
    s = curves.QUANTITIES["center_angle"][0](rec, cfg)
    branch = flags.index[~flags.outlier]
    assert np.array_equal(branch, np.flatnonzero(s.value > 0)) and curves.on_curve(branch, s)
    assert 20 in flags.index[flags.outlier] and s.value[20] < 0  # the outlier branch: a second condition
    assert not curves.on_curve(flags.index, s)  # so the rule's point lies off the curve
    c = curves.pr_curve(s, curves.noisy_mask(noise, len(rec.labels)))
    point = c.flagged == branch.size
    assert c.precision[point] == pytest.approx(quality.cleaning_quality(branch, noise)["precision"])


def test_argmax_ranks_by_p_label_and_aum_by_the_mean_margin():
    rec, _ = crafted(0)
    cfg = parse_config([])
    assert np.array_equal(curves.QUANTITIES["argmax"][0](rec, cfg).value, -rec.scores["gt_prob"])
    t = rec.topk
    aum = curves.QUANTITIES["aum"][0](rec, cfg).value
    i = 7  # by hand: the largest other logit is the top-1, or the top-2 where the label is on top
    other = np.where(t["topk_index"][:, i, 0] == rec.labels[i], t["topk_logits"][:, i, 1], t["topk_logits"][:, i, 0])
    margin = t["label_logit"][:, i].astype(np.float64) - other.astype(np.float64)
    assert aum[i] == pytest.approx(-margin.mean(), abs=1e-3)
