"""utils.data.recordio against the MXNet-written golden files, the dmlc framing rules, and its error paths."""
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import struct
import time

import numpy as np
import pytest

from utils.data import recordio
from utils.data.recordio import (MAGIC, IRHeader, MXIndexedRecordIO, MXRecordIO, RecordIOError, frame_record, pack,
                            pack_img, read_layout, rebuild_index, unpack, unpack_img)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _sha256(img):
    return hashlib.sha256(np.ascontiguousarray(img, dtype=np.uint8).tobytes()).hexdigest()


def _golden(golden_dir, name):
    folder = golden_dir / "recordio" / name
    return folder, json.loads((folder / "expected.json").read_text())


def _copy_golden(golden_dir, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(golden_dir / "recordio" / name, dst)
    for f in dst.iterdir():
        f.chmod(0o644)  # the golden files are read-only
    return dst


def _idx_offsets(folder):
    lines = (folder / "train.idx").read_text().splitlines()
    return {int(k): int(o) for k, o in (line.split("\t") for line in lines)}


# ------------------------------------------------------------------------------------------
# Golden files written by MXNet 1.9.1
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["insightface_small", "plain_png"])
def test_golden_every_image_matches_expected(golden_dir, name):
    folder, expected = _golden(golden_dir, name)
    layout = read_layout(folder)
    assert layout.layout == expected["layout"]
    images = expected["images"]
    assert layout.image_keys.tolist() == [e["key"] for e in images]
    assert layout.labels.dtype == np.int64
    assert layout.labels.tolist() == [int(e["label"]) for e in images]
    assert layout.idx_size == (folder / "train.idx").stat().st_size
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
        for e in images:
            header, img = rec.read_img(e["key"])
            assert float(header.label) == e["label"]
            assert img.dtype == np.uint8 and list(img.shape) == e["shape"]
            np.testing.assert_allclose(img.reshape(-1, 3).mean(axis=0), e["rgb_channel_means"], rtol=0, atol=1e-9)
            assert _sha256(img) == e["rgb_sha256"], f"key {e['key']}: decoded RGB differs from MXNet's"


def test_golden_insightface_structure(golden_dir):
    folder, expected = _golden(golden_dir, "insightface_small")
    layout = read_layout(folder)
    assert layout.num_images == expected["num_images"]
    assert layout.num_classes == expected["num_classes"]
    assert layout.image_size == (112, 112)
    assert layout.identity_ranges.dtype == np.int64
    assert layout.identity_ranges.tolist() == expected["id_ranges"]
    assert layout.fingerprint.to_dict() == {"num_images": 49, "num_classes": 12, "idx_size": 576}
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
        header0, payload0 = unpack(rec.read_idx(0))
        assert header0.flag == 2 and payload0 == b""
        first_id, end = (int(v) for v in header0.label)
        assert len(rec.keys) == end
        for c, key in enumerate(range(first_id, end)):
            header, _ = unpack(rec.read_idx(key))
            assert header.label.tolist() == expected["id_ranges"][c]


def test_golden_plain_png_payloads(golden_dir):
    folder, expected = _golden(golden_dir, "plain_png")
    layout = read_layout(folder)
    assert layout.identity_ranges is None and layout.image_size is None
    assert layout.num_classes == max(int(e["label"]) for e in expected["images"]) + 1  # no property file
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
        for e in expected["images"]:
            header, payload = unpack(rec.read_idx(e["key"]))
            assert header.flag == e["flag"] and len(payload) == e["payload_len"]


@pytest.mark.parametrize("name", ["insightface_small", "plain_png"])
def test_golden_sequential_read_matches_indexed(golden_dir, name):
    folder, _ = _golden(golden_dir, name)
    offsets = _idx_offsets(folder)
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as indexed, \
            MXRecordIO(folder / "train.rec", "r") as sequential:
        for key in sorted(offsets, key=offsets.get):
            assert sequential.tell() == offsets[key]
            assert sequential.read() == indexed.read_idx(key)
        assert sequential.read() is None


