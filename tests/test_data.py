"""Training datasets: RecordIO and image folders, kept lists, label maps, padding-aware items."""
import cv2
import numpy as np
import pytest
import torch

from utils.artifacts.files import ArtifactError
from utils.data.datasets import ImageFolderDataset, RecordDataset, open_dataset


def test_record_dataset_on_golden_files(golden_dir):
    ds = open_dataset(golden_dir / "recordio" / "insightface_small")
    assert isinstance(ds, RecordDataset) and len(ds) == ds.num_images == 49 and ds.num_classes == 12
    img, label, index = ds[0]
    assert img.shape == (3, 112, 112) and img.dtype.is_floating_point is False and index == 0
    # a padding duplicate (index >= len) returns a real image but reports sample index -1
    _, _, pad = ds[len(ds) + 3]
    assert pad == -1


def test_a_small_set_is_decoded_once_and_read_back_unchanged(golden_dir):
    import pickle

    folder = golden_dir / "recordio" / "insightface_small"
    cached = open_dataset(folder)
    first = [cached[i][0] for i in range(len(cached))]
    assert len(cached._cache) == len(cached)  # 49 images of 112x112: 1.8 MB, under the limit
    reads = []
    cached._open = lambda: reads.append(1)  # a second epoch reads no record
    again = [cached[i][0] for i in range(len(cached))]
    assert not reads and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not cached._cache[0].flags.writeable  # what later reads share cannot be changed in place
    del cached._open  # back to the class's reader before pickling
    assert pickle.loads(pickle.dumps(cached))._cache is None  # a worker process decodes for itself
    big = open_dataset(folder)
    big.cache_bytes = 112 * 112 * 3 * len(big) - 1  # one byte short of the whole set: no cache at all
    fresh = [big[i][0] for i in range(len(big))]
    assert big._cache is None and all(torch.equal(a, b) for a, b in zip(first, fresh))


def test_kept_list_and_label_map(golden_dir):
    full = open_dataset(golden_dir / "recordio" / "insightface_small")
    ids = np.unique(full.all_labels)[[2, 5]]
    kept = np.flatnonzero(np.isin(full.all_labels, ids))
    ds = RecordDataset(golden_dir / "recordio" / "insightface_small", kept, {int(ids[0]): 0, int(ids[1]): 1})
    assert len(ds) == len(kept) and ds.num_classes == 2
    assert sorted({ds[i][1] for i in range(len(ds))}) == [0, 1]
    assert [ds[i][2] for i in range(len(ds))] == kept.tolist()
    with pytest.raises(ArtifactError, match="label map drops"):
        RecordDataset(golden_dir / "recordio" / "insightface_small", kept, {int(ids[0]): 0})


