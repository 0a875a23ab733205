"""Images that cannot be decoded, from scoring to the kept lists (`--skip_bad_images true`).

eval_trainset.py gives such an image no score (NaN, pred -1) and lists it in its manifest; every consumer of the
scores (the selections that read them, cleaning) leaves it out of its kept list as if the dataset did not hold
it, and says so in one line. Without the flag, scoring stops at the image with one line naming its record.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from config.config import parse_config
from tests.helpers import TINY_TRAIN, as_a_terminal_shows, make_tiny_dataset, run_as_user, run_script, zero_image_of
from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, load_kept_index, read_array, read_manifest, save_array
from utils.artifacts.records import Records, load_scores
from utils.cleaning.rules import SparseProbs, confident_learning
from utils.data.datasets import open_dataset
from utils.models.build import new_backbone
from utils.models.checkpoint import save_checkpoint
from utils.runtime.context import Context
from utils.selection import diffprob as diffprob_rule
from utils.selection import registry as selection
from utils.selection.keep import keep_top_per_identity
from utils.selection.ranking import ranking_table

BAD = 395  # the first image of its identity (the contact sheet's pick to show it) and a label flip in noise.json
MODEL_KEYS = ["--checkpoint", "backbone.pth", "--head_checkpoint", "header.pth"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def bad_rec(tiny, tmp_path_factory):
    """The tiny dataset with sample BAD's image zeroed (its record no longer decodes); (folder, record key)."""
    rec = tmp_path_factory.mktemp("bad") / "rec"
    shutil.copytree(tiny, rec, ignore=shutil.ignore_patterns("ijb", "*.bin"))
    return rec, zero_image_of(rec, BAD)


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """A random backbone.pth and header.pth as a user brings them: scoring needs a model, not a trained one."""
    folder = tmp_path_factory.mktemp("models")
    cfg = parse_config(["--rec", str(tiny), *TINY_TRAIN])
    torch.manual_seed(0)
    save_checkpoint(folder / "backbone.pth", new_backbone(cfg, 32).state_dict())
    save_checkpoint(folder / "header.pth", {"weight": torch.randn(16, cfg.embedding_size)})
    return folder


def keys(rec, out, models, *extra) -> list:
    return ["--rec", rec, "--output", out, *TINY_TRAIN, "--checkpoint", models / "backbone.pth",
            "--head_checkpoint", models / "header.pth", *extra]


# ------------------------------------------------------------------------------------------- scoring
def test_scoring_with_skip_bad_images_gives_the_bad_image_no_score_and_lists_it(tiny, bad_rec, models, tmp_path):
    import eval_trainset

    rec, key = bad_rec
    r = run_script("eval_trainset.py", *keys(rec, tmp_path / "out", models, "--skip_bad_images", "true"))
    cfg = parse_config([str(k) for k in keys(rec, tmp_path / "out", models)])
    path = paths.scores_path(cfg)
    manifest = paths.manifest_path(path)
    assert [line for line in r.stdout.splitlines() if line.startswith("skip_bad_images")] == [
        f"skip_bad_images: 1 of 448 images could not be decoded and have no score (NaN, pred -1): sample {BAD} "
        f"(record key {key}); every one is listed as 'unscored' in {manifest}"]
    info = read_manifest(path)["info"]
    assert info["unscored"] == [BAD] and info["unscored_record_key"] == [key]
    scores = read_array(path)
    others = np.arange(448) != BAD
    for name in ("gt_prob_with_margin", "gt_prob", "pred_prob"):
        assert np.flatnonzero(np.isnan(scores[name])).tolist() == [BAD], name
    assert scores["pred"][BAD] == -1 and scores["label"][BAD] == open_dataset(tiny).all_labels[BAD]
    # every other image is scored as on the intact dataset (nothing shifted)
    intact = read_array(eval_trainset.score_trainset(
        parse_config([str(k) for k in keys(tiny, tmp_path / "intact", models)]), Context()))
    assert np.array_equal(scores["pred"][others], intact["pred"][others])
    for name in ("gt_prob_with_margin", "gt_prob", "pred_prob"):
        np.testing.assert_allclose(scores[name][others], intact[name][others], rtol=1e-5, err_msg=name)
    assert np.array_equal(load_scores(cfg, open_dataset(rec).fingerprint)["pred"], scores["pred"])  # readers take it


def test_scoring_without_the_flag_stops_at_the_bad_image_in_one_line(bad_rec, models, tmp_path):
    rec, key = bad_rec
    r = run_as_user("eval_trainset.py", *keys(rec, tmp_path / "out", models))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert as_a_terminal_shows(r.stderr) == [
        f"eval_trainset: error: {rec / 'train.rec'}: record key {key} (sample {BAD}) is not an image OpenCV can "
        f"decode; rerun with --skip_bad_images true to train without it, or replace the file"]
    assert not (tmp_path / "out" / "scores").exists() or not any((tmp_path / "out" / "scores").iterdir())