@pytest.mark.parametrize("name", ["insightface_small", "plain_png"])
def test_writer_reproduces_golden_bytes(golden_dir, name, tmp_path):
    folder, _ = _golden(golden_dir, name)
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as src, \
            MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "w") as dst:
        for key in src.keys:
            dst.write_idx(key, src.read_idx(key))
    assert (tmp_path / "train.rec").read_bytes() == (folder / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_text() == (folder / "train.idx").read_text()


@pytest.mark.parametrize("name", ["insightface_small", "plain_png"])
def test_rebuild_index_equals_original(golden_dir, name, tmp_path):
    folder, _ = _golden(golden_dir, name)
    n = rebuild_index(folder / "train.rec", tmp_path / "train.idx")
    assert (tmp_path / "train.idx").read_text() == (folder / "train.idx").read_text()
    assert n == len(_idx_offsets(folder))
    assert not [p for p in tmp_path.iterdir() if p.name != "train.idx"]  # no temporary file left


def test_layout_labels_equal_per_record_unpack(golden_dir):
    for name in ["insightface_small", "plain_png"]:
        folder, _ = _golden(golden_dir, name)
        layout = read_layout(folder)
        with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
            labels = [int(np.atleast_1d(unpack(rec.read_idx(k))[0].label)[0]) for k in layout.image_keys.tolist()]
        assert layout.labels.tolist() == labels


# ------------------------------------------------------------------------------------------
# dmlc framing: splitting on the magic word
# ------------------------------------------------------------------------------------------

def _lrec(cflag, length):
    return struct.pack("<I", (cflag << 29) | length)


def test_frame_record_hand_computed_split():
    # Magic at aligned offsets 0, 8 and 20 (the very end), and once unaligned at 13 (not a split point).
    payload = MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"e" + MAGIC_BYTES + b"fgh" + MAGIC_BYTES
    assert len(payload) == 24
    expected = (MAGIC_BYTES + _lrec(1, 0)  # part before offset 0: empty, first
                + MAGIC_BYTES + _lrec(2, 4) + b"abcd"  # [4, 8)
                + MAGIC_BYTES + _lrec(2, 8) + b"e" + MAGIC_BYTES + b"fgh"  # [12, 20)
                + MAGIC_BYTES + _lrec(3, 0))  # [24, 24): last, empty, no padding
    assert frame_record(payload) == expected


def test_frame_record_padding_and_tail():
    assert frame_record(b"hello") == MAGIC_BYTES + _lrec(0, 5) + b"hello\0\0\0"
    assert frame_record(b"") == MAGIC_BYTES + _lrec(0, 0)
    assert frame_record(MAGIC_BYTES + b"hello") == (MAGIC_BYTES + _lrec(1, 0)
                                                    + MAGIC_BYTES + _lrec(3, 5) + b"hello\0\0\0")
    assert frame_record(b"xyz" + MAGIC_BYTES) == MAGIC_BYTES + _lrec(0, 7) + b"xyz" + MAGIC_BYTES + b"\0"


SPLIT_PAYLOADS = [
    MAGIC_BYTES,
    MAGIC_BYTES * 3,
    MAGIC_BYTES + b"abcd" + MAGIC_BYTES + b"e" + MAGIC_BYTES + b"fgh" + MAGIC_BYTES,
    b"12345678" + MAGIC_BYTES + b"tail!",
    b"ab" + MAGIC_BYTES + b"cd",  # unaligned only: no split
    bytes(range(256)) * 3 + MAGIC_BYTES + bytes(7),
]


def test_split_records_round_trip(tmp_path):
    rec_path, idx_path = tmp_path / "t.rec", tmp_path / "t.idx"
    with MXIndexedRecordIO(idx_path, rec_path, "w") as w:
        for key, payload in enumerate(SPLIT_PAYLOADS):
            w.write_idx(key, payload)
    data = rec_path.read_bytes()
    assert data == b"".join(frame_record(p) for p in SPLIT_PAYLOADS)
    with MXIndexedRecordIO(idx_path, rec_path, "r") as r:
        for key in reversed(range(len(SPLIT_PAYLOADS))):
            assert r.read_idx(key) == SPLIT_PAYLOADS[key]
    with MXRecordIO(rec_path, "r") as r:
        assert [r.read() for _ in SPLIT_PAYLOADS] == SPLIT_PAYLOADS
        assert r.read() is None
    rebuilt = tmp_path / "rebuilt.idx"
    assert rebuild_index(rec_path, rebuilt) == len(SPLIT_PAYLOADS)
    assert rebuilt.read_text() == idx_path.read_text()


# ------------------------------------------------------------------------------------------
# pack / pack_img / writer -> reader
# ------------------------------------------------------------------------------------------

def test_pack_matches_mxnet_layout():
    assert pack(IRHeader(7, 3.0, 11, 12), b"xy") == struct.pack("<IfQQ", 0, 3.0, 11, 12) + b"xy"
    vec = pack(IRHeader(0, [1.5, 2.0, -1.0], 5, 0), b"xy")
    assert vec == struct.pack("<IfQQ", 3, 0.0, 5, 0) + np.array([1.5, 2, -1], "<f4").tobytes() + b"xy"
    header, payload = unpack(vec)
    assert header.flag == 3 and header.label.dtype == np.float32 and header.label.tolist() == [1.5, 2.0, -1.0]
    assert (header.id, header.id2, payload) == (5, 0, b"xy")
    header, payload = unpack(pack(IRHeader(0, 4, 1, 2), b""))
    assert header == IRHeader(0, 4.0, 1, 2) and payload == b""
    with pytest.raises(RecordIOError, match="shorter than the 24-byte IRHeader"):
        unpack(b"short")


def _random_image(rng, h, w):
    # Smooth content with distinct channels, so JPEG keeps channel order checkable.
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([200 + 0 * x, (x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1))], axis=-1)
    return np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("img_fmt", [".png", ".jpg"])
