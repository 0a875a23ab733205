"""run_pipeline.py end to end at the tiny size: an interrupted run resumes, results follow the contract
(method, kept fraction, accuracies, TAR, cleaning quality), and each figure is the one its stage wrote."""
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_script
from tests.test_export import recordio_bytes
from utils.artifacts.files import load_kept_index
from utils.cleaning.quality import cleaning_quality
from utils.data.datasets import dataset_fingerprint, open_dataset
from utils.evaluation.report import mean_accuracy

pytestmark = pytest.mark.slow

METHODS = {"full", "rand", "dynunc", "diffprob", "diffprob_clean", "entropy", "ucb"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "demo"
    first = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--stop_after", "4")
    second = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--jobs", "2")
    return out, first.stdout, second.stdout


def test_interrupted_pipeline_resumes_without_redoing_stages(pipeline):
    out, first, second = pipeline
    assert "stopped after step 4" in first
    for n in (1, 2, 3, 4):
        line = next(x for x in second.splitlines() if x.startswith(f"[{n:2d}]"))
        assert "complete, skipped" in line, line
    assert "[ 5] label dictionary ..." in second  # step 5 onwards did run in the second call


def test_results_follow_the_contract(pipeline):
    out, _, second = pipeline
    for name in ("results.json", "results.csv", "results.md", "results.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert {"num_images", "num_classes"} <= set(res["dataset"])
    assert {r["method"] for r in res["runs"]} == METHODS
    ijb = json.loads((out / "ijb" / "ijb_results.json").read_text())["models"]
    fp = dataset_fingerprint(out / "data")
    full = next(r for r in res["runs"] if r["method"] == "full")
    for r in res["runs"]:
        assert {"method", "kept_fraction", "num_images", "num_classes", "verification", "ijb", "train_seconds"} <= set(r)
        summary = json.loads((Path(r["model_dir"]) / "train_summary.json").read_text())
        # every figure is the one its stage wrote
        assert r["num_images"] == summary["num_images"] and r["train_seconds"] == summary["train_seconds"]
        assert r["kept_fraction"] == summary["num_images"] / fp.num_images
        assert r["verification"] == summary["verification"] and set(r["verification"]) == {"syn_frontal", "syn_pose"}
        name = r["method"] + f"_{r['requested_fraction']:.2f}"
        assert r["ijb"]["TAR@FAR=1e-4"] == ijb[name]["1:1"]["TAR@FAR=1e-4"]
        # the cost: images trained on over the full-data run's; the static methods that read the original model's
        # scores or records pay for that run too (it is the full-data run here), Rand and UCB do not
        assert r["sample_passes"] == sum(summary["samples_per_epoch"])
        assert r["cost"] == r["sample_passes"] / full["sample_passes"]
        scored = r["method"] in ("dynunc", "diffprob", "diffprob_clean", "entropy")
        assert r["cost_with_scoring"] == r["cost"] + (1.0 if scored else 0.0)
        if r["method"] == "ucb":  # 3 epochs, anneal 0.875: epochs 2 and 3 prune at the ratio of cost 0.5, 3 * 0.5 / 2
            n, batch = fp.num_images, 64
            assert r["dynamic"] == {"method": "ucb", "ratio": 0.75, "anneal": 0.875}
            assert r["sample_passes"] == n // batch * batch + 2 * (math.ceil(0.25 * n) // batch * batch)
        if r["method"] in ("full", "ucb"):  # UCB: the full data, pruned as it trains
            assert r["kept_fraction"] == 1.0 and r["num_images"] == res["dataset"]["num_images"]
        else:
            kept = load_kept_index(next((out / "runs" / "coresets").glob(f"*/{name}/kept_index.npy")), fp)
            assert r["num_images"] == kept.size
    clean = res["cleaning"]
    flagged = np.load(next((out / "runs" / "clean").glob("*/flagged.npy")))
    expect = cleaning_quality(flagged, json.loads((out / "data" / "noise.json").read_text()))
    assert clean == {k: expect[k] for k in clean} and clean["removed"] == flagged.size
    rows = list(csv.reader(open(out / "results.csv")))
    assert rows[0][0] == "method" and len(rows) == 1 + len(res["runs"])
    assert "| method | kept |" in (out / "results.md").read_text()
    assert "| DiffProb |" in second  # the table is printed
    exp = res["export"]  # the best kept set, written as a dataset
    best = max((r for r in res["runs"] if r["method"] != "full"), key=lambda r: (mean_accuracy(r), -r["kept_fraction"]))
    assert exp["kept_set"] == f"{best['method']}_{best['requested_fraction']:.2f}"
    exported = open_dataset(exp["folder"])
    assert exported.num_images == exp["images"] == best["num_images"]
    # the saving is the exported folder's against the source's, byte for byte on disk
    before, after = recordio_bytes(out / "data"), recordio_bytes(Path(exp["folder"]))
    assert (exp["bytes_before"], exp["bytes_after"]) == (before, after) and after < before
    saving = 100 * (before - after) / before
    assert exp["saving_percent"] == pytest.approx(saving, abs=1e-9)
    assert f"({saving:.1f}% saved) ->" in second
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_commands_on_the_trained_models(pipeline, tmp_path):
    out, _, _ = pipeline
    rec, runs = out / "data", out / "runs"
    full = next(runs.glob("original_*"))
    pruned = next((runs / "retrain").glob("*/diffprob_0.50_*"))
    keys = ["--rec", rec, "--output", runs, "--network", "smallnet", "--embedding_size", "64", "--num_workers", "0"]
    r = run_script("eval_verification.py", *keys, "--models", f"full={full},diffprob={pruned}", "--out", tmp_path)
    res = json.loads((tmp_path / "verification.json").read_text())
    assert set(res) == {"full", "diffprob"}
    # the same checkpoint on the same .bin files gives what training's last verification said
    trained = json.loads((full / "train_summary.json").read_text())["verification"]
    assert {t: v["accuracy_mean"] for t, v in res["full"]["targets"].items()} == pytest.approx(trained, abs=1e-12)
    assert "syn_pose" in r.stdout and "mean" in r.stdout
    r = run_script("eval_ijbc.py", *keys, "--models", f"full={full},diffprob={pruned}", "--out", tmp_path)
    ijb = json.loads((tmp_path / "ijb_results.json").read_text())
    assert set(ijb["models"]) == {"full", "diffprob"}
    # the pipeline evaluated the same weights (backbone.pth of the same epoch): the same TARs
    piped = json.loads((out / "ijb" / "ijb_results.json").read_text())["models"]
    assert ijb["models"]["full"]["1:1"] == pytest.approx(piped["full_1.00"]["1:1"], abs=1e-12)
    assert (tmp_path / "ijbc_roc.png").exists() and (tmp_path / "ijbc_tar_far.csv").exists()
    assert "TAR" in r.stdout
    r = run_script("eval_ijbc.py", *keys, "--ijb_root", tmp_path / "nowhere", check=False)
    assert r.returncode == 1 and "IJB release folder" in r.stderr


def test_a_forked_step_is_what_a_subprocess_step_is(pipeline, tmp_path):
    """The pipeline ran its steps forked (CPU), two trainings at a time; the same steps run as subprocesses, one
    training at a time, give the same kept list, the same weights and the same accuracies."""
    import shutil

    import torch

    out = tmp_path / "demo"
    shutil.copytree(pipeline[0], out)
    kept = out / "runs" / "coresets" / "smallnet_CosFace" / "rand_0.50"
    model = out / "runs" / "retrain" / "smallnet_CosFace" / "rand_0.50_smallnet_CosFace"
    before = {"kept": (kept / "kept_index.npy").read_bytes(),
              "summary": json.loads((model / "train_summary.json").read_text()),
              "weights": torch.load(model / "backbone.pth", weights_only=True)}
    shutil.rmtree(kept)
    shutil.rmtree(model)
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--runner", "subprocess", "--export", "none",
                   "--jobs", "1")
    assert "prune: Rand 50% ..." in r.stdout and "retrain: Rand 50% ..." in r.stdout
    assert "as a dataset" not in r.stdout and "export" not in json.loads((out / "results.json").read_text())
    assert (kept / "kept_index.npy").read_bytes() == before["kept"]
    summary = json.loads((model / "train_summary.json").read_text())
    assert summary["verification"] == before["summary"]["verification"] and summary["steps"] == before["summary"]["steps"]
    weights = torch.load(model / "backbone.pth", weights_only=True)
    assert weights.keys() == before["weights"].keys()
    assert all(torch.equal(weights[k], before["weights"][k]) for k in weights)


def test_seeds_and_other_losses_on_the_same_kept_lists(pipeline):
    """--seeds 2 retrains every configuration with a second seed (Rand selects again with it; DiffProb's list is
    the same), --retrain_losses retrains the same lists with another loss; the table gives mean +- std."""
    out, _, _ = pipeline
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--methods", "rand,diffprob",
                   "--seeds", "2", "--retrain_losses", "ArcFace", timeout=1800)
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == 2
    by = {(x["method"], x["seed_offset"], x["trainee"]): x for x in res["runs"]}
    assert set(by) == {(m, s, "smallnet_CosFace") for m in ("full", "rand", "diffprob") for s in (0, 1)} | \
        {(m, 0, "smallnet_ArcFace") for m in ("full", "rand", "diffprob")}
    fp = dataset_fingerprint(out / "data")
    runs = out / "runs"
    rand0 = load_kept_index(runs / "coresets" / "smallnet_CosFace" / "rand_0.50" / "kept_index.npy", fp)
    rand1 = load_kept_index(runs / "seed1" / "coresets" / "smallnet_CosFace" / "rand_0.50" / "kept_index.npy", fp)
    assert not np.array_equal(rand0, rand1) and rand0.size == rand1.size  # reseeded, same per-identity budget
    assert by[("diffprob", 1, "smallnet_CosFace")]["num_images"] == by[("diffprob", 0, "smallnet_CosFace")]["num_images"]
    arc = json.loads((runs / "retrain" / "smallnet_CosFace" / "diffprob_0.50_smallnet_ArcFace" / "config.json")
                     .read_text())
    assert arc["loss"] == "ArcFace" and arc["original_net_loss"] == "CosFace"
    md = (out / "results.md").read_text()
    # kept, cost, + scoring (DiffProb pays the scoring run: 1 more), seeds, mean ± std
    assert re.search(r"^\| Rand \| smallnet_CosFace \| [0-9.]+% \| 0\.50 \| 0\.50 \| 2 \| [0-9.]+ ± [0-9.]+ \|", md,
                     re.M), md
    assert "vs Rand" in md and re.search(r"^\| DiffProb \| smallnet_ArcFace \| [0-9.]+% \| 0\.50 \| 1\.50 \| 1 \|", md,
                                         re.M), md
    assert md in r.stdout
    # with seeds, the exported kept set is the best by its mean over the seeds
    mean = {}
    for x in res["runs"]:
        if x["method"] != "full" and x["trainee"] == "smallnet_CosFace":
            mean.setdefault(f"{x['method']}_{x['requested_fraction']:.2f}", []).append(mean_accuracy(x))
    mean = {tag: sum(v) / len(v) for tag, v in mean.items()}
    assert res["export"]["seeds"] == 2 and res["export"]["kept_set"] == max(mean, key=mean.get)
    assert res["export"]["mean_accuracy"] == mean[res["export"]["kept_set"]]
    assert "mean accuracy over 2 seeds) as a dataset" in r.stdout


