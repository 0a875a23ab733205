"""export_trainset.py / utils.data.export: a kept list written as a dataset folder of its own, read back record by record."""
import json
import os
import shutil
import struct

import cv2
import numpy as np
import pytest
import torch

from tests.helpers import TINY_TRAIN, run_script
from utils.artifacts.files import (ArtifactError, save_array, save_kept_index, save_label_map,
                             write_kept_index_text)
from utils.data.datasets import open_dataset
from utils.data.export import export_dataset, file_sha256
from utils.pruning import label_map_for, random_keep
from utils.data.recordio import MXIndexedRecordIO, read_layout, unpack

# 8 identities at 32 px, with verification pairs, an ijb/ folder and noise.json: a second or two to make.
TINY = dict(num_ids=8, image_size=32, seed=1, val_pairs=20, num_val_ids=4, ijb_ids=2, ijb_templates=4)


def make_tiny(folder, **overrides):
    from utils.synthetic.generator import SyntheticConfig, generate_dataset

    generate_dataset(folder, SyntheticConfig(**{**TINY, **overrides}), progress=False)
    return folder


def copy_golden(golden_dir, tmp_path, name="insightface_small"):
    dst = tmp_path / name
    shutil.copytree(golden_dir / "recordio" / name, dst)
    for f in dst.iterdir():
        f.chmod(0o644)  # the golden files are read-only
    return dst


def records(folder) -> dict:
    """{key: (IRHeader, payload)} of every record of folder/train.rec."""
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
        return {k: unpack(rec.read_idx(k)) for k in rec.keys}


def recordio_bytes(folder) -> int:
    """The size of a RecordIO dataset on disk: train.rec + train.idx."""
    return sum((folder / name).stat().st_size for name in ("train.rec", "train.idx"))