def test_pack_img_round_trip_rgb(img_fmt):
    import cv2
    rng = np.random.default_rng(0)
    img = _random_image(rng, 37, 53)
    header, decoded = unpack_img(pack_img(IRHeader(0, 3, 9, 0), img, img_fmt=img_fmt))
    assert header.label == 3.0 and header.id == 9
    assert decoded.shape == img.shape and decoded.dtype == np.uint8
    if img_fmt == ".png":
        np.testing.assert_array_equal(decoded, img)
    else:
        # The payload is OpenCV's JPEG of the BGR picture, exactly as mxnet.recordio.pack_img writes it.
        _, payload = unpack(pack_img(IRHeader(0, 3, 9, 0), img, quality=95))
        ok, ref = cv2.imencode(".jpg", img[:, :, ::-1].copy(), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok and payload == ref.tobytes()
        assert np.abs(decoded.astype(int) - img).mean() < 3
        np.testing.assert_allclose(decoded.reshape(-1, 3).mean(0), img.reshape(-1, 3).mean(0), atol=2)


def test_pack_img_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pack_img(IRHeader(0, 0, 0, 0), np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        pack_img(IRHeader(0, 0, 0, 0), np.zeros((4, 4, 4), np.uint8))


def test_unpack_img_garbage_names_key(tmp_path):
    rec_path, idx_path = tmp_path / "t.rec", tmp_path / "t.idx"
    with MXIndexedRecordIO(idx_path, rec_path, "w") as w:
        w.write_idx(0, pack(IRHeader(0, 1, 0, 0), b"not an image at all"))
        w.write_idx(1, pack(IRHeader(0, 1, 0, 0), b""))
    with MXIndexedRecordIO(idx_path, rec_path, "r") as r:
        with pytest.raises(RecordIOError, match="key 0"):
            r.read_img(0)
        with pytest.raises(RecordIOError, match="key 1"):
            r.read_img(1)


def _write_plain(folder, rng):
    """A plain-layout dataset: JPEG and PNG images, scalar and vector labels, two split records."""
    folder.mkdir(exist_ok=True)
    items = []
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "w") as w:
        for key in range(12):
            img = _random_image(rng, 20 + key, 30 - key)
            label = float(key % 4) if key % 3 else [float(key % 4), 0.25, 7.0]
            header = IRHeader(0, label, MAGIC if key == 5 else key, 0)  # key 5: magic inside the header
            record = pack_img(header, img, img_fmt=".png" if key % 2 else ".jpg")
            if key == 8:
                # Aligned magic words after the image: decoders ignore bytes after the end marker.
                record = record + bytes(-len(record) % 4) + MAGIC_BYTES * 2
            w.write_idx(key, record)
            items.append((key, img, label))
    return items


def test_writer_reader_round_trip_plain(tmp_path):
    items = _write_plain(tmp_path, np.random.default_rng(1))
    data, offsets = (tmp_path / "train.rec").read_bytes(), _idx_offsets(tmp_path)
    for key in (5, 8):  # the writer split these two records
        assert struct.unpack_from("<I", data, offsets[key] + 4)[0] >> 29 == 1
    layout = read_layout(tmp_path)
    assert layout.layout == "plain"  # record 0 has a vector label but, unlike a header, an image
    with pytest.raises(RecordIOError, match="not one"):
        read_layout(tmp_path, layout="insightface")
    assert layout.image_keys.tolist() == [k for k, _, _ in items]
    assert layout.labels.tolist() == [k % 4 for k, _, _ in items]
    with MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r") as r:
        assert r.keys == list(range(12))
        for key, img, label in items:
            header, decoded = r.read_img(key)
            assert header.id == (MAGIC if key == 5 else key)
            if isinstance(label, list):
                assert header.flag == 3 and header.label.tolist() == label
            else:
                assert header.flag == 0 and header.label == label
            if key % 2:
                np.testing.assert_array_equal(decoded, img)
            else:
                assert np.abs(decoded.astype(int) - img).mean() < 3
    rebuild_index(tmp_path / "train.rec", tmp_path / "again.idx")
    assert (tmp_path / "again.idx").read_text() == (tmp_path / "train.idx").read_text()


def _write_insightface(folder, counts, split_header_key=None, property_classes=None, relabel=None):
    """An InsightFace-layout dataset written with our writer: header, images 1..N, identity records.

    ``relabel`` maps image key -> a label other than its identity's (an inconsistent dataset)."""
    folder.mkdir(exist_ok=True)
    num_images = int(sum(counts))
    first_id = num_images + 1
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "w") as w:
        w.write_idx(0, pack(IRHeader(0, [first_id, first_id + len(counts)], 0, 0), b""))
        key = 1
        for label, count in enumerate(counts):
            for _ in range(count):
                img = np.full((8, 8, 3), (key * 7) % 256, np.uint8)
                header_id = MAGIC if key == split_header_key else key
                image_label = (relabel or {}).get(key, label)
                w.write_idx(key, pack_img(IRHeader(0, image_label, header_id, 0), img, img_fmt=".png"))
                key += 1
        start = 1
        for label, count in enumerate(counts):
            w.write_idx(first_id + label, pack(IRHeader(0, [start, start + count], first_id + label, 0), b""))
            start += count
    (folder / "property").write_text(f"{property_classes or len(counts)},8,8")


