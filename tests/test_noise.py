"""make_noisy_dataset.py / utils.data.noise: closed-set flips and open-set replacements, with their ground truth."""
import json

import numpy as np
import pytest

from tests.helpers import run_script
from tests.test_export import assert_recordio_copy, copy_golden, make_tiny, records
from utils.artifacts.files import ArtifactError
from utils.data.noise import check_rates, inject_noise
from utils.data.recordio import read_layout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(tiny, other): a synthetic training set with its own noise.json, and a second one of other people."""
    folder = tmp_path_factory.mktemp("data")
    return make_tiny(folder / "tiny"), make_tiny(folder / "other", seed=2, val_pairs=0, ijb_templates=0)


def _payloads(folder) -> set:
    return {payload for key, (header, payload) in records(folder).items() if payload}


def test_noise_on_synthetic_record_by_record(data, tmp_path):
    src, other = data
    summary = inject_noise(src, tmp_path / "noisy", flip_rate=0.1, open_rate=0.05, open_from=other, seed=3,
                           progress=False)
    dst = tmp_path / "noisy"
    source = read_layout(src)
    n = source.num_images
    origin = np.load(dst / "origin_index.npy")
    noise = json.loads((dst / "noise.json").read_text())
    source_noise = json.loads((src / "noise.json").read_text())
    assert set(noise) == set(source_noise)  # the format utils/synthetic/generator.py writes
    assert (noise["flip_rate"], noise["open_rate"], noise["seed"]) == (0.1, 0.05, 3)
    assert (noise["num_images"], noise["num_classes"]) == (n, 8)

    new_index = np.argsort(origin)
    labels = source.labels[origin].copy()
    flipped = {e["index"]: e for e in noise["flipped"]}
    for j, e in flipped.items():
        labels[j] = e["label"]
    opened = {e["index"] for e in noise["open_set"]}
    # the source's own noise carries over; the injected noise is on top, on samples that were clean
    carried_flips = {int(new_index[e["index"]]) for e in source_noise["flipped"]}
    carried_open = {int(new_index[e["index"]]) for e in source_noise["open_set"]}
    for e in source_noise["flipped"]:
        assert flipped[int(new_index[e["index"]])] == {**e, "index": int(new_index[e["index"]])}
    injected_flips, injected_open = set(flipped) - carried_flips, opened - carried_open
    assert carried_open <= opened and len(injected_flips) == summary["flipped"] == round(0.1 * n)
    assert len(injected_open) == summary["open_set"] == round(0.05 * n)
    assert_recordio_copy(src, dst, origin, labels, 32, replaced=injected_open)
    assert np.array_equal(np.lexsort((origin, labels)), np.arange(n))  # by label, stable in source order
    for j in injected_flips:  # the image is the source's, under another identity's label
        assert flipped[j]["true_label"] == source.labels[origin[j]] != flipped[j]["label"]
    out = records(dst)
    other_payloads = _payloads(other)
    for j in injected_open:  # another person's image, under the sample's own label
        assert out[j + 1][1] in other_payloads and labels[j] == source.labels[origin[j]]
    assert (dst / "property").read_bytes() == (src / "property").read_bytes()
    injection = json.loads((dst / "noise_injection.json").read_text())
    assert injection["source_fingerprint"] == source.fingerprint.to_dict() and injection["flip_to"] == "uniform"
    assert injection["source_noise_kept"] == len(source_noise["flipped"]) + len(source_noise["open_set"])


def test_same_seed_same_bytes(data, tmp_path):
    src, other = data
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        inject_noise(src, tmp_path / name, flip_rate=0.2, open_rate=0.1, open_from=other, seed=seed, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for f in ("train.rec", "noise.json", "origin_index.npy"):
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes(), f


def test_noise_on_golden(golden_dir, data, tmp_path):
    src = copy_golden(golden_dir, tmp_path)
    other = make_tiny(tmp_path / "other112", num_ids=2, image_size=112, seed=4, val_pairs=0, ijb_templates=0,
                      median_images=5, max_images=8)
    inject_noise(src, tmp_path / "noisy", flip_rate=0.2, open_rate=0.1, open_from=other, seed=0, progress=False)
    dst = tmp_path / "noisy"
    source = read_layout(src)
    origin = np.load(dst / "origin_index.npy")
    noise = json.loads((dst / "noise.json").read_text())
    labels = source.labels[origin].copy()
    for e in noise["flipped"]:
        labels[e["index"]] = e["label"]
        assert e["true_label"] == source.labels[origin[e["index"]]]
    opened = {e["index"] for e in noise["open_set"]}
    assert len(noise["flipped"]) == round(0.2 * 49) and len(opened) == round(0.1 * 49)
    assert_recordio_copy(src, dst, origin, labels, 112, replaced=opened)
    assert read_layout(dst).num_classes == 12  # no identity emptied: an identity's first image never flips

    with pytest.raises(ArtifactError, match="images are 32x32 but the training set's are 112x112"):
        inject_noise(src, tmp_path / "x", open_rate=0.1, open_from=data[1], progress=False)
    with pytest.raises(ArtifactError, match="is the training set itself"):
        inject_noise(src, tmp_path / "x", open_rate=0.1, open_from=src, progress=False)
    with pytest.raises(ArtifactError, match="ask for 49 noisy images but only"):
        inject_noise(src, tmp_path / "x", flip_rate=1.0, progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flip, open_, open_from, message", [
    (-0.1, 0.0, None, "--flip_rate -0.1 must lie in"),
    (0.0, 1.5, "x", "--open_rate 1.5 must lie in"),
    (0.6, 0.6, "x", "must not exceed 1"),
    (0.0, 0.1, None, "needs --open_from"),
    (float("nan"), 0.0, None, "--flip_rate nan must lie in"),
])
def test_bad_rates(flip, open_, open_from, message):
    with pytest.raises(ValueError, match=message):
        check_rates(flip, open_, open_from)


def test_command_line(data, tmp_path):
    src, other = data
    r = run_script("make_noisy_dataset.py", "--rec", src, "--out", tmp_path / "ok", "--flip_rate", "0.1",
                   "--open_rate", "0.05", "--open_from", other, "--seed", "1", "--quiet")
    assert r.stdout == ""
    # the options reach the library: round(rate * n) new flips and open-set images on top of the source's own
    noise, source_noise = (json.loads((folder / "noise.json").read_text()) for folder in (tmp_path / "ok", src))
    n = read_layout(src).num_images
    assert (noise["flip_rate"], noise["open_rate"], noise["seed"]) == (0.1, 0.05, 1)
    assert len(noise["flipped"]) == len(source_noise["flipped"]) + round(0.1 * n)
    assert len(noise["open_set"]) == len(source_noise["open_set"]) + round(0.05 * n)
    for args in (["--flip_rate", "1.5"], ["--flip_rate", "0.6", "--open_rate", "0.6", "--open_from", other],
                 ["--open_rate", "0.1"]):
        r = run_script("make_noisy_dataset.py", "--rec", src, "--out", tmp_path / "bad", *args, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    r = run_script("make_noisy_dataset.py", "--rec", src, "--out", tmp_path / "ok", "--flip_rate", "0.1",
                   check=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"make_noisy_dataset.py: error: {tmp_path / 'ok'} already exists; pass --overwrite to replace it"]
    assert not (tmp_path / "bad").exists()