def test_image_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for ident, n in (("bob", 2), ("alice", 3)):
        (tmp_path / ident).mkdir()
        for i in range(n):
            cv2.imwrite(str(tmp_path / ident / f"{i}.png"), rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 5 and ds.num_classes == 2
    assert ds.all_labels.tolist() == [0, 0, 0, 1, 1]  # sorted folder names: alice=0, bob=1
    img, label, idx = ds[4]
    assert img.shape == (3, 16, 16) and label == 1 and idx == 4
    assert ds.fingerprint.num_images == 5 and ds.fingerprint.num_classes == 2


def test_missing_index_names_the_fix(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(ArtifactError, match="rebuild-index"):
        RecordDataset(tmp_path)


# ------------------------------------------------------------------------------------- bad images
def _rec_with_a_garbage_payload(folder, num_images=6, bad_sample=3, odd_size=None):
    """An InsightFace-layout RecordIO (header at key 0, images at keys 1..n) whose sample `bad_sample` is garbage."""
    from utils.data import recordio

    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.arange(num_images) // 2
    first_id = num_images + 1
    with recordio.MXIndexedRecordIO(str(folder / "train.idx"), str(folder / "train.rec"), "w") as rec:
        rec.write_idx(0, recordio.pack(recordio.IRHeader(2, [first_id, first_id + labels.max() + 1], 0, 0), b""))
        for key in range(1, num_images + 1):
            header = recordio.IRHeader(0, float(labels[key - 1]), key, 0)
            img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
            if odd_size and key - 1 == bad_sample:  # a decodable image of another size
                img = rng.integers(0, 255, (odd_size, odd_size, 3), dtype=np.uint8)
            rec.write_idx(key, recordio.pack(header, b"garbage, not a JPEG") if key - 1 == bad_sample and not odd_size
                          else recordio.pack_img(header, img, img_fmt=".png"))
        for label in range(labels.max() + 1):
            start = 1 + 2 * label
            rec.write_idx(first_id + label, recordio.pack(recordio.IRHeader(2, [start, start + 2], 0, 0), b""))
    (folder / "property").write_text(f"{labels.max() + 1},16,16\n")
    return folder


def test_undecodable_record_names_file_key_and_sample(tmp_path):
    folder = _rec_with_a_garbage_payload(tmp_path / "rec")
    ds = open_dataset(folder)
    assert ds[2][2] == 2
    with pytest.raises(ArtifactError) as e:
        ds[3]
    assert str(e.value) == (f"{folder / 'train.rec'}: record key 4 (sample 3) is not an image OpenCV can decode; "
                            f"rerun with --skip_bad_images true to train without it, or replace the file")


def test_an_image_of_another_size_names_its_record_and_can_be_skipped(tmp_path):
    """One image of another size ended in a torch.stack traceback naming no record."""
    folder = _rec_with_a_garbage_payload(tmp_path / "rec", odd_size=20)
    with pytest.raises(ArtifactError) as e:
        open_dataset(folder)[3]
    assert str(e.value) == (f"{folder / 'train.rec'}: record key 4 (sample 3) is a 20x20x3 image where its property "
                            f"file says 16x16x3 (if every image says so, the property file is wrong); rerun with "
                            f"--skip_bad_images true to train without it, or replace the file")
    skipping = open_dataset(folder, skip_bad_images=True)
    assert skipping[3].sample_index == 3 and skipping[2][0].shape == (3, 16, 16)
    (folder / "property").write_text("3,24,24\n")  # a property that states the wrong size: the first image says so
    with pytest.raises(ArtifactError, match=r"record key 1 \(sample 0\) is a 16x16x3 image where its property file "
                                            r"says 24x24x3"):
        open_dataset(folder)[0]


def test_bad_image_from_a_dataloader_worker_is_one_line(tmp_path):
    from torch.utils.data import DataLoader

    ds = open_dataset(_rec_with_a_garbage_payload(tmp_path / "rec"))
    with pytest.raises(ArtifactError) as e:
        list(DataLoader(ds, batch_size=6, num_workers=1))
    assert str(e.value).startswith(f"{tmp_path / 'rec' / 'train.rec'}: record key 4 (sample 3) is not an image")
    assert "\n" not in str(e.value)


def test_skip_bad_images_drops_the_sample_and_warns_once(tmp_path, caplog):
    from torch.utils.data import DataLoader

    from utils.data.datasets import bad_samples, collate_skip_bad

    ds = open_dataset(_rec_with_a_garbage_payload(tmp_path / "rec"), skip_bad_images=True)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad)
    with caplog.at_level("WARNING", logger="diffprob"):
        for _ in range(2):  # two epochs: one warning
            batches = list(loader)
    images, labels, index = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 16, 16)
    assert index.tolist() == [0, 1, 2] and labels.tolist() == [0, 0, 1]
    assert batches[1][2].tolist() == [4, 5]
    assert 3 in bad_samples()
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert warnings == [f"skipping {tmp_path / 'rec' / 'train.rec'}: record key 4 (sample 3): not an image OpenCV "
                        f"can decode (skip_bad_images)"]
    # the flag survives a kept-list selection; a batch of only bad samples is empty, not an error
    only_bad = ds.select(np.array([3]))
    images, labels, index = collate_skip_bad([only_bad[0]])
    assert images.shape[0] == labels.shape[0] == index.shape[0] == 0


def test_undecodable_file_of_an_image_folder(tmp_path):
    (tmp_path / "alice").mkdir()
    cv2.imwrite(str(tmp_path / "alice" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "alice" / "1.jpg").write_bytes(b"truncated")
    ds = open_dataset(tmp_path)
    with pytest.raises(ArtifactError, match=r"1\.jpg \(sample 1\) is not an image OpenCV can decode; rerun with "
                                            r"--skip_bad_images true"):
        ds[1]