def test_writer_reader_round_trip_insightface(tmp_path):
    counts = [3, 1, 4, 2]
    _write_insightface(tmp_path, counts, split_header_key=5)
    layout = read_layout(tmp_path)
    assert layout.layout == "insightface"
    assert layout.image_keys.tolist() == list(range(1, 11))
    assert layout.labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    assert layout.identity_ranges.tolist() == [[1, 4], [4, 5], [5, 9], [9, 11]]
    assert (layout.num_classes, layout.image_size) == (4, (8, 8))
    with MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r") as r:
        assert unpack(r.read_idx(5))[0].id == MAGIC
        for i, key in enumerate(layout.image_keys.tolist()):
            header, img = r.read_img(key)
            assert int(header.label) == layout.labels[i] and img[0, 0, 0] == (key * 7) % 256


def test_layout_rejects_inconsistent_datasets(tmp_path):
    _write_insightface(tmp_path / "a", [2, 2], property_classes=3)
    with pytest.raises(RecordIOError, match="property.*3 classes"):
        read_layout(tmp_path / "a")
    _write_insightface(tmp_path / "b", [2, 2])
    lines = (tmp_path / "b" / "train.idx").read_text().splitlines()
    (tmp_path / "b" / "train.idx").write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # drop image key 3
    with pytest.raises(RecordIOError, match="no key 3"):
        read_layout(tmp_path / "b")
    _write_insightface(tmp_path / "c", [2, 2], relabel={2: 5})
    with pytest.raises(RecordIOError, match=r"label 5 is not below num_classes=2.*key 2"):
        read_layout(tmp_path / "c")
    _write_insightface(tmp_path / "d", [2, 2], relabel={2: 1})
    with pytest.warns(UserWarning, match="key 2 has label 1 in identity record 0"):
        layout = read_layout(tmp_path / "d")
    assert layout.labels.tolist() == [0, 1, 1, 1]  # the image headers win


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------

