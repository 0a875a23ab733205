"""The .bin reader, the embedding loop and InsightFace's 10-fold protocol (utils/evaluation/verification.py)."""
import pickle
import struct

import cv2
import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline

from utils.data.transforms import normalize_batch
from utils.models.embedding import embed
from utils.evaluation.verification import (VerificationSet, _slinear_threshold, evaluate, evaluate_full, format_table, kfold_splits,
                                load_bin, save_bin, verify_bins)

# ----------------------------------------------------------------------------------------------------
# A literal, loop-by-loop statement of InsightFace's protocol, to hold the vectorised code to.


def reference_protocol(embeddings, issame, nrof_folds=10, far_target=1e-3):
    emb = np.asarray(embeddings, dtype=np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    dist = np.sum((emb[0::2] - emb[1::2]) ** 2, axis=1)
    issame = np.asarray(issame, dtype=bool)
    n = dist.size
    # KFold(n_splits, shuffle=False): the first n % k folds get one extra sample
    sizes = [n // nrof_folds + (1 if i < n % nrof_folds else 0) for i in range(nrof_folds)]
    starts = np.cumsum([0] + sizes)

    def counts(threshold, d, same):
        accept = d < threshold
        return (np.sum(accept & same), np.sum(accept & ~same), np.sum(~accept & ~same), np.sum(~accept & same))

    acc_thresholds, val_thresholds = np.arange(0, 4, 0.01), np.arange(0, 4, 0.001)
    accuracy, val, far = [], [], []
    for k in range(nrof_folds):
        test = np.arange(starts[k], starts[k + 1])
        train = np.setdiff1d(np.arange(n), test)
        train_acc = []
        for t in acc_thresholds:
            tp, fp, tn, fn = counts(t, dist[train], issame[train])
            train_acc.append((tp + tn) / train.size)
        best = acc_thresholds[int(np.argmax(train_acc))]
        tp, fp, tn, fn = counts(best, dist[test], issame[test])
        accuracy.append((tp + tn) / test.size)

        far_train = []
        for t in val_thresholds:
            tp, fp, tn, fn = counts(t, dist[train], issame[train])
            far_train.append(fp / (fp + tn))
        far_train = np.array(far_train)
        if far_train.max() >= far_target:
            # scipy's interp1d(kind='slinear') of InsightFace's days: a degree-1 spline on these knots
            spline = BSpline.construct_fast(np.r_[far_train[0], far_train, far_train[-1]], val_thresholds, 1)
            threshold = float(spline(far_target))
        else:
            threshold = 0.0
        tp, fp, tn, fn = counts(threshold, dist[test], issame[test])
        val.append(tp / (tp + fn))
        far.append(fp / (fp + tn))
    return np.array(accuracy), np.array(val), np.array(far)


def random_pairs(num_pairs, dim=8, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    issame = rng.random(num_pairs) < 0.5
    first = rng.normal(size=(num_pairs, dim))
    second = np.where(issame[:, None], first + noise * rng.normal(size=(num_pairs, dim)), rng.normal(size=(num_pairs, dim)))
    emb = np.empty((2 * num_pairs, dim))
    emb[0::2], emb[1::2] = first, second
    return emb.astype(np.float32), issame


@pytest.mark.parametrize("num_pairs,seed", [(300, 0), (57, 1), (600, 2)])
def test_protocol_equals_reference(num_pairs, seed):
    emb, issame = random_pairs(num_pairs, seed=seed)
    ref_acc, ref_val, ref_far = reference_protocol(emb, issame)
    _, _, accuracy = evaluate(emb, issame)
    full = evaluate_full(emb, issame)
    np.testing.assert_array_equal(accuracy, ref_acc)
    assert full["accuracy_mean"] == np.mean(ref_acc) and full["accuracy_std"] == np.std(ref_acc)
    assert full["tar_at_far_1e-3"] == np.mean(ref_val)
    assert full["tar_std"] == np.std(ref_val)
    assert full["far_mean"] == np.mean(ref_far)


def test_slinear_interpolation_matches_spline_with_repeated_far():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        far = np.sort(rng.integers(0, 12, rng.integers(2, 40)) / rng.integers(1, 30))
        thresholds = np.sort(rng.random(far.size))
        target = rng.choice(far) if rng.random() < 0.5 else rng.uniform(far[0], far[-1])
        expected = float(BSpline.construct_fast(np.r_[far[0], far, far[-1]], thresholds, 1)(target))
        assert _slinear_threshold(far, thresholds, target) == expected


def _unit(angle):
    return np.array([np.cos(angle), np.sin(angle)])


def test_identical_pairs_and_orthogonal_non_pairs():
    # basis vectors, so that every impostor distance is exactly 2
    issame = np.arange(40) % 2 == 0
    basis = np.eye(8)
    emb = []
    for i, same in enumerate(issame):
        emb += [basis[i % 8], basis[i % 8] if same else basis[(i + 1) % 8]]
    tpr, fpr, accuracy = evaluate(np.array(emb) * 3.0, issame)  # scale does not matter: normalised first
    np.testing.assert_array_equal(accuracy, np.ones(10))
    assert tpr.shape == fpr.shape == (400,)
    full = evaluate_full(np.array(emb), issame)
    assert full["best_threshold"] == pytest.approx(0.01)  # first threshold with distance 0 < t
    # InsightFace quirk: with no impostor below distance 2, the FAR=1e-3 threshold is interpolated between
    # 2.000 (FAR 0) and 2.001 (FAR 1) to 2.000001, which then accepts the impostors at exactly 2.
    assert full["tar_at_far_1e-3"] == 1.0 and full["far_mean"] == 1.0


def test_threshold_zero_when_far_target_is_never_reached():
    # impostors at distance 4 (antipodal): FAR stays 0 below the largest threshold 3.999, so InsightFace
    # falls back to threshold 0, which accepts nothing.
    issame = np.arange(20) % 2 == 0
    emb = np.concatenate([[_unit(0.3), _unit(0.3) * (1 if s else -1)] for s in issame])
    full = evaluate_full(emb, issame)
    assert full["accuracy_mean"] == 1.0
    assert full["tar_at_far_1e-3"] == 0.0 and full["far_mean"] == 0.0


def test_one_wrong_pair_costs_its_fold_half():
    # 20 pairs -> 10 folds of 2. Pair 1 (fold 0) is an impostor pair of identical images.
    issame = np.arange(20) % 2 == 0
    emb = []
    for i, same in enumerate(issame):
        a = _unit(0.1 * i)
        emb += [a, a if (same or i == 1) else _unit(0.1 * i + np.pi / 2)]
    full = evaluate_full(np.array(emb), issame)
    # fold 0 trains on clean folds (threshold 0.01) and misclassifies pair 1; every other fold keeps 0.01
    # (17/18 on its training folds) and is right on both of its pairs.
    assert full["accuracy_folds"] == [0.5] + [1.0] * 9
    assert full["accuracy_mean"] == pytest.approx(0.95)
    assert full["accuracy_std"] == pytest.approx(0.15)
    assert full["best_thresholds"] == pytest.approx([0.01] * 10)


def test_kfold_splits_are_contiguous_like_sklearn():
    folds = kfold_splits(23, 10)
    assert [len(test) for _, test in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    np.testing.assert_array_equal(np.concatenate([test for _, test in folds]), np.arange(23))
    for train, test in folds:
        np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(23))
    with pytest.raises(ValueError, match="cannot split"):
        kfold_splits(5, 10)


def test_evaluate_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="for 3 pairs"):
        evaluate(np.ones((5, 4)), [True, False, True])


# ----------------------------------------------------------------------------------------------------
# .bin files


def _images(num, size=112, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(num, 8, 8, 3), dtype=np.uint8)
    return [cv2.resize(s, (size, size), interpolation=cv2.INTER_CUBIC) for s in small]  # RGB


def _encode(rgb, ext):
    ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _decoded_rgb(encoded):
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_bin_round_trip(tmp_path, ext):
    images = _images(8)
    encoded = [_encode(img, ext) for img in images]
    issame = [True, False, True, False]
    save_bin(tmp_path / "set.bin", encoded, issame)
    (data, flipped), loaded_issame = load_bin(tmp_path / "set.bin", (112, 112))
    assert data.dtype == torch.uint8 and data.shape == (8, 3, 112, 112)
    np.testing.assert_array_equal(loaded_issame, issame)
    assert loaded_issame.dtype == bool
    for i, enc in enumerate(encoded):
        expected = images[i] if ext == ".png" else _decoded_rgb(enc)  # PNG is lossless
        np.testing.assert_array_equal(data[i].permute(1, 2, 0).numpy(), expected)
    assert torch.equal(flipped, data.flip(-1))


def _python2_pickle(encoded_images, issame):
    """What Python 2's cPickle.dump((list of str, list of bool), f, protocol=2) writes."""
    out = bytearray(b"\x80\x02]q\x00(")  # PROTO 2, EMPTY_LIST, BINPUT 0, MARK
    for data in encoded_images:
        out += b"T" + struct.pack("<I", len(data)) + data  # BINSTRING: a Python 2 str
    out += b"e](" + b"".join(b"\x88" if s else b"\x89" for s in issame) + b"e\x86."  # APPENDS, ..., TUPLE2, STOP
    return bytes(out)


def test_python2_bin(tmp_path):
    images = _images(4, seed=1)
    encoded = [_encode(img, ".png") for img in images]
    (tmp_path / "py2.bin").write_bytes(_python2_pickle(encoded, [True, False]))
    (data, _), issame = load_bin(tmp_path / "py2.bin")
    np.testing.assert_array_equal(issame, [True, False])
    np.testing.assert_array_equal(data[3].permute(1, 2, 0).numpy(), images[3])


def test_bin_entries_as_numpy_and_bytearray_and_resized(tmp_path):
    images = _images(4, size=96, seed=2)
    entries = [np.frombuffer(_encode(img, ".png"), np.uint8) for img in images[:2]]
    entries += [bytearray(_encode(img, ".png")) for img in images[2:]]
    with open(tmp_path / "mixed.bin", "wb") as f:
        pickle.dump((entries, [False, True]), f)
    (data, flipped), _ = load_bin(tmp_path / "mixed.bin", (112, 112))
    assert data.shape == (4, 3, 112, 112)
    (data96, _), _ = load_bin(tmp_path / "mixed.bin", (96, 96))
    np.testing.assert_array_equal(data96[0].permute(1, 2, 0).numpy(), images[0])


def test_bin_errors_name_the_file(tmp_path):
    bad = tmp_path / "garbage.bin"
    bad.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="garbage.bin.*not a readable pickle"):
        load_bin(bad)

    wrong_shape = tmp_path / "dict.bin"
    wrong_shape.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="dict.bin.*expected a pickle of"):
        load_bin(wrong_shape)

    odd = tmp_path / "odd.bin"
    odd.write_bytes(pickle.dumps(([_encode(img, ".png") for img in _images(3)], [True, False])))
    with pytest.raises(ValueError, match="odd.bin: 3 images for 2 pairs"):
        load_bin(odd)

    undecodable = tmp_path / "broken.bin"
    entries = [_encode(img, ".png") for img in _images(4)]
    entries[2] = b"\x89PNG but broken"
    undecodable.write_bytes(pickle.dumps((entries, [True, False])))
    with pytest.raises(ValueError, match="broken.bin: image 2 could not be decoded"):
        load_bin(undecodable)