def test_generator_options_reach_the_data_and_a_resume_must_match_them(tmp_path):
    """`--data key=value` sets the synthetic generator's options over the profile's (here a highly redundant
    set); a later run on the same folder with other options is refused instead of reusing the old data."""
    out = tmp_path / "redundant"
    asked = ["--data", "redundancy=0.4", "redundant_id_share=1", "flip_rate=0.1"]
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--stop_after", "1", *asked)
    assert "stopped after step 1" in r.stdout
    made = json.loads((out / "data" / "dataset.json").read_text())
    assert made["config"]["redundancy"] == 0.4 and made["config"]["redundant_id_share"] == 1.0
    assert made["config"]["flip_rate"] == 0.1 and made["config"]["num_ids"] == 24  # the profile's, kept
    truth = json.loads((out / "data" / "redundancy.json").read_text())
    # every identity may hold re-shoots, and the realised share is close to the asked one (the first clean
    # image of an identity and its noisy images never re-shoot, so it is lower)
    assert len(truth["redundant_identities"]) == 24
    assert 0.25 < truth["share"] <= 0.4, truth["share"]
    before = (out / "data" / "train.rec").stat().st_mtime_ns

    again = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--stop_after", "1", *asked)
    assert "[ 1] make the synthetic dataset: complete, skipped" in again.stdout

    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--stop_after", "1",
                   "--data", "redundancy=0.2", check=False)
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "made with other generator options" in err[0], r.stderr
    assert "redundancy=0.4 (asked: 0.2)" in err[0] and "redundant_id_share=1.0 (asked: 0.3)" in err[0], err[0]
    assert (out / "data" / "train.rec").stat().st_mtime_ns == before  # the data was left alone


