"""Cleaning rules: the registry, trajectory soft labels, confident learning against cleanlab, the lists and
contact sheet a researcher shares, measuring against noise.json, iterative rounds, and the errors users cause."""
import csv
import json

import cv2
import numpy as np
import pytest

from config.config import parse_config
from tests.helpers import REPO, TINY_TRAIN, crafted_records, make_tiny_dataset, run_script, write_records
from utils.cleaning import lists, probabilities, quality, registry, rules
from utils.artifacts import paths
from utils.artifacts.files import load_array, load_kept_index, read_array
from utils.dynamics.soft_labels import SparseProbs
from utils.data.datasets import open_dataset
from utils.errors import InputError
from utils.artifacts.records import clean_round_dir, round_model_dir, round_scores_path, round_train_keys
from utils.dynamics.soft_labels import soft_label_entropy


# ------------------------------------------------------------------------------------------- helpers
def dense_records(logits):
    """Top-k records with k = K (every class each epoch) from full logits (E, N, K): nothing approximated."""
    index = np.argsort(-logits, axis=2, kind="stable")
    return np.take_along_axis(logits, index, axis=2), index, np.full(logits.shape[:2], np.nan)


def sparse_from_dense(pred_probs, labels):
    """The sparse form of a dense matrix with every class listed (k = K)."""
    order = np.argsort(-pred_probs, axis=1, kind="stable")
    n = len(labels)
    return SparseProbs(order, np.take_along_axis(pred_probs, order, axis=1), pred_probs[np.arange(n), labels],
                       np.zeros(n))


def noisy_probs(rng, n, k):
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)
    probs = rng.dirichlet(np.full(k, rng.uniform(0.1, 2.0)), n)
    probs[np.arange(n), labels] += rng.uniform(0.0, 1.5)
    return labels, probs / probs.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------ confident learning
@pytest.mark.parametrize("seed", range(6))
def test_confident_learning_flags_what_cleanlab_flags(seed):
    """The sparse rule with every class listed (k = K) flags exactly cleanlab's filter_by='confident_learning'
    set (the confident joint's off-diagonals). Deliberately not cleanlab's default 'prune_by_noise_rate', which
    prunes per off-diagonal cell as many as the calibrated joint estimates, ranked by margin."""
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(seed)
    for trial in range(10):
        labels, probs = noisy_probs(rng, int(rng.integers(30, 300)), int(rng.integers(2, 12)))
        if trial % 3 == 0:  # ties and exact threshold hits
            probs = np.round(probs, 2)
            probs /= probs.sum(axis=1, keepdims=True)
        expect = find_label_issues(labels, probs, filter_by="confident_learning")
        issue, guess, guess_prob, _ = rules.confident_learning(sparse_from_dense(probs, labels), labels,
                                                               probs.shape[1])
        assert np.array_equal(issue, expect), np.flatnonzero(issue ^ expect)
        assert (guess[issue] != labels[issue]).all() and (guess[~issue] == -1).all()
        assert np.allclose(guess_prob[issue], probs[issue, guess[issue]])


def test_confident_learning_on_sparse_top_k_is_exact_where_no_unlisted_class_is_confident():
    """Listing only the top 3 of 30 classes changes no sample whose unlisted classes stay below their thresholds."""
    rng = np.random.default_rng(7)
    labels, probs = noisy_probs(rng, 400, 30)
    full = sparse_from_dense(probs, labels)
    top3 = SparseProbs(full.classes[:, :3], full.probs[:, :3], full.label_prob, full.rest_prob)
    thresholds = rules.confident_learning(full, labels, 30)[3]
    unlisted = full.classes[:, 3:]
    exact = ((full.probs[:, 3:] < thresholds[unlisted] - 1e-6) | (unlisted == labels[:, None])).all(axis=1)
    assert exact.mean() > 0.9
    assert np.array_equal(rules.confident_learning(top3, labels, 30)[0][exact],
                          rules.confident_learning(full, labels, 30)[0][exact])


