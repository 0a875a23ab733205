"""IJB-B end to end: the synthetic generator writes the IJB-B release layout beside IJB-C, and
`eval_ijbc.py --ijb_target ijbb` evaluates a model checkpoint on it."""
import csv
import json

import numpy as np
import pytest
import torch

from backbones import get_model
from tests.helpers import run_script
from tests.test_ijb import assert_equals_reference, reference_ijb
from utils.models.checkpoint import save_checkpoint
from utils.evaluation.ijb import FAR_TARGETS, IJBFeatures, evaluate_ijb, extract_features, load_ijb_meta
from utils.synthetic.generator import SyntheticConfig, generate_dataset
from utils.evaluation.verification import far_label

TINY = SyntheticConfig(num_ids=4, image_size=32, seed=2, min_images=5, max_images=8, median_images=6, val_pairs=0,
                       ijb_ids=6, ijb_templates=16)
MODEL_ARGS = {"num_features": 32, "input_size": 32}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("ijbb") / "data"
    generate_dataset(out, TINY, progress=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised smallnet in a self-describing checkpoint (what train_everything.py writes)."""
    torch.manual_seed(0)
    model = get_model("smallnet", **MODEL_ARGS)
    path = tmp_path_factory.mktemp("model") / "epoch_001.pt"
    save_checkpoint(path, {"backbone": model.state_dict(), "model": {"name": "smallnet", "args": MODEL_ARGS}})
    return path


def test_ijbb_meta_load_beside_ijbc(dataset):
    metas = {t: load_ijb_meta(dataset / "ijb", t) for t in ("ijbb", "ijbc")}
    assert not set(metas["ijbb"].names) & set(metas["ijbc"].names)
    described = json.loads((dataset / "dataset.json").read_text())["ijb"]
    for target, meta in metas.items():
        assert len(meta.names) == described[target]["images"]
        assert np.unique(meta.templates).size == TINY.ijb_templates
        assert set(meta.galleries) == {"G1", "G2"} and meta.probe is not None  # IJB-B: S1/S2 read as G1/G2
        assert meta.pair_labels.sum() == described[target]["genuine_pairs"]


def test_eval_ijbc_on_ijbb_end_to_end(dataset, checkpoint, tmp_path):
    out = tmp_path / "eval"
    r = run_script("eval_ijbc.py", "--rec", dataset, "--output", tmp_path / "runs", "--ijb_target", "ijbb",
                   "--models", f"rand={checkpoint}", "--out", out, "--num_workers", "0", "--eval_batch_size", "16")
    assert "IJBB 1:1 TAR" in r.stdout
    for name in ("ijbb_tar_far.csv", "ijbb_roc.png", "ijb_results.json", "features/rand.npz"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "ijb_results.json").read_text())
    assert summary["target"] == "ijbb" and summary["root"] == str(dataset / "ijb")
    written = summary["models"]["rand"]

    # the features the command cached are the model's on the IJB-B images (image + flipped image) ...
    root = dataset / "ijb"
    with np.load(out / "features" / "rand.npz") as cached:
        features = IJBFeatures(cached["img_feats"], cached["flip_feats"])
    model = get_model("smallnet", **MODEL_ARGS)
    model.load_state_dict(torch.load(checkpoint)["backbone"])
    mine = extract_features(model.eval(), load_ijb_meta(root, "ijbb"), image_size=32, batch_size=16, progress=False)
    np.testing.assert_allclose(features.img_feats, mine.img_feats, rtol=0, atol=1e-4)
    np.testing.assert_allclose(features.flip_feats, mine.flip_feats, rtol=0, atol=1e-4)

    # ... and its TAR values are exactly those computed here from them
    expected = evaluate_ijb(features, root, "ijbb", image_size=32, progress=False)
    columns = [f"TAR@FAR={far_label(far)}" for far in FAR_TARGETS]
    assert {c: written["1:1"][c] for c in columns} == {c: expected[c] for c in columns}
    assert written["1:1"]["auc"] == expected["auc"]
    assert written["1:N"] == expected["1:N"]["mean"]
    with open(out / "ijbb_tar_far.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["model"], row["target"]) for row in rows] == [("rand", "ijbb")]
    assert [float(rows[0][c]) for c in columns] == [round(expected[c], 6) for c in columns]
    # ... and those are the numbers of the loop-by-loop reference on the same features
    described = json.loads((dataset / "dataset.json").read_text())["ijb"]["ijbb"]
    assert (expected["num_genuine"], expected["num_impostor"]) == (described["genuine_pairs"],
                                                                   described["impostor_pairs"])
    assert expected["num_pairs"] == described["genuine_pairs"] + described["impostor_pairs"]
    reference = reference_ijb(features, load_ijb_meta(root, "ijbb"))
    assert_equals_reference(expected, reference)
    assert 0 < reference["auc"] < 1  # a random network is no face matcher, but its scores are not degenerate
