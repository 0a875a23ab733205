"""Scoring-consumer stages (clean, DiffProb, DynUnc, Rand, entropy, label dict/map) on a tiny real dataset
with crafted score files: outputs, rules, and the errors users cause."""
import json

import numpy as np
import pytest

from config.config import parse_config
from tests.helpers import make_tiny_dataset, run_script, write_random_topk
from utils.artifacts import paths
from utils import pruning
from utils.artifacts.files import load_array, load_kept_index, load_label_map, save_array
from utils.data.datasets import open_dataset
from utils.dynamics.soft_labels import soft_label_entropy


def summary_line(method, kept, labels):
    """The start of the line a selection stage prints: its kept images and identities, counted here."""
    n, n_ids, kept_ids = labels.size, np.unique(labels).size, np.unique(labels[kept]).size
    return f"{method}: kept {kept.size:,} of {n:,} images ({kept.size / n:.2%}), {kept_ids:,} of {n_ids:,} identities"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def setup(tiny, tmp_path):
    """Score, history and top-k files as the training/scoring stages would write them."""
    ds = open_dataset(tiny)
    labels, fp, n = ds.all_labels, ds.fingerprint, ds.num_images
    rng = np.random.default_rng(0)
    args = ["--rec", str(tiny), "--output", str(tmp_path), "--window", "3"]
    cfg = parse_config(args)
    noise = json.loads((tiny / "noise.json").read_text())
    noisy = np.array([e["index"] for e in noise["flipped"] + noise["open_set"]], dtype=np.int64)
    pred = labels.copy()
    pred[noisy] = (labels[noisy] + 1) % fp.num_classes  # the model disagrees with every noisy label ...
    pred[:3] = (labels[:3] + 1) % fp.num_classes  # ... and with 3 clean ones
    last_id = labels.max()
    pred[labels == last_id] = 0  # one identity loses every sample: it vanishes
    prob = rng.random(n).astype(np.float32)
    save_array(paths.scores_path(cfg), {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred,
                                        "pred_prob": np.ones(n, np.float32), "label": labels}, "eval_trainset", fp)
    hist = rng.random((6, n)).astype(np.float32)
    hist[2, ::7] = np.nan
    save_array(paths.prob_history_path(cfg), hist, "train_everything", fp)
    write_random_topk(cfg, fp, rng)
    return dict(args=args, cfg=cfg, labels=labels, fp=fp, prob=prob, hist=hist, noisy=noisy, pred=pred,
                vanished=int(last_id))


def test_clean_removes_disagreeing_samples_and_renumbers(setup):
    r = run_script("clean_trainset.py", *setup["args"], "--relabel", "true")
    cfg, fp, labels = setup["cfg"], setup["fp"], setup["labels"]
    d = paths.clean_dir(cfg)
    kept = load_kept_index(d / "kept_index.npy", fp)
    assert np.array_equal(kept, np.flatnonzero(setup["pred"] == labels))
    label_map = load_label_map(d / "label_map.json", fp)
    assert setup["vanished"] not in label_map and sorted(label_map.values()) == list(range(len(label_map)))
    # every noisy sample is flagged, and so are 3 clean ones and the vanished identity's clean samples:
    # recall 1, precision = noisy / flagged
    flagged = np.flatnonzero(setup["pred"] != labels)
    assert set(setup["noisy"]) <= set(flagged)
    precision = setup["noisy"].size / flagged.size
    n_ids = np.unique(labels).size
    assert f"removed {flagged.size} of {labels.size} samples" in r.stdout
    assert f"1 of {n_ids} identities vanish" in r.stdout
    assert f"precision {precision:.3f}, recall 1.000" in r.stdout
    q = json.loads((d / "summary.json").read_text())["quality"]
    assert q["recall"] == 1.0 and q["precision"] == pytest.approx(precision, abs=1e-12) and precision < 1.0
    relabel = load_array(d / "relabel.npz", fp)
    assert np.array_equal(relabel["suggested_label"], setup["pred"][relabel["index"]])


