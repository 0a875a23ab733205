"""Each cleaning rule's precision-recall curve (utils/cleaning/curves.py, tools/cleaning_curves.py): the curve on a
hand-worked ranking, each rule's default point against its curve, and the tool on a tiny experiment."""
import dataclasses
import json

import numpy as np
import pytest

from config.config import parse_config
from tests.helpers import crafted_records, make_tiny_dataset, write_records
from utils.artifacts import paths
from utils.cleaning import curves, quality, registry
from utils.data.datasets import open_dataset
from utils.data.noise_file import noisy_mask

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
    c = curves.pr_curve(s, noisy_mask(noise, len(rec.labels)))
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
    c = curves.pr_curve(s, noisy_mask(noise, len(rec.labels)))
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


def test_self_confidence_reference_is_p_label_over_its_class_threshold():
    rec, _ = crafted(1)
    cfg = parse_config(["--clean_probs", "scores"])
    value = curves.QUANTITIES["self_confidence"][0](rec, cfg).value
    p = rec.scores["gt_prob"]
    t = np.array([p[rec.labels == c].mean() for c in range(rec.num_classes)])  # the mean p(label) of each class
    assert np.allclose(value, -p / t[rec.labels])


def test_tool_writes_the_table_json_and_figure_and_skips_what_is_missing(tmp_path, capsys):
    from tools.cleaning_curves import main

    rec_dir = make_tiny_dataset(tmp_path / "data")
    ds = open_dataset(rec_dir)
    noise = json.loads((rec_dir / "noise.json").read_text())
    pred = ds.all_labels.copy()
    flipped = np.array([e["index"] for e in noise["flipped"]], dtype=np.int64)
    pred[flipped] = (pred[flipped] + 1) % ds.fingerprint.num_classes
    out = tmp_path / "exp"
    for loss, subcenters in (("CosFace", 0), ("SubCenterArcFace", 3)):
        cfg = parse_config(["--rec", str(rec_dir), "--output", str(out / "runs"), "--loss", loss,
                            "--original_net_loss", loss])
        write_records(cfg, ds, pred, geometry=True, subcenters=subcenters)
        (paths.original_dir(cfg) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    md, js, png = tmp_path / "docs" / "c.md", tmp_path / "c.json", tmp_path / "c.png"
    main([str(out), "--out_md", str(md), "--out_json", str(js), "--out_png", str(png)])
    printed = capsys.readouterr().out
    result = json.loads(js.read_text())["experiments"][0]
    names = [c["rule"] for c in result["curves"]]
    assert names == [*registry.RULES, *curves.REFERENCES] and not result["skipped"]
    assert result["original"].endswith("_CosFace") and result["subcenter_original"].endswith("_SubCenterArcFace")
    assert result["title"] == "5% flips + 2% open-set"  # the synthetic generator's default rates
    rows = [line for line in printed.splitlines() if line.startswith(f"| {result['title']} |")]
    assert len(rows) == len(names) and all(len(row.split(" | ")) == 7 for row in rows)
    flips_found = next(c for c in result["curves"] if c["rule"] == "argmax")["default"]
    assert flips_found["flagged"] == flipped.size and flips_found["precision"] == 1.0  # the flips, and only them
    page = md.read_text()
    assert page.splitlines()[2].startswith("Measured ") and "](../c.png)" in page and rows[0] in page
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main([str(out), "--subcenter_runs", str(tmp_path / "docs")])  # no sub-center model there: skipped, said so
    assert "subcenter: skipped: no original_*_SubCenterArcFace" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="train the original model first"):
        main([str(tmp_path / "docs")])