def assert_recordio_copy(src, dst, origin, labels, image_size, replaced=()):
    """dst holds src's image records `origin` in order, labels `labels`, payloads byte for byte (except the
    new samples `replaced`), then the identity records; `property` says the classes and `image_size`."""
    source, out = records(src), records(dst)
    src_keys = read_layout(src).image_keys
    n, num_classes = len(origin), int(labels.max()) + 1
    assert sorted(out) == list(range(n + 1 + num_classes))
    header, payload = out[0]
    assert header.flag == 2 and header.label.tolist() == [n + 1, n + 1 + num_classes] and payload == b""
    for j, o in enumerate(origin):
        src_header, src_payload = source[int(src_keys[o])]
        new_header, new_payload = out[j + 1]
        assert new_header.label == labels[j] and new_header._replace(label=0) == src_header._replace(label=0)
        assert (new_payload == src_payload) != (j in replaced), j
    counts = np.bincount(labels, minlength=num_classes)
    ends = np.cumsum(counts) + 1
    for c in range(num_classes):
        header, payload = out[n + 1 + c]
        assert header.flag == 2 and header.label.tolist() == [ends[c] - counts[c], ends[c]] and payload == b""
    assert (dst / "property").read_text().strip() == f"{num_classes},{image_size},{image_size}"
    assert np.array_equal(np.load(dst / "origin_index.npy"), origin)
    assert np.load(dst / "origin_index.npy").dtype == np.int64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The source dataset of most tests (read-only: tests write beside it, never into it)."""
    return make_tiny(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def selection(tiny, tmp_path_factory):
    """(kept, kept_index.npy, label_map.json): a per-identity 50% of `tiny`, as the pruning stages write it."""
    folder = tmp_path_factory.mktemp("selection")
    source = open_dataset(tiny)
    kept = random_keep(source.all_labels, 0.5, 2, seed=0)
    save_kept_index(folder / "kept_index.npy", kept, "test", source.fingerprint)
    save_label_map(folder / "label_map.json", label_map_for(kept, source.all_labels), "test", source.fingerprint)
    return kept, folder / "kept_index.npy", folder / "label_map.json"


def test_export_synthetic_record_by_record(tiny, selection, tmp_path):
    kept, kept_path, map_path = selection
    source = open_dataset(tiny)
    label_map = json.loads(map_path.read_text())["map"]
    summary = export_dataset(tiny, kept_path, map_path, tmp_path / "out", progress=False)
    dst = tmp_path / "out"
    labels = np.array([label_map[str(source.all_labels[o])] for o in kept])
    # InsightFace sources hold images contiguous per identity, so the kept order is already label-sorted.
    assert_recordio_copy(tiny, dst, kept, labels, 32)
    assert summary["kept_order"] and summary["images_after"] == kept.size
    # the byte counts are those of train.rec + train.idx on disk; the saving is the share of them gone
    before, after = recordio_bytes(tiny), recordio_bytes(dst)
    assert (summary["bytes_before"], summary["bytes_after"]) == (before, after) and after < before
    assert summary["saving_percent"] == pytest.approx(100 * (before - after) / before, abs=1e-9)

    exported = open_dataset(dst)
    assert len(exported) == kept.size and exported.num_classes == len(label_map)
    manifest = json.loads((dst / "export.json").read_text())
    assert manifest["fingerprint"] == exported.fingerprint.to_dict()
    assert manifest["source"]["fingerprint"] == source.fingerprint.to_dict()
    assert manifest["selection"]["sha256"] == file_sha256(kept_path) and manifest["selection"]["kept"] == kept.size
    assert manifest["label_map"]["sha256"] == file_sha256(map_path)
    for name in ("syn_frontal.bin", "syn_pose.bin", "ijb/meta/ijbc_face_tid_mid.txt", "ijb/loose_crop/1.jpg"):
        assert os.path.samefile(tiny / name, dst / name), name  # hard links
    assert summary["carried"] == {"syn_frontal.bin": "hard link", "syn_pose.bin": "hard link", "ijb/": "hard link"}
    assert not (dst / "dataset.json").exists()  # describes the source, not the export

    # noise.json: the surviving noisy samples, at their new index, with new labels
    noise, exported_noise = (json.loads((d / "noise.json").read_text()) for d in (tiny, dst))
    new_index = {int(o): j for j, o in enumerate(kept)}
    want_flipped = [{"index": new_index[e["index"]], "label": label_map[str(e["label"])],
                     "true_label": label_map[str(e["true_label"])]} for e in noise["flipped"] if e["index"] in new_index]
    want_open = [{"index": new_index[e["index"]], "label": label_map[str(e["label"])]}
                 for e in noise["open_set"] if e["index"] in new_index]
    assert exported_noise["flipped"] == want_flipped and exported_noise["open_set"] == want_open
    assert want_flipped and want_open
    assert exported_noise["num_images"] == kept.size and exported_noise["num_classes"] == len(label_map)
    assert set(exported_noise) == set(noise)


def test_export_golden_with_the_papers_text_list(golden_dir, tmp_path):
    src = copy_golden(golden_dir, tmp_path)
    source = open_dataset(src)
    # every other sample: identity 8 (one image, sample 38) vanishes, so the labels above it move down
    kept = np.arange(1, source.num_images, 2)
    assert 38 not in kept
    write_kept_index_text(tmp_path / "kept_index.txt", kept)
    summary = export_dataset(src, tmp_path / "kept_index.txt", None, tmp_path / "out", progress=False)
    label_map = label_map_for(kept, source.all_labels)
    assert 8 not in label_map and label_map[9] == 8
    labels = np.array([label_map[int(source.all_labels[o])] for o in kept])
    assert_recordio_copy(src, tmp_path / "out", kept, labels, 112)
    assert summary["identities_after"] == 11 and summary["carried"] == {}
    assert not (tmp_path / "out" / "noise.json").exists()
    manifest = json.loads((tmp_path / "out" / "export.json").read_text())
    assert manifest["label_map"]["path"] is None and manifest["selection"]["path"].endswith("kept_index.txt")
    # the exported images decode to the source's pixels
    exported = open_dataset(tmp_path / "out")
    for j in (0, len(kept) - 1):
        assert torch.equal(exported[j][0], source[int(kept[j])][0])


def test_split_records_and_label_vectors(tmp_path):
    """A payload holding the RecordIO magic word (the writer splits that record) and an image record with a
    label vector: both keep their payload, the label (vector element 0) is renumbered."""
    from utils.data.recordio import MAGIC, IRHeader, frame_record, pack

    payloads = [bytes([i]) * 40 + (struct.pack("<I", MAGIC) + b"tail" if i == 2 else b"") for i in range(6)]
    src = tmp_path / "src"
    src.mkdir()
    with MXIndexedRecordIO(src / "train.idx", src / "train.rec", "w") as rec:
        rec.write_idx(0, pack(IRHeader(2, [7, 10], 0, 0), b""))
        for key, (payload, label) in enumerate(zip(payloads, [0, 0, 1, 1, 2, 2]), start=1):
            rec.write_idx(key, pack(IRHeader(0, [label, 7.0] if key == 4 else float(label), key, 0), payload))
        for c, (start, end) in enumerate([(1, 3), (3, 5), (5, 7)]):
            rec.write_idx(7 + c, pack(IRHeader(2, [start, end], 0, 0), b""))
    (src / "property").write_text("3,8,8\n")
    split = frame_record(pack(IRHeader(0, 1.0, 3, 0), payloads[2]))
    assert split in (src / "train.rec").read_bytes() and len(split) > len(payloads[2]) + 32  # really split

    export_dataset(src, np.array([2, 3, 4, 5]), None, tmp_path / "out", progress=False)
    out = records(tmp_path / "out")
    assert out[1] == (IRHeader(0, 0.0, 3, 0), payloads[2])
    assert out[2][0].flag == 2 and out[2][0].label.tolist() == [0.0, 7.0] and out[2][1] == payloads[3]
    assert frame_record(pack(IRHeader(0, 0.0, 3, 0), payloads[2])) in (tmp_path / "out" / "train.rec").read_bytes()
    assert read_layout(tmp_path / "out").labels.tolist() == [0, 0, 1, 1]
    assert [out[k][0].label.tolist() for k in (5, 6)] == [[1, 3], [3, 5]]


def test_export_relabel_moves_samples_before_renumbering(tiny, tmp_path):
    source = open_dataset(tiny)
    noise = json.loads((tiny / "noise.json").read_text())
    flip = noise["flipped"][0]  # back to its true identity: clean again
    clean = next(i for i in range(source.num_images) if source.all_labels[i] == 0 and
                 i not in {e["index"] for e in noise["flipped"] + noise["open_set"]})  # a clean sample moved to 5
    index = np.array([clean, flip["index"]])
    suggested = np.array([5, flip["true_label"]])
    save_array(tmp_path / "relabel.npz", {"index": index, "label": source.all_labels[index],
                                          "suggested_label": suggested}, "test", source.fingerprint)
    export_dataset(tiny, None, None, tmp_path / "out", relabel=tmp_path / "relabel.npz", progress=False)
    assigned = source.all_labels.copy()
    assigned[index] = suggested
    origin = np.argsort(assigned, kind="stable")  # sorted by new label, stable in source order
    assert_recordio_copy(tiny, tmp_path / "out", origin, assigned[origin], 32)
    out_noise = json.loads((tmp_path / "out" / "noise.json").read_text())
    new_index = {int(o): j for j, o in enumerate(origin)}
    flipped = {e["index"]: e for e in out_noise["flipped"]}
    assert new_index[flip["index"]] not in flipped
    assert flipped[new_index[clean]] == {"index": new_index[clean], "label": 5, "true_label": 0}
    assert len(flipped) == len(noise["flipped"]) and len(out_noise["open_set"]) == len(noise["open_set"])


def test_export_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "faces"
    for ident, n in (("carol", 3), ("alice", 4), ("bob", 2)):
        (src / ident).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(src / ident / f"{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    source = open_dataset(src)  # alice 0..3, bob 4..5, carol 6..8
    kept = np.array([1, 3, 6, 8])  # bob vanishes
    summary = export_dataset(src, kept, None, tmp_path / "out", progress=False)
    out = open_dataset(tmp_path / "out")
    assert type(out).__name__ == "ImageFolderDataset" and out.files == ["alice/1.png", "alice/3.png",
                                                                       "carol/0.png", "carol/2.png"]
    assert out.all_labels.tolist() == [0, 0, 1, 1] and np.load(tmp_path / "out" / "origin_index.npy").tolist() == [1, 3, 6, 8]
    for j, o in enumerate(kept):
        assert os.path.samefile(src / source.files[o], tmp_path / "out" / out.files[j])
    assert summary["format"] == "image_folder" and summary["carried"] == {"images": "hard link"}


def test_training_on_export_equals_training_on_source_with_kept_list(tiny, selection, tmp_path):
    from config.config import parse_config
    from utils.artifacts import paths
    from utils.runtime.context import Context
    from train_everything import train

    kept, kept_path, map_path = selection
    export_dataset(tiny, kept_path, map_path, tmp_path / "out", progress=False)
    # Same samples in the same order with the same images and labels: the sampler sees the same sequence.
    label_map = {int(k): v for k, v in json.loads(map_path.read_text())["map"].items()}
    with_list = open_dataset(tiny).select(kept, label_map)  # what train_everything.py trains on
    exported = open_dataset(tmp_path / "out")
    assert len(with_list) == len(exported) and with_list.num_classes == exported.num_classes
    for i in range(len(exported)):
        a, b = with_list[i], exported[i]
        assert torch.equal(a[0], b[0]) and a[1] == b[1], i

    common = [*TINY_TRAIN, "--num_epoch", "1", "--lr_steps", "1", "--record_topk", "0", "--is_original_train", "false"]
    on_source = parse_config(["--rec", str(tiny), "--output", str(tmp_path / "a"), *common, "--coreset_method", "rand",
                              "--kept_index", str(kept_path), "--label_map", str(map_path)])
    on_export = parse_config(["--rec", str(tmp_path / "out"), "--output", str(tmp_path / "b"), *common,
                              "--coreset_method", "full"])
    for cfg in (on_source, on_export):
        train(cfg, Context())
    a, b = (torch.load(paths.train_dir(cfg) / "epoch_001.pt", weights_only=False) for cfg in (on_source, on_export))
    assert a["backbone"].keys() == b["backbone"].keys()
    assert a["step"] == b["step"] == len(exported) // 32  # one epoch of full batches of 32 (drop_last)
    for key in a["backbone"]:
        assert torch.equal(a["backbone"][key], b["backbone"][key]), key
    assert torch.equal(a["head"]["weight"], b["head"]["weight"])


def test_a_failure_midway_leaves_nothing(tiny, selection, tmp_path, monkeypatch):
    from utils.data import writer as export

    kept, kept_path, map_path = selection
    real, calls = export._read_chunk, []

    def fails_on_the_second_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(export, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(export, "_read_chunk", fails_on_the_second_chunk)
    (tmp_path / "parent").mkdir()
    with pytest.raises(ArtifactError, match="No space left on device"):
        export_dataset(tiny, kept_path, map_path, tmp_path / "parent" / "out", progress=False)
    assert len(calls) == 2 and os.listdir(tmp_path / "parent") == []


def test_refusals_write_nothing(tiny, selection, golden_dir, tmp_path):
    kept, kept_path, map_path = selection
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="already exists; pass --overwrite true"):
        export_dataset(tiny, kept_path, map_path, dst, progress=False)
    assert os.listdir(dst) == ["mine.txt"]
    export_dataset(tiny, kept_path, map_path, dst, overwrite=True, progress=False)
    assert not (dst / "mine.txt").exists() and len(open_dataset(dst)) == kept.size

    golden = copy_golden(golden_dir, tmp_path)
    with pytest.raises(ArtifactError, match="another dataset"):
        export_dataset(golden, kept_path, None, tmp_path / "x", progress=False)
    with pytest.raises(ArtifactError, match="must lie outside the source dataset"):
        export_dataset(tiny, kept_path, map_path, tiny / "inside", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ArtifactError, match="is a file, not a folder"):
        export_dataset(tiny, kept_path, map_path, tmp_path / "file" / "out", progress=False)
    other = open_dataset(tiny)
    half_map = tmp_path / "half_map.json"
    save_label_map(half_map, {0: 0, 1: 1}, "test", other.fingerprint)
    with pytest.raises(ArtifactError, match="half_map.json: has no new label for identity"):
        export_dataset(tiny, kept_path, half_map, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def _one_line_error(result, *names):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(name in lines[0] for name in names), result.stderr


def test_command_line(tiny, selection, golden_dir, tmp_path):
    kept, kept_path, map_path = selection
    r = run_script("export_trainset.py", "--rec", tiny, "--kept_index", kept_path, "--label_map", map_path,
                   "--out", tmp_path / "out")
    assert f"images {open_dataset(tiny).num_images} -> {kept.size}" in r.stdout and "saving" in r.stdout
    before, after = recordio_bytes(tiny), recordio_bytes(tmp_path / "out")
    assert f"(saving {100 * (before - after) / before:.1f}%)" in r.stdout
    assert len(open_dataset(tmp_path / "out")) == kept.size

    missing = tmp_path / "nowhere" / "kept_index.npy"
    _one_line_error(run_script("export_trainset.py", "--rec", tiny, "--kept_index", missing, "--out",
                               tmp_path / "a", check=False), str(missing))
    golden = copy_golden(golden_dir, tmp_path)
    _one_line_error(run_script("export_trainset.py", "--rec", golden, "--kept_index", kept_path, "--out",
                               tmp_path / "b", check=False), str(kept_path), "another dataset")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