def test_scores_with_a_nan_the_manifest_does_not_list_are_refused(bad_rec, tmp_path):
    rec, _ = bad_rec
    cfg = parse_config(["--rec", str(rec), "--output", str(tmp_path)])
    ds = open_dataset(rec)
    prob = np.full(448, 0.5, np.float32)
    prob[BAD] = np.nan
    pred = ds.all_labels.copy()
    pred[BAD] = -1
    arrays = {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred, "pred_prob": prob, "label": ds.all_labels}
    save_array(paths.scores_path(cfg), arrays, "eval_trainset", ds.fingerprint, cfg)
    with pytest.raises(ArtifactError, match=rf"'gt_prob_with_margin' is NaN or infinite for 1 images \(e.g. sample "
                                            rf"{BAD}\); eval_trainset.py writes finite probabilities"):
        load_scores(cfg, ds.fingerprint)
    save_array(paths.scores_path(cfg), {**arrays, "gt_prob": np.full(448, 0.5, np.float32)}, "eval_trainset",
               ds.fingerprint, cfg, info={"unscored": [BAD]})
    with pytest.raises(ArtifactError, match=rf"'gt_prob' holds a value for a sample its manifest lists as unscored "
                                            rf"\(sample {BAD}\)"):
        load_scores(cfg, ds.fingerprint)


# ------------------------------------------------------------------------------------------ selection
# Two identities of six; sample 2 has no score. Hand-derived DiffProb at t = 0.1, MIN = 2: identity 0's scored
# probabilities ascending are 0:.10 5:.30 1:.50 3:.52 4:.90; from .90 the scan keeps .52 (gap .38), drops .50
# (.02), keeps .30 (.22) and .10 (.20): {0, 3, 4, 5}. Identity 1: .95 keeps .61, drops .60, keeps .40, .25,
# drops .20: {7, 9, 10, 11}.
LABELS = np.repeat([0, 1], 6)
PROB = np.array([0.10, 0.50, np.nan, 0.52, 0.90, 0.30, 0.20, 0.25, 0.60, 0.61, 0.95, 0.40])
UNSCORED = 2


def records(cfg, prob=PROB, labels=LABELS) -> Records:
    pred = np.where(np.isnan(prob), -1, labels)
    rec = Records(cfg, labels, None, 2)
    rec._cache["scores"] = {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred, "pred_prob": prob,
                            "label": labels}
    return rec


def test_diffprob_never_keeps_an_unscored_sample_and_selects_as_if_it_were_removed(capsys):
    cfg = parse_config(["--threshold", "0.1", "--min_samples_per_id", "2"])
    method = selection.get_method("diffprob")
    sel = selection.run_selection(method, records(cfg), cfg)
    assert sel.kept.tolist() == [0, 3, 4, 5, 7, 9, 10, 11]
    assert sel.info["unscored"] == [UNSCORED] and sel.rank[UNSCORED] == -1 and np.isnan(sel.scores[UNSCORED])
    scored = np.flatnonzero(~np.isnan(PROB))
    removed = diffprob_rule.diffprob(PROB[scored], LABELS[scored], 0.1, 2)
    assert sel.kept.tolist() == scored[removed].tolist()
    # by fraction: the fraction is of the scored samples, as on the data without the sample
    cfg = parse_config(["--fraction", "0.5", "--min_samples_per_id", "2"])
    sel = selection.run_selection(method, records(cfg), cfg)
    kept, threshold = diffprob_rule.diffprob_for_fraction(PROB[scored], LABELS[scored], 0.5, 2)
    assert sel.kept.tolist() == scored[kept].tolist() and sel.info["threshold"] == threshold
    table = ranking_table(LABELS, sel.kept, sel.rank, sel.scores)  # the ranking puts it last in its identity
    assert not table["kept"][UNSCORED] and table["rank_in_identity"][UNSCORED] == 5
    assert np.isnan(table["score"][UNSCORED])


def test_per_identity_quotas_count_only_scored_samples(monkeypatch):
    """A keep-k-by-score method over the scores: identity 0 has 5 scored samples, so fraction 0.5 keeps
    int(5 * 0.5) = 2 of it (its two highest, 4:.90 and 3:.52), not int(6 * 0.5) = 3; identity 1 keeps 3."""
    monkeypatch.setattr(selection, "METHODS", dict(selection.METHODS))

    @selection.register_method("top_prob", title="top p(label)", needs=("scores",), summary="per identity, top p")
    def select_top_prob(rec, cfg):
        kept, rank = keep_top_per_identity(rec.scores["gt_prob_with_margin"], rec.labels, cfg.fraction,
                                           cfg.min_samples_per_id, return_rank=True)
        return selection.Selection(kept, rec.scores["gt_prob_with_margin"], rank=rank, nested=True)

    cfg = parse_config(["--fraction", "0.5", "--min_samples_per_id", "1"])
    sel = selection.run_selection(selection.get_method("top_prob"), records(cfg), cfg)
    assert sel.kept.tolist() == [3, 4, 8, 9, 10]
    assert sel.rank.tolist() == [4, 2, -1, 1, 0, 3, 5, 4, 2, 1, 0, 3]