@pytest.mark.parametrize("extra", [["--threshold", "0.05"], ["--fraction", "0.6"]])
def test_diffprob_stage_matches_library(setup, extra):
    r = run_script("eval_simprobs.py", *setup["args"], *extra)
    cfg = parse_config(setup["args"] + extra)
    out = paths.coreset_dir(cfg, "diffprob")
    kept = load_kept_index(out / "kept_index.npy", setup["fp"])
    t = 0.05 if "--threshold" in extra else pruning.diffprob_threshold_for_fraction(setup["prob"], setup["labels"], 0.6)
    assert np.array_equal(kept, pruning.diffprob(setup["prob"], setup["labels"], t))
    for name in ("label_map.json", "plot.png", "summary.json", "kept_index.manifest.json"):
        assert (out / name).exists(), name
    labels = setup["labels"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["kept_images"], summary["identities_kept"], summary["identities"]) == \
        (kept.size, np.unique(labels[kept]).size, np.unique(labels).size)
    assert f"diffprob: threshold {t:.6g} keeps {kept.size / labels.size:.4f} of the images" in r.stdout
    assert summary_line("diffprob", kept, labels) in r.stdout


def test_diffprob_on_cleaned_set_excludes_flagged(setup):
    run_script("clean_trainset.py", *setup["args"])
    run_script("eval_simprobs.py", *setup["args"], "--coreset_method", "diffprob_clean", "--fraction", "0.5")
    cfg = parse_config(setup["args"] + ["--fraction", "0.5"])
    kept = load_kept_index(paths.kept_index_path(cfg, "diffprob_clean"), setup["fp"])
    assert not np.isin(kept, np.flatnonzero(setup["pred"] != setup["labels"])).any()
    label_map = load_label_map(paths.label_map_path(cfg, "diffprob_clean"), setup["fp"])
    assert setup["vanished"] not in label_map


def test_dynunc_rand_entropy_stages(setup):
    fp, labels = setup["fp"], setup["labels"]
    cfg = setup["cfg"]
    run_script("coreset_dynunc.py", *setup["args"])
    kept = load_kept_index(paths.kept_index_path(cfg, "dynunc"), fp)
    expect = pruning.keep_top_per_identity(pruning.dynunc_scores(setup["hist"], 3), labels, 0.5)
    assert np.array_equal(kept, expect)
    run_script("coreset_rand.py", *setup["args"], "--seed", "4")
    kept = load_kept_index(paths.kept_index_path(cfg, "rand"), fp)
    assert np.array_equal(kept, pruning.random_keep(labels, 0.5, seed=4))
    assert (paths.coreset_dir(cfg, "rand") / "plot.png").exists()
    run_script("coreset_entropy.py", *setup["args"])
    topk = load_array(paths.topk_history_path(cfg), fp)
    entropy = soft_label_entropy(topk["topk_logits"].astype(np.float32), topk["topk_index"],
                                         topk["rest_mean_logit"].astype(np.float32), fp.num_classes)
    expect = pruning.keep_top_per_identity(entropy, labels, 0.5)
    assert np.array_equal(load_kept_index(paths.kept_index_path(cfg, "entropy"), fp), expect)


def test_label_dict_and_label_mapping(setup):
    r = run_script("generate_label_dict.py", *setup["args"])
    d = load_array(paths.label_dict_path(setup["cfg"]), setup["fp"])
    labels = setup["labels"]
    for i, ident in enumerate(d["identities"]):
        end = d["starts"][i + 1] if i + 1 < len(d["starts"]) else len(d["order"])
        assert np.array_equal(d["order"][d["starts"][i]:end], np.flatnonzero(labels == ident))
    per_id = np.bincount(labels)[np.unique(labels)]
    assert (f"label dict: {labels.size} images, {per_id.size} identities (images per identity min {per_id.min()}, "
            f"median {int(np.median(per_id))}, max {per_id.max()})") in r.stdout
    run_script("coreset_rand.py", *setup["args"])
    kept_path = paths.kept_index_path(setup["cfg"], "rand")
    r = run_script("label_mapping.py", *setup["args"], "--kept_index", kept_path)
    kept = load_kept_index(kept_path, setup["fp"])
    assert load_label_map(kept_path.parent / "label_map.json", setup["fp"]) == pruning.label_map_for(kept, labels)
    n_ids = len(np.unique(labels))
    assert f"label map: {kept.size} kept images keep {n_ids} of {n_ids} identities (0 vanish)" in r.stdout


