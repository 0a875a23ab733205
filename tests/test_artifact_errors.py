"""Every malformed artifact ends in one ArtifactError naming the file and what was expected; a full disk too."""
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from utils.artifacts import files as A

FP = A.Fingerprint(num_images=100, num_classes=7, idx_size=1234)


def _with_manifest(path):
    A.write_manifest(path, "test", FP)
    return path


def _one_line_error(fn, *args, match):
    with pytest.raises(A.ArtifactError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", ["scores.npy", "scores.npz"])
def test_truncated_array_files(tmp_path, name):
    path = tmp_path / name
    A.save_array(path, {"p": np.arange(100.0)} if name.endswith("npz") else np.arange(100.0), "x", FP)
    data = path.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 3):
        path.write_bytes(data[:cut])
        _one_line_error(A.load_array, path, FP, match=rf"{name}: truncated or not a NumPy")


def test_foreign_and_object_arrays(tmp_path):
    text = _with_manifest(tmp_path / "scores.npy")
    text.write_text("this is a CSV, 1, 2, 3\n")
    _one_line_error(A.load_array, text, FP, match=r"scores\.npy: refused: content starting b'this i', not a NumPy")
    pickled = _with_manifest(tmp_path / "pickled.npy")
    pickled.write_bytes(b"\x80\x04K\x01.")
    _one_line_error(A.load_array, pickled, FP, match=r"pickled\.npy: refused: a pickle, not a NumPy")
    obj = _with_manifest(tmp_path / "obj.npy")
    np.save(obj, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    _one_line_error(A.load_array, obj, FP, match=r"obj\.npy: refused: it holds an object array")
    objz = _with_manifest(tmp_path / "objz.npz")
    np.savez(objz, a=np.array([1, "x", None], dtype=object))
    _one_line_error(A.load_array, objz, FP, match=r"objz\.npz: refused: it holds an object array")


def test_malformed_manifests(tmp_path):
    path = tmp_path / "p.npy"
    A.save_array(path, np.zeros(100), "x", FP)
    mpath = A.manifest_path(path)
    for content, needle in ((b'{"stage": ', "malformed JSON"), (b"\xff\xfe\x00binary", "malformed JSON"),
                            (b"[1, 2]", "found a JSON list"), (b'{"fingerprint": [1]}', "malformed fingerprint"),
                            (b'{"fingerprint": {"num_images": "many"}}', "malformed fingerprint")):
        mpath.write_bytes(content)
        msg = _one_line_error(A.load_array, path, FP, match=needle)
        assert "p.manifest.json" in msg


def test_kept_index_wrong_content(tmp_path):
    cases = {
        "float.npy": (np.array([1.0, np.nan, 3.0]), r"must be integers, got float64 \(1 NaN\)"),
        "bool.npy": (np.array([True, False]), "must be integers, got bool"),
        "matrix.npy": (np.arange(6).reshape(2, 3), r"expected a 1-D list of sample indices, got shape \(2, 3\)"),
        "range.npy": (np.array([0, 100]), r"indices must be in \[0, 100\)"),
    }
    for name, (array, needle) in cases.items():
        path = _with_manifest(tmp_path / name)
        np.save(path, array)
        _one_line_error(A.load_kept_index, path, FP, match=rf"{name}: .*{needle}")
    path = tmp_path / "named.npy"
    A.save_array(path, {"a": np.arange(3)}, "x", FP)  # an .npz under a .npy name
    os.replace(tmp_path / "named.npy", path)
    _one_line_error(A.load_kept_index, path, FP, match=r"named\.npy: holds named arrays \['a'\]")


def test_kept_index_text_form_errors(tmp_path):
    cases = {"binary.txt": b"\x80\x04\x95 pickled", "huge.txt": b"kept_index = [1, 99999999999999999999999]",
             "float.txt": b"kept_index = [1, 2.5]", "python.txt": b"kept = [1, 2]"}
    needles = {"binary.txt": "binary content; expected the text form", "huge.txt": "'99999999999999999999999' is not",
               "float.txt": "'2.5' is not a sample index", "python.txt": "expected the text form"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        _one_line_error(A.load_kept_index, tmp_path / name, FP, match=rf"{name}: {needles[name]}")


@pytest.mark.parametrize("content,needle", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "found a JSON list"),
    ('{"map": [0, 1]}', "'map' is list"),
    ('{"map": {"a": 0}}', "old label 'a' is not a non-negative integer"),
    ('{"map": {"-1": 0}}', "old label '-1' is not"),
    ('{"map": {"0": 0.0, "1": 1}}', "new label of 0 is 0.0; expected an integer"),
    ('{"map": {"0": true}}', "new label of 0 is True"),
    ('{"map": {"0": 1, "1": 2}}', r"not contiguous 0..1"),
    ('{"num_classes": 3, "map": {"0": 0, "1": 1}}', "num_classes=3 but the map has 2 new labels"),
    ('{"map": {"0": 0, "7": 1}}', r"old labels \[7\] are outside the dataset's 7 identities"),
])
def test_label_map_errors(tmp_path, content, needle):
    path = _with_manifest(tmp_path / "label_map.json")
    path.write_text(content)
    _one_line_error(A.load_label_map, path, FP, match=rf"label_map\.json: .*{needle}")


def test_label_map_round_trip_still_loads(tmp_path):
    A.save_label_map(tmp_path / "label_map.json", {0: 0, 3: 1, 6: 2}, "x", FP)
    assert A.load_label_map(tmp_path / "label_map.json", FP) == {0: 0, 3: 1, 6: 2}


def _disk_full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch, code):
    def full(self, *args, **kwargs):
        self.open("wb").write(b"x" * 10)  # half written, then the disk is full
        raise OSError(code, os.strerror(code))

    (tmp_path / "old.json").write_text("{}")
    monkeypatch.setattr(Path, "write_bytes", full)
    msg = _one_line_error(A.atomic_write_json, tmp_path / "summary.json", {"a": [1] * 50},
                          match=r"no space left on device writing .*summary\.json \(\d+ bytes; \d+ bytes free on "
                                r"that filesystem\)")
    assert f"({len(json.dumps({'a': [1] * 50}, indent=1)) + 1} bytes;" in msg
    assert sorted(os.listdir(tmp_path)) == ["old.json"]


def test_full_disk_in_a_writer_of_its_own(tmp_path):
    # writers that open the temporary path themselves (np.savez, torch.save, savefig) get the same line
    with pytest.raises(A.ArtifactError, match=r"writing .*plot\.png \(4 bytes; "):
        with A.atomic_path(tmp_path / "plot.png", suffix=".png") as tmp:
            tmp.write_bytes(b"1234")
            _disk_full(None)
    assert os.listdir(tmp_path) == []


def test_other_os_errors_pass_through(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with pytest.raises(PermissionError):
        A.atomic_write_text(tmp_path / "x.txt", "x")
    assert os.listdir(tmp_path) == []