# ----------------------------------------------------------------------------------- cleaning and stages
def test_cleaning_and_diffprob_leave_the_unscored_image_out_and_do_not_count_it_as_noise(bad_rec, tmp_path, capsys):
    """Scores as eval_trainset.py --skip_bad_images writes them for the damaged dataset: the arg-max disagrees with
    the label at 12 (a flip in noise.json), 16 (open set) and 390 (clean); BAD (a flip, never decoded) has no score.
    Cleaning flags exactly 12, 16, 390 (2 true positives, not 3) and keeps everything else but BAD. Its contact
    sheet shows 390's suggested identity, BAD's, by another image than BAD (the first image of that identity)."""
    import clean_trainset
    import eval_simprobs

    rec, key = bad_rec
    cfg = parse_config(["--rec", str(rec), "--output", str(tmp_path), "--min_samples_per_id", "2"])
    ds = open_dataset(rec)
    labels, n = ds.all_labels, ds.num_images
    noise = json.loads((rec / "noise.json").read_text())
    assert BAD in [e["index"] for e in noise["flipped"]] and labels[BAD] != labels[BAD - 1]
    assert (labels[390] + 1) % 16 == labels[BAD] and 390 not in [e["index"] for e in noise["open_set"]]
    prob = np.random.default_rng(0).random(n).astype(np.float32)
    prob[BAD] = np.nan
    pred = labels.copy()
    pred[[12, 16, 390]] = (labels[[12, 16, 390]] + 1) % 16
    pred[BAD] = -1
    save_array(paths.scores_path(cfg), {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred,
                                        "pred_prob": prob, "label": labels}, "eval_trainset", ds.fingerprint, cfg,
               info={"unscored": [BAD], "unscored_record_key": [key]})

    info = clean_trainset.run_clean(cfg)
    folder = paths.clean_dir(cfg)
    assert load_kept_index(folder / "kept_index.npy", ds.fingerprint).tolist() == \
        sorted(set(range(n)) - {12, 16, 390, BAD})
    assert read_array(folder / "flagged.npy").tolist() == [12, 16, 390]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["unscored"] == [BAD] == info["unscored"]
    assert (summary["removed"], summary["kept"]) == (3, n - 4)
    assert (summary["quality"]["removed"], summary["quality"]["true_positives"]) == (3, 2)
    assert (folder / "contact_sheet.png").exists()
    out = capsys.readouterr().out
    assert f"1 sample has no score (bad images): left out of the kept list (sample {BAD})" in out.splitlines()

    eval_simprobs.run_diffprob(cfg)
    kept = load_kept_index(paths.coreset_dir(cfg, "diffprob") / "kept_index.npy", ds.fingerprint)
    scored = np.flatnonzero(~np.isnan(prob))
    expect, _ = diffprob_rule.diffprob_for_fraction(prob[scored], labels[scored], 0.5, 2)
    assert kept.tolist() == scored[expect].tolist()
    out = capsys.readouterr().out
    assert f"1 sample has no score (bad images): left out of the kept list (sample {BAD})" in out.splitlines()


def test_confident_learning_thresholds_ignore_a_sample_without_a_probability():
    """Samples 0-2 and 6 are labelled 0, 3-5 labelled 1; sample 6 has no probability (unscored). Class 0's
    threshold is the mean of .9, .8, .3 = 2/3 (counting sample 6 as 0 would give .5 and flag sample 5, whose
    p(class 0) = .6); class 1's is the mean of .8, .9, .4 = .7. Only sample 2 (p(class 1) = .7) is flagged, as on
    the data without sample 6."""
    labels = np.array([0, 0, 0, 1, 1, 1, 0])
    p0 = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.6, np.nan])
    pred = np.where(np.isnan(p0), -1, (p0 < 0.5).astype(np.int64))
    pred_prob = np.where(pred == 0, p0, 1 - p0)
    label_prob = np.where(labels == 0, p0, 1 - p0)

    def run(keep):
        probs = SparseProbs(pred[keep, None], pred_prob[keep, None], label_prob[keep], np.full(keep.size, np.nan))
        return confident_learning(probs, labels[keep], 2)

    issue, _, _, thresholds = run(np.arange(7))
    np.testing.assert_allclose(thresholds, [2 / 3, 0.7])
    assert np.flatnonzero(issue).tolist() == [2]
    issue_removed, _, _, thresholds_removed = run(np.arange(6))
    assert np.array_equal(issue[:6], issue_removed) and np.array_equal(thresholds, thresholds_removed)