@pytest.mark.parametrize("data, message", [
    (["foo=1"], "--data foo: not an option of the synthetic generator"),
    (["redundancy=0.9"], "redundancy must lie in [0, 0.7 * redundant_id_share]"),
    (["redundancy=lots"], "argument --redundancy: invalid float value: 'lots'"),
    (["redundancy"], "--data expects KEY=VALUE, got 'redundancy'"),
])
def test_bad_generator_options_are_refused_before_anything_is_made(tmp_path, data, message):
    out = tmp_path / "demo"
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--data", *data, check=False)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_generator_options_do_not_apply_to_a_real_dataset(tmp_path):
    r = run_script("run_pipeline.py", "--rec", tmp_path, "--data", "redundancy=0.5", check=False)
    assert r.returncode == 2 and "--data sets the synthetic generator's options" in r.stderr, r.stderr


def test_export_names_a_kept_set_of_the_run_before_any_work(tmp_path):
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", tmp_path / "x", "--export", "diffprob_0.30",
                   check=False)
    assert r.returncode == 2 and r.stderr.splitlines()[-1] == (
        "run_pipeline.py: error: --export diffprob_0.30: not a kept set of this run; one of rand_0.50, dynunc_0.50, "
        "diffprob_0.50, diffprob_clean_0.50, entropy_0.50 (or best, none)")
    assert not (tmp_path / "x").exists()