def test_truncated_file_names_key_and_offset(golden_dir, tmp_path):
    folder = _copy_golden(golden_dir, "insightface_small", tmp_path)
    offsets = _idx_offsets(folder)
    cut = offsets[49] + 100
    with open(folder / "train.rec", "r+b") as f:
        f.truncate(cut)
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as r:
        assert r.read_img(48)[1].shape == (112, 112, 3)
        with pytest.raises(RecordIOError, match=rf"truncated.*key 49, byte offset {offsets[49]}"):
            r.read_idx(49)
        with pytest.raises(RecordIOError, match=rf"beyond the end.*key 55, byte offset {offsets[55]}"):
            r.read_idx(55)
    with pytest.raises(RecordIOError, match=rf"beyond the end of the file.*key 50, byte offset {offsets[50]}"):
        read_layout(folder)  # identity records are checked first
    with pytest.raises(RecordIOError, match="truncated"):
        rebuild_index(folder / "train.rec", tmp_path / "x.idx")


def test_corrupt_magic_names_key_and_offset(golden_dir, tmp_path):
    folder = _copy_golden(golden_dir, "insightface_small", tmp_path)
    offset = _idx_offsets(folder)[5]
    with open(folder / "train.rec", "r+b") as f:
        f.seek(offset)
        f.write(b"\0\0\0\0")
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as r:
        with pytest.raises(RecordIOError, match=rf"bad magic.*train.rec.*key 5, byte offset {offset}"):
            r.read_idx(5)
        r.read_img(6)  # the rest of the file stays readable
    with pytest.raises(RecordIOError, match=rf"bad magic.*key 5, byte offset {offset}"):
        read_layout(folder)
    with pytest.raises(RecordIOError, match=rf"bad magic.*byte offset {offset}"):
        rebuild_index(folder / "train.rec", tmp_path / "x.idx")


def test_bad_index_entries(golden_dir, tmp_path):
    folder = _copy_golden(golden_dir, "plain_png", tmp_path)
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as r:
        with pytest.raises(RecordIOError, match=r"key 1000 is not in the index"):
            r.read_idx(np.int64(1000))  # keys from read_layout arrays are numpy integers
        r.seek(3)  # mxnet: seek takes a key
        assert r.read() == r.read_idx(3) and r.read() == r.read_idx(4)
    (folder / "train.idx").write_text("0\t0\n1\t99999999\n")
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as r:
        with pytest.raises(RecordIOError, match=r"beyond the end.*key 1, byte offset 99999999"):
            r.read_idx(1)
    with pytest.raises(RecordIOError, match=r"key 1, byte offset 99999999"):
        read_layout(folder)
    (folder / "train.idx").write_text("0\t0\n1\t2724\n0\t16420\n")
    with pytest.raises(RecordIOError, match="line 3: key 0 appears more than once"):
        read_layout(folder)
    (folder / "train.idx").write_text("0\t0\n1\toops\n")
    with pytest.raises(RecordIOError, match="line 2"):
        read_layout(folder)


def test_missing_index(golden_dir, tmp_path):
    folder = _copy_golden(golden_dir, "insightface_small", tmp_path)
    original = (folder / "train.idx").read_text()
    (folder / "train.idx").unlink()
    with pytest.raises(FileNotFoundError, match="rebuild-index"):
        read_layout(folder)
    with pytest.raises(FileNotFoundError, match="rebuild"):
        MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r")
    layout = read_layout(folder, rebuild_missing_index=True)
    assert (folder / "train.idx").read_text() == original
    assert layout.num_images == 49


def test_cli_rebuild_index(golden_dir, tmp_path, capsys):
    folder = _copy_golden(golden_dir, "plain_png", tmp_path)
    original = (folder / "train.idx").read_text()
    (folder / "train.idx").unlink()
    assert recordio._main(["rebuild-index", str(folder)]) == 0
    assert (folder / "train.idx").read_text() == original
    assert recordio._main(["rebuild-index", str(tmp_path / "nothing.rec")]) == 1


def test_mode_misuse(tmp_path):
    with MXRecordIO(tmp_path / "t.rec", "w") as w:
        w.write(b"abc")
        with pytest.raises(RecordIOError, match="open for writing"):
            w.read()
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(w)
    with MXRecordIO(tmp_path / "t.rec", "r") as r:
        with pytest.raises(RecordIOError, match="open for reading"):
            r.write(b"x")
    with pytest.raises(ValueError, match="flag"):
        MXRecordIO(tmp_path / "t.rec", "a")


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------