# -------------------------------------------------------------------------------- trajectory soft labels
def test_soft_labels_with_every_class_recorded_are_the_softmax_of_mean_logits():
    rng = np.random.default_rng(0)
    E, N, K = 5, 40, 7
    logits = rng.normal(size=(E, N, K)) * 4
    lg, ix, rest = dense_records(logits)
    ix[2, 3], lg[2, 3] = -1, np.nan  # sample 3 not seen in epoch 3
    labels = rng.integers(0, K, N)
    soft = probabilities.trajectory_soft_labels(lg, ix, rest, labels, K)
    seen = np.ones((E, N), bool)
    seen[2, 3] = False
    mean = np.where(seen[:, :, None], logits, 0).sum(axis=0) / seen.sum(axis=0)[:, None]
    p = np.exp(mean - mean.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert np.allclose(soft.probs, np.take_along_axis(p, soft.classes, axis=1))
    assert np.array_equal(soft.classes[:, 0], p.argmax(axis=1))
    assert np.allclose(soft.label_prob, p[np.arange(N), labels])
    assert np.allclose(soft.entropy, -(p * np.log(p)).sum(axis=1))


def test_soft_labels_from_top_k_agree_with_the_entropy_method_and_price_unlisted_classes_as_the_rest():
    rng = np.random.default_rng(1)
    E, N, K, k = 4, 30, 9, 3
    logits = rng.normal(size=(E, N, K)) * 3
    order = np.argsort(-logits, axis=2)[:, :, :k]
    lg = np.take_along_axis(logits, order, axis=2)
    rest = (logits.sum(axis=2) - lg.sum(axis=2)) / (K - k)
    labels = rng.integers(0, K, N)
    soft = probabilities.trajectory_soft_labels(lg, order, rest, labels, K, keep=E * k)  # every class ever in a top k
    assert np.allclose(soft.entropy, soft_label_entropy(lg, order, rest, K))
    listed = soft.classes == labels[:, None]
    assert np.allclose(soft.label_prob[~listed.any(axis=1)], soft.rest_prob[~listed.any(axis=1)])
    assert np.allclose(soft.label_prob[listed.any(axis=1)], soft.probs[listed])
    n_listed = (soft.classes >= 0).sum(axis=1)
    assert np.allclose(soft.probs.sum(axis=1) + (K - n_listed) * soft.rest_prob, 1.0)  # a distribution
    last = soft.probs[np.arange(N), n_listed - 1]
    assert (last >= soft.rest_prob - 1e-12).all()  # a listed class is never below an unlisted one


def test_soft_label_rule_finds_a_flip_and_an_outlier_without_ground_truth():
    """Per identity 20 images; sample 0 (label 0) looks like identity 2 in every epoch: mislabeled, suggested 2;
    sample 1 (label 1) is claimed by no identity: an outlier; the others agree with their labels."""
    rng = np.random.default_rng(2)
    K, per = 4, 20
    labels = np.repeat(np.arange(K), per)
    logits = rng.normal(scale=0.5, size=(6, labels.size, K))
    logits[:, np.arange(labels.size), labels] += 8
    logits[:, 0, 0] -= 12  # sample 0 (label 0): identity 2, as confidently as identity 2's own images
    logits[:, 0, 2] += 9
    logits[:, per, 1] -= 20  # sample `per` (label 1): not identity 1, and no other identity stands out
    soft = probabilities.trajectory_soft_labels(*dense_records(logits), labels, K)
    flags = rules.soft_label_flags(soft, labels, K, 0.25)
    assert flags.index.tolist() == [0, per]
    assert flags.suggested_label.tolist() == [2, -1] and flags.outlier.tolist() == [False, True]
    assert flags.info["clean_majority"] == labels.size - 2


def test_soft_label_rule_reads_only_the_top_two_classes():
    """The trajectory rule computes 2 classes per sample, not k: its flags are those of the full top k."""
    rng = np.random.default_rng(5)
    K, k = 12, 4
    labels = np.repeat(np.arange(K), 15)
    logits = rng.normal(scale=1.5, size=(5, labels.size, K))
    logits[:, np.arange(labels.size), labels] += 3
    logits[:, ::9] = rng.normal(scale=2.0, size=(5, logits[:, ::9].shape[1], K))  # samples the model does not follow
    flips = np.array([4, 22, 40, 58])
    logits[:, flips, labels[flips]] -= 3  # images of the next identity under this label
    logits[:, flips, (labels[flips] + 1) % K] += 3
    index = np.argsort(-logits, axis=2)[:, :, :k]
    lg = np.take_along_axis(logits, index, axis=2)
    rest = (logits.sum(axis=2) - lg.sum(axis=2)) / (K - k)
    flags = [rules.soft_label_flags(probabilities.trajectory_soft_labels(lg, index, rest, labels, K, keep=keep),
                                    labels, K, 0.1) for keep in (2, 5 * k)]
    two, all_listed = flags
    assert np.isin(flips, two.index[~two.outlier]).all() and two.outlier.any()
    for name in ("index", "suggested_label", "confidence", "outlier"):
        np.testing.assert_array_equal(getattr(two, name), getattr(all_listed, name), err_msg=name)
    assert two.info == all_listed.info


# ---------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", list(registry.RULES))
@pytest.mark.parametrize("probs", ["trajectory", "scores"])
def test_every_registered_rule_returns_valid_flags(name, probs):
    rec = crafted_records(np.random.default_rng(3))
    cfg = parse_config(["--clean_rule", name, "--clean_probs", probs])
    flags = registry.run_rule(registry.get_rule(name), rec, cfg)
    n = len(rec.labels)
    assert flags.index.dtype == np.int64 and np.array_equal(flags.index, np.unique(flags.index))
    assert flags.index.size == 0 or 0 <= flags.index.min() <= flags.index.max() < n
    assert flags.outlier.shape == flags.index.shape
    s = flags.suggested_label
    assert s.shape == flags.index.shape and ((s == -1) == flags.outlier).all()
    assert (s[~flags.outlier] != rec.labels[flags.index[~flags.outlier]]).all()
    assert (s[~flags.outlier] < rec.num_classes).all()
    assert flags.confidence.shape == flags.index.shape
    mislabeled, outliers = lists.flag_lists(flags, rec.labels)
    assert mislabeled.size + outliers.size == flags.index.size
    assert (np.diff(mislabeled["confidence"]) <= 0).all() and (np.diff(outliers["score"]) >= 0).all()


def test_agreement_keeps_only_what_every_named_rule_flags():
    rec = crafted_records(np.random.default_rng(4))
    alone = {r: registry.run_rule(registry.get_rule(r), rec, parse_config(["--clean_rule", r])).index
             for r in ("argmax", "trajectory")}
    both = registry.run_rule(registry.get_rule("trajectory"), rec,
                             parse_config(["--clean_rule", "trajectory", "--clean_agree", "argmax"]))
    assert np.array_equal(both.index, np.intersect1d(alone["argmax"], alone["trajectory"]))
    assert both.info["agree"]["flagged_by"] == {k: int(v.size) for k, v in alone.items()}


def test_readme_cleaning_rule_line_is_the_registrys():
    assert registry.rule_line() in (REPO / "README.md").read_text(), \
        "README's cleaning rules line: paste utils.cleaning.registry.rule_line()"


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("keys, message", [
    (["--clean_margin_quantile", "1.5"], "clean_margin_quantile"),
    (["--clean_margin_quantile", "0"], "clean_margin_quantile"),
    (["--clean_tolerance", "-0.1"], "clean_tolerance"),
    (["--clean_round", "-1"], "clean_round"),
    (["--clean_epochs", "3-2"], "clean_epochs"),
    (["--clean_epochs", "first"], "clean_epochs"),
    (["--clean_epochs", "2-9"], "recorded epochs 1-4"),
    (["--clean_agree", "nonsense"], "valid: argmax"),
    (["--clean_rule", "trajectory", "--clean_agree", "trajectory"], "the rule itself"),
])
def test_out_of_range_keys_are_named(keys, message):
    rec = crafted_records(np.random.default_rng(5))
    cfg = parse_config(["--clean_rule", "trajectory", *keys] if "--clean_rule" not in keys else keys)
    with pytest.raises(InputError, match=message):
        registry.run_rule(registry.get_rule(cfg.clean_rule), rec, cfg)


def test_top_k_of_zero_and_records_of_another_dataset_are_refused():
    labels = np.zeros(4, np.int64)
    with pytest.raises(InputError, match="--record_topk K"):
        probabilities.trajectory_soft_labels(np.zeros((3, 4, 0)), np.zeros((3, 4, 0), int), np.zeros((3, 4)), labels, 5)
    with pytest.raises(InputError, match="another dataset"):
        probabilities.trajectory_soft_labels(np.zeros((1, 4, 1)), np.full((1, 4, 1), 9), np.zeros((1, 4)), labels, 5)


# ---------------------------------------------------------------------------------------- measuring
def test_quality_splits_flips_and_open_set_and_keeps_the_old_keys():
    noise = {"flipped": [{"index": 1, "label": 0, "true_label": 2}, {"index": 2, "label": 0, "true_label": 3},
                         {"index": 3, "label": 1, "true_label": 0}],
             "open_set": [{"index": 7, "label": 1}, {"index": 8, "label": 1}]}
    flagged = np.array([1, 2, 5, 7, 9])  # 1, 2 flips (one suggested right), 5 clean, 7 open-set, 9 clean outlier
    q = quality.cleaning_quality(flagged, noise, np.array([2, 0, 4, -1, -1]),
                                 np.array([False, False, False, True, True]))
    assert q["removed"] == 5 and q["true_positives"] == 3 and q["precision"] == 0.6 and q["recall"] == 0.6
    assert q["recall_flipped"] == 2 / 3 and q["recall_open_set"] == 0.5
    assert q["mislabeled"] == {"flagged": 3, "flipped": 3, "true_positives": 2, "precision": 2 / 3,
                               "recall": 2 / 3, "relabel_correct": 1, "relabel_accuracy": 0.5}
    assert q["outliers"] == {"flagged": 2, "open_set": 2, "true_positives": 1, "precision": 0.5, "recall": 0.5}
    assert set(quality.cleaning_quality(flagged, noise)) == {"removed", "noisy", "true_positives", "precision",
                                                             "recall", "recall_flipped", "recall_open_set"}


def test_flag_change():
    assert quality.flag_change([1, 2, 3, 4], [1, 2, 3, 5]) == 0.5
    assert quality.flag_change([1, 2], [1, 2]) == 0.0
    assert quality.flag_change([], []) == 0.0 and quality.flag_change([], [3]) == 1.0


# ------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def noisy_indices(rec_dir):
    noise = json.loads((rec_dir / "noise.json").read_text())
    return np.array(sorted(e["index"] for e in noise["flipped"] + noise["open_set"]), dtype=np.int64)


def test_trajectory_stage_writes_lists_contact_sheet_and_split_quality(tiny, tmp_path):
    ds = open_dataset(tiny)
    labels, k_classes = ds.all_labels, ds.fingerprint.num_classes
    args = ["--rec", str(tiny), "--output", str(tmp_path), "--clean_rule", "trajectory", "--relabel", "true"]
    cfg = parse_config(args)
    pred = labels.copy()
    noisy = noisy_indices(tiny)
    pred[noisy] = (labels[noisy] + 1) % k_classes
    write_records(cfg, ds, pred)
    r = run_script("clean_trainset.py", *args)
    d = paths.clean_dir(cfg)
    flagged = load_array(d / "flagged.npy", ds.fingerprint)
    mislabeled, outliers = read_array(d / "mislabeled.npy"), read_array(d / "outliers.npy")
    assert mislabeled.dtype.names == ("index", "label", "suggested_label", "confidence")
    assert outliers.dtype.names == ("index", "label", "score")
    assert np.array_equal(np.sort(np.concatenate([mislabeled["index"], outliers["index"]])), flagged)
    assert np.array_equal(mislabeled["label"], labels[mislabeled["index"]])
    rows = list(csv.DictReader(open(d / "mislabeled.csv")))
    assert len(rows) == mislabeled.size and set(rows[0]) == {"index", "label", "suggested_label", "confidence",
                                                             "record_key"}
    assert [int(x["index"]) for x in rows] == mislabeled["index"].tolist()
    assert (d / "contact_sheet.png").read_bytes()[:4] == b"\x89PNG"
    relabel = load_array(d / "relabel.npz", ds.fingerprint)
    assert np.array_equal(relabel["index"], np.sort(mislabeled["index"]))  # outliers get no label
    q = json.loads((d / "summary.json").read_text())["quality"]
    assert {"mislabeled", "outliers", "precision", "recall", "recall_flipped"} <= set(q)
    # the quality is the flagged set's against noise.json: true positives over flagged, and over noisy
    caught = np.intersect1d(flagged, noisy).size
    assert (q["removed"], q["noisy"], q["true_positives"]) == (flagged.size, noisy.size, caught)
    assert q["precision"] == pytest.approx(caught / flagged.size) and q["recall"] == pytest.approx(caught / noisy.size)
    assert (q["mislabeled"]["flagged"], q["outliers"]["flagged"]) == (mislabeled.size, outliers.size)
    kept = load_kept_index(d / "kept_index.npy", ds.fingerprint)
    assert np.array_equal(np.setdiff1d(np.arange(ds.num_images), kept), flagged)
    assert "mislabeled" in r.stdout and "precision" in r.stdout
    assert f"removed {flagged.size} of {ds.num_images} samples" in r.stdout
    assert f"{mislabeled.size} mislabeled, {outliers.size} outliers" in r.stdout
    assert f"precision {caught / flagged.size:.3f}, recall {caught / noisy.size:.3f}" in r.stdout


def test_image_folder_lists_name_the_files(tmp_path):
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for ident in ("alice", "bob", "carol"):
        (root / ident).mkdir(parents=True)
        for j in range(6):
            cv2.imwrite(str(root / ident / f"{j}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    ds = open_dataset(root)
    args = ["--rec", str(root), "--output", str(tmp_path / "out")]
    cfg = parse_config(args)
    pred = ds.all_labels.copy()
    pred[[1, 8]] = [2, 0]
    write_records(cfg, ds, pred, topk=2)
    run_script("clean_trainset.py", *args)
    rows = list(csv.DictReader(open(paths.clean_dir(cfg) / "mislabeled.csv")))
    assert sorted((r["index"], r["file"], r["suggested_label"]) for r in rows) == [("1", "alice/1.png", "2"),
                                                                                   ("8", "bob/2.png", "0")]


def test_missing_trajectory_records_and_bad_keys_exit_1_and_write_nothing(tiny, tmp_path):
    ds = open_dataset(tiny)
    args = ["--rec", str(tiny), "--output", str(tmp_path)]
    cfg = parse_config(args)
    write_records(cfg, ds, ds.all_labels)
    paths.topk_history_path(cfg).unlink()
    r = run_script("clean_trainset.py", *args, "--clean_rule", "trajectory", check=False)
    assert r.returncode == 1 and "--record_topk K" in r.stderr and "Traceback" not in r.stderr
    r = run_script("clean_trainset.py", *args, "--clean_rule", "argmax", "--clean_margin_quantile", "2", check=False)
    assert r.returncode == 1 and "clean_margin_quantile" in r.stderr
    assert not any(paths.clean_dir(cfg).glob("*.npy"))


# ------------------------------------------------------------------------------------- rounds
@pytest.mark.slow
def test_a_round_scores_the_full_set_with_the_retrained_model_and_maps_its_classes_back(tiny, tmp_path):
    """Round 1 removes one whole identity and some samples; the model retrained on what is left scores every
    sample (eval_trainset --clean_round 2), its classes mapped back to the dataset's; the identity it no longer
    has is reported, not dropped; round 2 cleans on those scores and says how much the flagged set changed."""
    ds = open_dataset(tiny)
    labels = ds.all_labels
    args = ["--rec", str(tiny), "--output", str(tmp_path), *TINY_TRAIN]
    cfg = parse_config(args)
    pred = labels.copy()
    gone = int(labels.max())
    pred[labels == gone] = 0  # the scorer puts every image of the last identity elsewhere: it vanishes
    pred[noisy_indices(tiny)] = (labels[noisy_indices(tiny)] + 1) % ds.fingerprint.num_classes
    write_records(cfg, ds, pred)
    run_script("clean_trainset.py", *args, "--clean_round", "1")
    first = clean_round_dir(cfg, 1)
    assert (first / "mislabeled.csv").exists() and (first / "kept_index.npy").exists()
    run_script("train_everything.py", *args, *[x for k, v in round_train_keys(cfg, 1).items()
                                               for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else v)])
    assert (round_model_dir(cfg, 1) / "last.pt").exists()
    r = run_script("eval_trainset.py", *args, "--checkpoint", round_model_dir(cfg, 1) / "last.pt", check=False)
    assert r.returncode == 1 and "relabelled subset" in r.stderr  # a subset's model scores only in a round
    r = run_script("eval_trainset.py", *args, "--clean_round", "2")
    scores = load_array(round_scores_path(cfg, 2), ds.fingerprint)
    missing = labels == gone
    assert np.array_equal(scores["label_in_model"], ~missing)
    assert (scores["gt_prob"][missing] == 0).all() and (scores["gt_prob"][~missing] > 0).all()
    assert set(np.unique(scores["pred"])) <= set(np.unique(labels[labels != gone]))  # dataset classes, mapped back
    assert f"{int(missing.sum())} samples of 1 identities" in r.stdout
    r = run_script("clean_trainset.py", *args, "--clean_round", "2")
    summary = json.loads((clean_round_dir(cfg, 2) / "summary.json").read_text())
    flagged = [load_array(clean_round_dir(cfg, k) / "flagged.npy", ds.fingerprint) for k in (1, 2)]
    # the change is the share of round 1's flagged samples that round 2 flags differently (either way)
    change = np.setxor1d(*flagged).size / flagged[0].size
    assert summary["round"] == 2 and summary["change"] == pytest.approx(change, abs=1e-12)
    assert summary["converged"] == (change < cfg.clean_tolerance)
    assert set(np.flatnonzero(missing)) <= set(flagged[1])
    top = json.loads((paths.clean_dir(cfg) / "summary.json").read_text())
    assert top["round"] == 2  # the top level holds the last round: what diffprob_clean prunes
    assert f"the flagged set changed by {change:.1%}" in r.stdout


def test_a_label_map_that_does_not_fit_the_dataset_is_refused():
    from utils.artifacts.files import ArtifactError
    from utils.models.build import class_tables

    to_model, to_dataset = class_tables({0: 1, 2: 0}, 3, "model.pt")
    assert to_model.tolist() == [1, -1, 0] and to_dataset.tolist() == [2, 0]
    with pytest.raises(ArtifactError, match="does not map onto this dataset"):
        class_tables({0: 0, 7: 1}, 3, "model.pt")
    with pytest.raises(ArtifactError, match="not 0..1"):
        class_tables({0: 0, 1: 5}, 3, "model.pt")


def test_pipeline_refuses_zero_rounds():
    r = run_script("run_pipeline.py", "--clean_rounds", "0", check=False)
    assert r.returncode == 2 and "--clean_rounds" in r.stderr


def test_measure_tool_prints_a_row_per_rule_and_the_cleanlab_reference(tiny, tmp_path):
    import dataclasses

    ds = open_dataset(tiny)
    cfg = parse_config(["--rec", str(tiny), "--output", str(tmp_path)])
    pred = ds.all_labels.copy()
    pred[noisy_indices(tiny)] = (pred[noisy_indices(tiny)] + 1) % ds.fingerprint.num_classes
    write_records(cfg, ds, pred)
    (paths.original_dir(cfg) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    r = run_script("tools/measure_cleaning.py", "--out", tmp_path)
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert {row.split(" | ")[0][2:] for row in rows} == set(registry.RULES) | {"cleanlab find_label_issues"}
    assert all(len(row.split(" | ")) == 8 for row in rows)
    r = run_script("tools/measure_cleaning.py", "--out", tmp_path / "nothing", check=False)
    assert r.returncode == 1 and "train the original model first" in r.stderr


def test_argmax_over_all_epochs_follows_the_papers_vote():
    """--use_all_epochs: per epoch p(label) or -1 where the arg-max is another identity, averaged; < 0 is removed."""
    import numpy as np

    from utils.cleaning.registry import flag_argmax
    from utils.artifacts.records import Records

    labels = np.array([0, 0, 1, 1])
    pred = np.array([1, 0, 1, 0])  # the last epoch's arg-max
    vote = np.mean([[-1.0, 0.9, 0.8, 0.3], [0.7, -1.0, 0.9, -1.0]], axis=0)  # [-0.15, -0.05, 0.85, -0.35]
    from config.config import parse_config

    cfg = parse_config([])
    rec = Records(cfg, labels, None, 2)
    rec._cache["scores"] = {"pred": pred, "pred_prob": np.full(4, 0.5), "argmax_vote": vote}
    flags = flag_argmax(rec, cfg)
    assert flags.index.tolist() == [0, 1, 3]  # sample 1: right at the last epoch, wrong on average
    del rec._cache["scores"]["argmax_vote"]
    assert flag_argmax(rec, cfg).index.tolist() == [0, 3]  # the last epoch alone