def test_early_scoring_selects_from_the_first_epochs_and_counts_them(pipeline):
    """--score_epochs 2: DiffProb also selects from the original model's checkpoint 2 (scores under the scorer tag
    smallnet_CosFace_e2), retrains on that list, and its cost with scoring counts the original's first 2 epochs."""
    out, _, _ = pipeline
    r = run_script("run_pipeline.py", "--profile", "tiny", "--out", out, "--methods", "diffprob", "--score_epochs", "2",
                   "--export", "none")
    assert "score the training set with epoch 2's model ..." in r.stdout
    assert "retrain: DiffProb 50% (epochs 1-2) ..." in r.stdout
    fp = dataset_fingerprint(out / "data")
    early_scores = out / "runs" / "scores" / "smallnet_CosFace_e2_epoch002.npz"
    manifest = json.loads(early_scores.with_suffix(".manifest.json").read_text())
    assert manifest["config"]["eval_epoch"] == 2 and manifest["config"]["score_epochs"] == 2
    kept = load_kept_index(out / "runs" / "coresets" / "smallnet_CosFace_e2" / "diffprob_0.50" / "kept_index.npy", fp)
    res = json.loads((out / "results.json").read_text())
    early = next(x for x in res["runs"] if x["score_epochs"] == 2)
    full = next(x for x in res["runs"] if x["method"] == "full")
    assert early["method"] == "diffprob" and early["num_images"] == kept.size
    assert Path(early["model_dir"]).parent.name == "smallnet_CosFace_e2"
    original = json.loads((out / "runs" / "original_smallnet_CosFace" / "train_summary.json").read_text())
    assert early["cost_with_scoring"] == early["cost"] + sum(original["samples_per_epoch"][:2]) / full["sample_passes"]
    assert "| DiffProb (epochs 1-2) |" in (out / "results.md").read_text()