def test_reader_pickles_and_reads(golden_dir):
    folder, expected = _golden(golden_dir, "plain_png")
    reader = MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r")
    reader.read_idx(3)  # open a handle first: it must not travel with the pickle
    clone = pickle.loads(pickle.dumps(reader))
    assert _sha256(clone.read_img(2)[1]) == expected["images"][2]["rgb_sha256"]
    reader.close()
    clone.close()


class _GoldenImages:
    """Map-style dataset over a RecordIO folder, as a training loader would use it."""

    def __init__(self, folder):
        self.layout = read_layout(folder)
        self.rec = MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r")

    def __len__(self):
        return self.layout.num_images

    def __getitem__(self, i):
        _, img = self.rec.read_img(int(self.layout.image_keys[i]))
        return _sha256(img), int(self.layout.labels[i]), os.getpid()


def test_dataloader_with_two_workers(golden_dir):
    torch = pytest.importorskip("torch")
    folder, expected = _golden(golden_dir, "insightface_small")
    dataset = _GoldenImages(folder)
    dataset[0]  # the parent holds an open handle before the workers fork
    context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False,
                                         multiprocessing_context=context)
    hashes, labels, pids = [], [], set()
    for batch_hashes, batch_labels, batch_pids in loader:
        hashes += list(batch_hashes)
        labels += batch_labels.tolist()
        pids |= set(batch_pids.tolist())
    assert hashes == [e["rgb_sha256"] for e in expected["images"]]
    assert labels == [e["label"] for e in expected["images"]]
    assert os.getpid() not in pids and len(pids) == 2
    dataset.rec.close()


# ------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------

def _synthetic_insightface_fast(folder, num_images, num_classes):
    """Tiny-record InsightFace layout built with NumPy directly (the Python writer would take seconds)."""
    folder.mkdir(exist_ok=True)
    labels = np.sort(np.random.default_rng(0).integers(0, num_classes, num_images))
    labels[:num_classes] = np.arange(num_classes)  # every identity has an image
    labels.sort()
    counts = np.bincount(labels, minlength=num_classes)
    first_id = num_images + 1
    f32 = lambda a: np.asarray(a, "<f4").view("<u4")  # noqa: E731
    # header: magic, lrec, flag, label, id(2 words), id2(2 words), vector(2)
    head = np.array([MAGIC, 32, 2, 0, 0, 0, 0, 0, *f32([first_id, first_id + num_classes])], "<u4")
    images = np.zeros((num_images, 9), "<u4")  # IRHeader(0, label, key, 0) + 4-byte payload
    images[:, 0], images[:, 1], images[:, 2] = MAGIC, 28, 0
    images[:, 3] = f32(labels)
    images[:, 4] = np.arange(1, num_images + 1)
    images[:, 8] = 0x04030201
    starts = 1 + np.concatenate([[0], np.cumsum(counts)[:-1]])
    ids = np.zeros((num_classes, 10), "<u4")
    ids[:, 0], ids[:, 1], ids[:, 2] = MAGIC, 32, 2
    ids[:, 4] = first_id + np.arange(num_classes)
    ids[:, 8], ids[:, 9] = f32(starts), f32(starts + counts)
    data = np.concatenate([head, images.ravel(), ids.ravel()]).tobytes()
    (folder / "train.rec").write_bytes(data)
    sizes = np.concatenate([[40], np.full(num_images, 36), np.full(num_classes, 40)])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    (folder / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in enumerate(offsets.tolist())))
    (folder / "property").write_text(f"{num_classes},112,112")
    return labels, data


def test_read_layout_speed_200k(tmp_path):
    num_images, num_classes = 200_000, 5_000
    labels, data = _synthetic_insightface_fast(tmp_path, num_images, num_classes)
    # The NumPy-built records are what our writer writes.
    assert data[40:76] == frame_record(pack(IRHeader(0, float(labels[0]), 1, 0), b"\x01\x02\x03\x04"))
    start = time.perf_counter()
    layout = read_layout(tmp_path)
    seconds = time.perf_counter() - start
    print(f"\nread_layout on {num_images} records + {num_classes} identities: {seconds:.3f} s")
    np.testing.assert_array_equal(layout.labels, labels)
    assert layout.num_classes == num_classes and layout.identity_ranges[-1, 1] == num_images + 1
    assert seconds < 20  # a sanity bound only; expected well under a second
