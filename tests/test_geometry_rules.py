"""The angle-based cleaning rules (utils/cleaning/geometry.py): each against its plain loop and on hand-worked cases."""
import numpy as np
import pytest

from config.config import parse_config
from utils.artifacts.files import Fingerprint
from utils.artifacts.records import Records
from utils.cleaning import registry
from utils.cleaning.geometry import (center_angle_flags, center_angle_loop, subcenter_flags, subcenter_loop,
                                     tukey_fence)
from utils.errors import InputError


def cos_of(deg):
    return np.cos(np.radians(np.asarray(deg, dtype=np.float64)))


@pytest.mark.parametrize("seed", range(4))
def test_subcenter_rule_is_its_loop(seed):
    rng = np.random.default_rng(seed)
    n, classes, k = 300, 7, 3
    labels = rng.integers(0, classes, n)
    sub = np.clip(rng.normal(0.3, 0.35, (n, k)), -1, 1)
    sub[rng.random(n) < 0.05] = np.nan  # unscored samples
    for angle in (0.0, 40.0, 75.0, 180.0):
        flags = subcenter_flags(sub, labels, classes, angle)
        assert np.array_equal(flags.index, subcenter_loop(sub, labels, classes, angle)), angle
    assert not np.isin(np.flatnonzero(np.isnan(sub[:, 0])), flags.index).any()


def test_subcenter_rule_by_hand():
    # identity 0: four images nearest sub-center 1 (its dominant one; one of them 80 degrees from it), one nearest
    # sub-center 0; identity 1: its two images nearest sub-center 2.
    sub = cos_of([[90, 30, 90], [90, 20, 90], [90, 40, 85], [10, 60, 90], [85, 80, 89],
                  [90, 90, 10], [90, 90, 20]])
    labels = np.array([0, 0, 0, 0, 0, 1, 1])
    other_cos = cos_of([70, 70, 70, 20, 85, 70, 70])  # image 3 lies 20 degrees from identity 1's centre
    other_class = np.array([1, 1, 1, 1, 1, 0, 0])
    flags = subcenter_flags(sub, labels, 2, 75.0, other_cos, other_class)
    assert flags.index.tolist() == [3, 4]
    assert flags.suggested_label.tolist() == [1, -1] and flags.outlier.tolist() == [False, True]
    assert flags.info["not_dominant"] == 1 and flags.info["too_far"] == 1  # image 3; image 4 (80 degrees)
    assert subcenter_flags(sub, labels, 2, 85.0).index.tolist() == [3]  # 80 degrees is within 85


@pytest.mark.parametrize("seed", range(4))
def test_center_angle_rule_is_its_loop(seed):
    rng = np.random.default_rng(seed)
    n, classes = 400, 9
    labels = rng.integers(0, classes, n)
    label_cos = np.clip(rng.normal(0.6, 0.25, n), -1, 1)
    other_cos = np.clip(rng.normal(0.25, 0.2, n), -1, 1)
    label_cos[:6] = np.nan  # a cleaning round's model lost their identity: outliers
    label_cos[6:9], other_cos[6:9] = np.nan, np.nan  # unscored: not judged
    other_class = (labels + 1) % classes
    flags = center_angle_flags(label_cos, other_cos, other_class, labels, classes)
    assert np.array_equal(flags.index, center_angle_loop(label_cos, other_cos, labels, classes))
    assert set(range(6)) <= set(flags.index.tolist()) and not {6, 7, 8} & set(flags.index.tolist())
    nearer_other = np.degrees(np.arccos(label_cos)) > np.degrees(np.arccos(other_cos))
    mislabeled = flags.index[~flags.outlier]
    assert nearer_other[mislabeled].all() and (flags.suggested_label[~flags.outlier] == other_class[mislabeled]).all()


def test_center_angle_rule_by_hand():
    # Two identities of five images. Identity 0: angles to its centre 30, 32, 34, 36 and 70 degrees, the nearest
    # other centre at 80 degrees; identity 1: 40, 42, 44, 46 and one image 50 degrees from its own centre but 20
    # from identity 0's (a flip).
    theta_y = np.array([30, 32, 34, 36, 70, 40, 42, 44, 46, 50.0])
    theta_o = np.array([80, 80, 80, 80, 80, 80, 80, 80, 80, 20.0])
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    other_class = 1 - labels
    flags = center_angle_flags(cos_of(theta_y), cos_of(theta_o), other_class, labels, 2)
    # majority medians 34 (identity 0) and 43 (identity 1); excess -4 -2 0 2 36 | -3 -1 1 3; fence 6.25 + ...
    excess = np.array([-4, -2, 0, 2, 36, -3, -1, 1, 3.0])
    assert flags.info["fence_degrees"] == pytest.approx(tukey_fence(excess))
    assert flags.index.tolist() == [4, 9]
    assert flags.outlier.tolist() == [True, False] and flags.suggested_label.tolist() == [-1, 0]
    assert flags.confidence[1] == pytest.approx(cos_of(20))


def test_center_angle_needs_a_majority():
    with pytest.raises(InputError, match="nearer its own identity's centre"):
        center_angle_flags(cos_of([80, 80]), cos_of([10, 10]), np.array([1, 0]), np.array([0, 1]), 2)


def _records(scores: dict, labels) -> Records:
    fp = Fingerprint(len(labels), int(labels.max()) + 1, 1)
    rec = Records(parse_config([]), labels, fp, fp.num_classes, inputs=[])
    rec._cache["scores"] = scores
    return rec


def test_rules_ask_for_what_older_scores_lack():
    labels = np.array([0, 1, 0, 1])
    rec = _records({"pred": labels, "pred_prob": np.ones(4), "gt_prob": np.ones(4), "gt_prob_with_margin": np.ones(4),
                    "label": labels}, labels)
    with pytest.raises(InputError, match="run eval_trainset.py again"):
        registry.run_rule(registry.get_rule("center_angle"), rec, parse_config(["--clean_rule", "center_angle"]))
    with pytest.raises(InputError, match="--loss SubCenterArcFace"):
        registry.run_rule(registry.get_rule("subcenter"), rec, parse_config(["--clean_rule", "subcenter"]))


@pytest.mark.parametrize("angle", ["181", "-5"])
def test_clean_angle_range_is_checked(angle):
    labels = np.array([0, 1])
    rec = _records({}, labels)
    with pytest.raises(InputError, match="clean_angle"):
        registry.run_rule(registry.get_rule("subcenter"), rec, parse_config(["--clean_angle", angle]))
