"""run_pipeline.py --experiment noisy, end to end on the tiny profile (one run shared by the tests), its numbers
recomputed from the files it wrote, a second run that skips every step, and the inputs it refuses."""
import json

import numpy as np
import pytest

from tests.helpers import run_script
from utils.cleaning.geometry import center_angle_loop
from utils.pipeline.noisy import ROADS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy")
    r = run_script("run_pipeline.py", "--experiment", "noisy", "--profile", "tiny", "--out", out, "--clean_rounds", "2")
    return out, r, json.loads((out / "noisy_results.json").read_text())


def _noise(out):
    noise = json.loads((out / "data" / "noise.json").read_text())
    flips = {e["index"] for e in noise["flipped"]}
    opens = {e["index"] for e in noise["open_set"]}
    return noise, flips, opens


def test_every_road_is_trained_evaluated_and_costed(noisy):
    out, r, results = noisy
    noise, flips, opens = _noise(out)
    assert results["dataset"]["flipped"] == len(flips) and results["dataset"]["open_set"] == len(opens)
    assert round(len(flips) / noise["num_images"], 2) == 0.15 and round(len(opens) / noise["num_images"], 2) == 0.05
    runs = {x["road"]: x for x in results["runs"]}
    assert set(runs) == set(ROADS)
    n = noise["num_images"]
    for road in ("cosface", "arcface", "robustface", "subcenter", "interclass"):
        assert runs[road]["num_images"] == n and runs[road]["cost"] == 1.0
    assert runs["noise_free"]["num_images"] == n - len(flips) - len(opens)
    np.testing.assert_array_equal(np.load(out / "noise_free_kept.npy"),
                                  np.setdiff1d(np.arange(n), sorted(flips | opens)))
    full = runs["cosface"]["sample_passes"]
    assert runs["clean"]["cost"] == pytest.approx(1 + runs["clean"]["sample_passes"] / full)
    for x in runs.values():
        assert x["mean_accuracy"] == pytest.approx(np.mean(list(x["verification"].values())))
        assert set(x["ijb"]) >= {"TAR@FAR=1e-4"}
    filtered = runs["interclass"]["interclass_filtered"]
    assert len(filtered) == 3 and sum(filtered) > 0
    text = (out / "noisy_results.md").read_text()
    assert text in r.stdout and all(title in text for title in ROADS.values())
    assert (out / "noisy_results.png").stat().st_size > 10_000


def test_the_clean_road_trains_on_what_the_rule_keeps(noisy):
    out, _, results = noisy
    scores = np.load(out / "runs" / "scores" / "smallnet_CosFace_last.npz")
    flagged = center_angle_loop(scores["label_cos"], scores["other_cos"], scores["label"], int(scores["label"].max()) + 1)
    kept = np.load(out / "runs" / "clean" / "smallnet_CosFace" / "kept_index.npy")
    np.testing.assert_array_equal(kept, np.setdiff1d(np.arange(scores["label"].size), flagged))
    clean = next(x for x in results["runs"] if x["road"] == "clean")
    assert clean["num_images"] == kept.size
    folder = out / "runs" / "clean" / "smallnet_CosFace"  # the lists and the sheet, as for every rule
    mislabeled, outliers = np.load(folder / "mislabeled.npy"), np.load(folder / "outliers.npy")
    assert mislabeled.size + outliers.size == flagged.size and (folder / "contact_sheet.png").exists()
    assert len((folder / "mislabeled.csv").read_text().splitlines()) == mislabeled.size + 1
    _, flips, opens = _noise(out)
    q = results["cleaning"][0]["center_angle"]
    hit = len(set(flagged.tolist()) & (flips | opens))
    assert q["flagged"] == flagged.size and q["precision"] == pytest.approx(hit / flagged.size)
    assert q["recall"] == pytest.approx(hit / len(flips | opens))
    assert q["recall_flips"] == pytest.approx(len(set(flagged.tolist()) & flips) / len(flips))
    assert q["recall_intruders"] == pytest.approx(len(set(flagged.tolist()) & opens) / len(opens))


def test_the_iterative_road_ends_on_its_last_rounds_list(noisy):
    out, _, results = noisy
    rounds = out / "runs" / "clean" / "smallnet_RobustFace"
    assert (rounds / "round_2" / "scores" / "smallnet_RobustFace_last.npz").exists()
    last = np.load(rounds / "round_2" / "kept_index.npy")
    iterative = next(x for x in results["runs"] if x["road"] == "iterative")
    assert iterative["num_images"] == last.size and "round_2" in iterative["model_dir"]
    assert set(results["cleaning"][0]) >= {"argmax", "trajectory", "confident_learning", "center_angle", "subcenter",
                                           "iterative round 1", "iterative round 2"}


def test_a_second_run_skips_every_step_and_gives_the_same_table(noisy):
    out, _, results = noisy
    r = run_script("run_pipeline.py", "--experiment", "noisy", "--profile", "tiny", "--out", out, "--clean_rounds", "2")
    assert "0 steps run" in r.stdout
    again = json.loads((out / "noisy_results.json").read_text())
    assert again["runs"] == results["runs"] and again["cleaning"] == results["cleaning"]


@pytest.mark.parametrize("args, message", [
    (["--methods", "rand"], "--experiment noisy trains its own roads: --methods do not apply"),
    (["--set", "clean_rule=nonsense"], "clean_rule='nonsense' is not one of argmax"),
])
def test_what_the_noisy_experiment_refuses(tmp_path, args, message):
    r = run_script("run_pipeline.py", "--experiment", "noisy", "--profile", "tiny", "--out", tmp_path / "o", *args,
                   check=False)
    assert r.returncode != 0 and message in r.stderr + r.stdout
    assert not (tmp_path / "o").exists()
