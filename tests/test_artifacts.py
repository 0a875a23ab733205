"""Stage artifacts: atomic writes, manifests with fingerprints, refusal of foreign inputs, the paper's text form."""
import json
import os

import numpy as np
import pytest

from utils.artifacts import files as A

FP = A.Fingerprint(num_images=100, num_classes=7, idx_size=1234)
OTHER = A.Fingerprint(num_images=100, num_classes=7, idx_size=999)


def test_array_round_trip_with_manifest(tmp_path):
    path = tmp_path / "s" / "scores.npz"
    A.save_array(path, {"p": np.linspace(0, 1, 100), "label": np.arange(100)}, "eval_trainset", FP, inputs=["x"])
    data = A.load_array(path, FP, length=100)
    assert np.allclose(data["p"], np.linspace(0, 1, 100))
    man = json.loads((tmp_path / "s" / "scores.manifest.json").read_text())
    assert man["stage"] == "eval_trainset" and man["fingerprint"] == FP.to_dict() and man["inputs"] == ["x"]


def test_foreign_fingerprint_is_refused_naming_both(tmp_path):
    path = tmp_path / "k.npy"
    A.save_kept_index(path, [1, 2, 3], "rand", FP)
    with pytest.raises(A.ArtifactError) as e:
        A.load_kept_index(path, OTHER)
    msg = str(e.value)
    assert "another dataset" in msg and "1234" in msg and "999" in msg


def test_wrong_length_refused(tmp_path):
    path = tmp_path / "p.npy"
    A.save_array(path, np.zeros(50), "x", FP)
    with pytest.raises(A.ArtifactError, match="length"):
        A.load_array(path, FP, length=100)


def test_missing_input_and_missing_manifest(tmp_path):
    with pytest.raises(A.ArtifactError, match="missing"):
        A.load_kept_index(tmp_path / "nope.npy", FP)
    np.save(tmp_path / "bare.npy", np.arange(3))
    with pytest.raises(A.ArtifactError, match="manifest"):
        A.load_kept_index(tmp_path / "bare.npy", FP)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with A.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_kept_index_validation(tmp_path):
    with pytest.raises(A.ArtifactError, match="empty"):
        A.save_kept_index(tmp_path / "k.npy", [], "x", FP)
    with pytest.raises(A.ArtifactError, match=r"\[0, 100\)"):
        A.save_kept_index(tmp_path / "k.npy", [5, 100], "x", FP)
    kept = A.save_kept_index(tmp_path / "k.npy", [9, 3, 3, 1], "x", FP)
    assert kept.tolist() == [1, 3, 9] and kept.dtype == np.int64
    assert not (tmp_path / "k.npy").exists() or np.load(tmp_path / "k.npy").tolist() == [1, 3, 9]


def test_paper_text_form_read_and_written(tmp_path):
    kept = np.array([0, 4, 17, 99])
    path = A.save_kept_index(tmp_path / "k.npy", kept, "x", FP, text=True)
    text = (tmp_path / "k.txt").read_text()
    assert text.strip() == "kept_index = [0, 4, 17, 99]"
    assert A.load_kept_index(tmp_path / "k.txt", FP).tolist() == [0, 4, 17, 99]
    # the authors' files: one long line, arbitrary spacing and newlines
    (tmp_path / "paper.txt").write_text("kept_index = [3,\n 1 ,2]")
    assert A.load_kept_index(tmp_path / "paper.txt", FP).tolist() == [1, 2, 3]
    (tmp_path / "bad.txt").write_text("kept_index = [1, two]")
    with pytest.raises(A.ArtifactError, match="two"):
        A.read_kept_index_text(tmp_path / "bad.txt")
    (tmp_path / "big.txt").write_text("kept_index = [" + ", ".join(map(str, range(2_000_000))) + "]")
    assert A.read_kept_index_text(tmp_path / "big.txt").shape == (2_000_000,)
    assert len(path) == 4


def test_label_map_round_trip_and_checks(tmp_path):
    A.save_label_map(tmp_path / "m.json", {5: 1, 2: 0, 6: 2}, "x", FP)
    assert A.load_label_map(tmp_path / "m.json", FP) == {2: 0, 5: 1, 6: 2}
    assert A.label_map_array({2: 0, 5: 1}, 7).tolist() == [-1, -1, 0, -1, -1, 1, -1]
    with pytest.raises(ValueError):
        A.save_label_map(tmp_path / "m2.json", {1: 0, 2: 2}, "x", FP)
    with pytest.raises(A.ArtifactError):
        A.load_label_map(tmp_path / "m.json", OTHER)


def test_is_complete(tmp_path):
    path = tmp_path / "a.npy"
    assert not A.is_complete(path, FP)
    A.save_array(path, np.zeros(100), "x", FP)
    assert A.is_complete(path, FP) and not A.is_complete(path, OTHER)


def test_atomic_outputs_get_the_usual_file_mode(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    A.atomic_write_text(tmp_path / "x.txt", "hi")
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o666 & ~umask