# ----------------------------------------------------------------------------------------------------
# Embedding and running sets


class TinyNet(torch.nn.Module):
    """A flip-sensitive embedding net that records the training flag it ran with."""

    def __init__(self, dim=8):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, dim),
                                        torch.nn.BatchNorm1d(dim))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.body(x)


def test_embed_is_image_plus_flip_in_eval_mode_and_restores_training():
    model = TinyNet()
    model.train()
    model.body[3].eval()  # a submodule frozen on purpose must stay frozen
    images = torch.from_numpy(np.stack(_images(10))).permute(0, 3, 1, 2).contiguous()
    emb = embed(model, images, batch_size=3)
    assert emb.shape == (10, 8) and emb.dtype == np.float32
    assert model.modes and not any(model.modes)
    assert model.training and model.body[0].training and not model.body[3].training

    model.eval()
    with torch.no_grad():
        x = normalize_batch(images)
        expected = (model(x) + model(x.flip(-1))).numpy()
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    no_flip = embed(model, images, batch_size=4, flip=False)
    np.testing.assert_allclose(no_flip, model(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dtype"):
        embed(model, images, dtype="int8")


def test_verification_set_and_table(tmp_path):
    images = _images(20, seed=3)
    encoded = [_encode(img, ".png") for img in images]
    save_bin(tmp_path / "toy.bin", encoded, [i % 2 == 0 for i in range(10)])
    model = TinyNet()
    vset = VerificationSet("toy", tmp_path / "toy.bin")
    assert len(vset) == 10
    results = verify_bins(model, {"toy": vset, "again": tmp_path / "toy.bin"}, batch_size=7, dtype="bf16")
    assert set(results) == {"toy", "again"}
    # XNorm is InsightFace's: the mean L2 norm of the raw embedding of every image and of every flipped image
    model.eval()
    with torch.no_grad():
        x = normalize_batch(vset.images)
        views = torch.cat([model(x), model(x.flip(-1))]).double()
    xnorm = float(views.norm(dim=1).mean())
    for r in results.values():
        assert len(r["accuracy_folds"]) == 10 and r["xnorm"] == pytest.approx(xnorm, rel=1e-6)
    assert results["toy"]["accuracy_folds"] == results["again"]["accuracy_folds"]
    # the value, not a range: fp32 run == the protocol (`evaluate`) on the image + flip embeddings made here
    exact = vset.run(model, batch_size=7)
    summed = embed(model, vset.images, batch_size=5, flip=True).astype(np.float64)[vset.positions]
    _, _, folds = evaluate(summed, vset.issame)
    np.testing.assert_array_equal(exact["accuracy_folds"], folds)
    assert exact["accuracy_mean"] == pytest.approx(float(np.mean(folds)), abs=1e-12)
    table = format_table(results)
    assert "toy" in table and "again" in table and table.splitlines()[-1].startswith("mean")


def test_format_table_by_hand():
    results = {"lfw": {"accuracy_mean": 0.995, "accuracy_std": 0.0035, "tar_at_far_1e-3": 0.9, "tar_std": 0.01},
               "cfp_fp": {"accuracy_mean": 0.9, "accuracy_std": 0.0}}  # no TAR: an empty column
    # names padded to 6 ("target", "cfp_fp"), then two spaces between columns; accuracy "7.3f +- 5.3f" in
    # percent (16 wide), TAR the same right-aligned to 17 (blank without a TAR); the mean row: the mean accuracy
    # over targets, (99.5 + 90) / 2 = 94.75, then 10 blanks
    assert format_table(results).splitlines() == [
        "target" + "  " + "     accuracy (%)" + "  " + " TAR@FAR=1e-3 (%)",
        "lfw   " + "  " + " 99.500 +- 0.350" + "  " + "  90.000 +- 1.000",
        "cfp_fp" + "  " + " 90.000 +- 0.000" + "  " + " " * 17,
        "mean  " + "  " + " 94.750" + " " * 10,
    ]


def test_an_image_shared_by_pairs_is_embedded_once_with_the_same_result(tmp_path):
    images = _images(8, seed=5)
    positions = [0, 1, 0, 2, 3, 4, 3, 5, 6, 7, 1, 6] * 2  # every image appears in several pairs
    encoded = [_encode(images[i], ".png") for i in positions]
    issame = [True, False, True, False, True, False] * 2
    save_bin(tmp_path / "shared.bin", encoded, issame)
    vset = VerificationSet("shared", tmp_path / "shared.bin")
    assert vset.images.shape[0] == 8 and vset.positions.tolist() == positions
    model = TinyNet().eval()
    result = vset.run(model, batch_size=4)
    data, _ = load_bin(tmp_path / "shared.bin")
    summed = embed(model, data[0], batch_size=4).astype(np.float64)
    expect = evaluate_full(summed, np.array(issame), 10)
    assert result["accuracy_folds"] == expect["accuracy_folds"] and result["accuracy_mean"] == expect["accuracy_mean"]