def test_paper_text_kept_list_is_accepted(setup, tmp_path):
    text = tmp_path / "kept_index.txt"
    ids = np.unique(setup["labels"])[:3]
    kept = np.flatnonzero(np.isin(setup["labels"], ids))
    text.write_text("kept_index = [" + ", ".join(map(str, kept)) + "]\n")
    r = run_script("label_mapping.py", *setup["args"], "--kept_index", text)
    n_ids = len(np.unique(setup["labels"]))
    assert f"label map: {kept.size} kept images keep 3 of {n_ids} identities ({n_ids - 3} vanish)" in r.stdout
    written = json.loads((tmp_path / "label_map.json").read_text())  # the map it wrote: the 3 identities, in order
    assert {int(k): v for k, v in written["map"].items()} == {int(ids[0]): 0, int(ids[1]): 1, int(ids[2]): 2}


def test_bad_inputs_exit_nonzero_and_write_nothing(setup, tmp_path):
    args, cfg, fp = setup["args"], setup["cfg"], setup["fp"]
    r = run_script("eval_simprobs.py", *args, "--fraction", "1.5", check=False)
    assert r.returncode == 2 and "fraction" in r.stderr
    r = run_script("eval_simprobs.py", *args, "--threshold", "-1", check=False)
    assert r.returncode == 2 and "threshold" in r.stderr
    other = ["--rec", args[1], "--output", str(tmp_path / "empty")]
    r = run_script("eval_simprobs.py", *other, check=False)
    assert r.returncode == 1 and "missing scores" in r.stderr
    r = run_script("coreset_dynunc.py", *other, check=False)
    assert r.returncode == 1 and "is_original_train" in r.stderr
    # NaN probabilities and a file from another dataset are refused; no kept list appears
    bad = parse_config(other)
    prob = setup["prob"].copy()
    prob[5] = np.nan
    save_array(paths.scores_path(bad), {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": setup["labels"],
                                        "pred_prob": prob, "label": setup["labels"]}, "eval_trainset", fp)
    r = run_script("eval_simprobs.py", *other, check=False)
    assert r.returncode == 1 and "nan" in r.stderr.lower() and "Traceback" not in r.stderr
    assert not paths.coreset_dir(bad, "diffprob").exists()
    from utils.artifacts.files import Fingerprint

    save_array(paths.scores_path(bad), {"gt_prob_with_margin": setup["prob"]}, "eval_trainset",
               Fingerprint(fp.num_images, fp.num_classes + 1, fp.idx_size))
    r = run_script("clean_trainset.py", *other, check=False)
    assert r.returncode == 1 and "another dataset" in r.stderr
    assert not paths.clean_dir(bad).exists()


@pytest.mark.parametrize("method", ["el2n", "forgetting", "aum", "margin", "least_confidence", "ccs_el2n", "ccs_dynunc"])
def test_score_methods_through_coreset_select(setup, method):
    """Each registry entry selects what its library score and the keep-k (or CCS) helper give."""
    from utils.dynamics import scores
    from utils.selection import keep

    r = run_script("coreset_select.py", *setup["args"], "--coreset_method", method, "--seed", "3")
    cfg, fp, labels = setup["cfg"], setup["fp"], setup["labels"]
    t = load_array(paths.topk_history_path(cfg), fp)
    args = (t["topk_logits"], t["topk_index"], t["rest_mean_logit"])
    base = method.removeprefix("ccs_")
    values = {"el2n": lambda: scores.el2n_scores(*args, labels, fp.num_classes, -1, label_logit=t["label_logit"]),
              "forgetting": lambda: scores.forgetting_scores(t["topk_index"], labels, fp.num_classes),
              "aum": lambda: scores.aum_scores(*args, t["label_logit"], labels, fp.num_classes),
              "margin": lambda: scores.margin_scores(*args, fp.num_classes),
              "least_confidence": lambda: scores.least_confidence_scores(*args, fp.num_classes),
              "dynunc": lambda: pruning.dynunc_scores(setup["hist"], 3)}[base]()
    if method.startswith("ccs_"):
        expect = keep.ccs_keep(values, labels, 0.5, 5, beta=0.1, strata=50, seed=3)
    else:
        expect = pruning.keep_top_per_identity(values, labels, 0.5)
    out = paths.coreset_dir(parse_config(setup["args"] + ["--coreset_method", method]))
    assert np.array_equal(load_kept_index(out / "kept_index.npy", fp), expect)
    assert (out / "plot.png").exists() and f"{method}: " in r.stdout
    assert summary_line(method, expect, labels) in r.stdout
