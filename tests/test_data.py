"""Training datasets: RecordIO and image folders, kept lists, label maps, padding-aware items."""
import cv2
import numpy as np
import pytest

from utils.artifacts import ArtifactError
from utils.data import ImageFolderDataset, RecordDataset, open_dataset


def test_record_dataset_on_golden_files(golden_dir):
    ds = open_dataset(golden_dir / "recordio" / "insightface_small")
    assert isinstance(ds, RecordDataset) and len(ds) == ds.num_images == 49 and ds.num_classes == 12
    img, label, index = ds[0]
    assert img.shape == (3, 112, 112) and img.dtype.is_floating_point is False and index == 0
    # a padding duplicate (index >= len) returns a real image but reports sample index -1
    _, _, pad = ds[len(ds) + 3]
    assert pad == -1


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
