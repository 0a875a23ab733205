"""The synthetic dataset: deterministic, in the real formats, with the noise and held-out sets it claims."""
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils import recordio
from utils.alignment import align_face
from utils.synthetic import (PROFILES, SyntheticConfig, generate_dataset, ijb_image, plan_ijb, plan_pairs,
                             plan_training_set, render_aligned, render_image, identity_render, image_landmarks,
                             pose_matrix, sample_variation, training_variation)
from utils.verification import load_bin

REPO = Path(__file__).resolve().parents[1]
TINY = SyntheticConfig(num_ids=12, image_size=32, seed=3, flip_rate=0.1, open_rate=0.05, dup_rate=0.1,
                       min_images=5, max_images=30, median_images=10, num_val_ids=6, val_pairs=20,
                       ijb_ids=4, ijb_templates=10)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "tiny"
    generate_dataset(out, TINY, workers=1, progress=False)
    return out


def test_same_seed_gives_identical_files_whatever_the_workers(tiny, tmp_path):
    generate_dataset(tmp_path / "again", TINY, workers=2, progress=False)
    first, again = _files(tiny), _files(tmp_path / "again")
    assert sorted(first) == sorted(again)
    assert [name for name in first if first[name] != again[name]] == []


def test_another_seed_gives_other_images(tiny, tmp_path):
    generate_dataset(tmp_path / "other", dataclasses.replace(TINY, seed=TINY.seed + 1), workers=1, progress=False)
    first, other = _files(tiny), _files(tmp_path / "other")
    for name in ("train.rec", "syn_frontal.bin", "noise.json", "ijb/loose_crop/1.jpg"):
        assert first[name] != other[name], name


def test_training_set_in_the_insightface_layout(tiny):
    layout = recordio.read_layout(tiny)
    description = json.loads((tiny / "dataset.json").read_text())
    counts = np.array(description["identity_counts"])
    assert layout.layout == "insightface"
    assert layout.num_classes == TINY.num_ids and layout.num_images == counts.sum()
    assert layout.image_size == (32, 32)
    assert (tiny / "property").read_text().strip() == f"{TINY.num_ids},32,32"
    # images contiguous per identity, in label order, sizes within [min, max]
    assert np.array_equal(layout.labels, np.repeat(np.arange(TINY.num_ids), counts))
    assert counts.min() >= TINY.min_images and counts.max() <= TINY.max_images
    ends = np.cumsum(counts) + 1
    assert np.array_equal(layout.identity_ranges, np.stack([ends - counts, ends], 1))
    assert np.array_equal(layout.image_keys, np.arange(1, counts.sum() + 1))

    with recordio.MXIndexedRecordIO(str(tiny / "train.idx"), str(tiny / "train.rec"), "r") as rec:
        header0, _ = recordio.unpack(rec.read_idx(0))
        assert header0.flag == 2 and list(header0.label) == [counts.sum() + 1, counts.sum() + 1 + TINY.num_ids]
        for key in (1, int(counts.sum())):
            header, img = recordio.unpack_img(rec.read_idx(key))
            assert header.id == key and header.label == layout.labels[key - 1]
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8 and img.std() > 5


def test_noise_json_agrees_with_the_records(tiny):
    layout = recordio.read_layout(tiny)
    noise = json.loads((tiny / "noise.json").read_text())
    n = layout.num_images
    assert (noise["num_images"], noise["num_classes"], noise["seed"]) == (n, TINY.num_ids, TINY.seed)
    assert (noise["flip_rate"], noise["open_rate"]) == (TINY.flip_rate, TINY.open_rate)
    flipped = np.array([d["index"] for d in noise["flipped"]])
    open_set = np.array([d["index"] for d in noise["open_set"]])
    assert len(flipped) == round(TINY.flip_rate * n) and len(open_set) == round(TINY.open_rate * n)
    assert not set(flipped) & set(open_set)
    for d in noise["flipped"] + noise["open_set"]:
        assert 0 <= d["index"] < n and d["label"] == layout.labels[d["index"]]
    for d in noise["flipped"]:
        assert d["true_label"] != d["label"] and 0 <= d["true_label"] < TINY.num_ids
    # every identity keeps a clean majority
    noisy_per_id = np.bincount(layout.labels[np.r_[flipped, open_set].astype(int)], minlength=TINY.num_ids)
    assert (noisy_per_id <= (np.bincount(layout.labels) - 1) // 2).all()


def test_plan_draws_each_population_from_its_own_identities():
    cfg = dataclasses.replace(TINY, num_ids=400, max_images=300, num_val_ids=50, ijb_ids=20, ijb_templates=60,
                              val_pairs=100)
    plan = plan_training_set(cfg)
    n = plan.num_images
    clean = np.setdiff1d(np.arange(n), np.r_[plan.flipped, plan.open_set])
    assert np.array_equal(plan.source_uid[clean], plan.labels[clean])
    assert (plan.source_uid[plan.flipped] < cfg.num_ids).all()
    assert (plan.source_uid[plan.flipped] != plan.labels[plan.flipped]).all()
    assert ((plan.source_uid[plan.open_set] >= cfg.open_uid0)
            & (plan.source_uid[plan.open_set] < cfg.open_uid0 + cfg.num_open_ids)).all()
    # held-out identities never appear in training, and verification and IJB sets are disjoint
    for b in (0, 1):
        uids, issame = plan_pairs(cfg, b)
        assert ((uids >= cfg.val_uid0) & (uids < cfg.val_uid0 + cfg.num_val_ids)).all()
        pairs = uids.reshape(-1, 2)
        assert np.array_equal(pairs[:, 0] == pairs[:, 1], issame) and issame.sum() == cfg.val_pairs
    ijb = plan_ijb(cfg)
    assert ((ijb.uid >= cfg.ijb_uid0) & (ijb.uid < cfg.ijb_uid0 + cfg.ijb_ids)).all()
    assert not np.isin(plan.source_uid, np.r_[ijb.uid, np.arange(cfg.val_uid0, cfg.ijb_uid0)]).any()
    # long-tailed identity sizes, like CASIA-WebFace
    assert plan.counts.max() >= 5 * np.median(plan.counts)
    # near-duplicates re-shoot an earlier clean image of their own identity
    dup = np.flatnonzero(plan.dup_source >= 0)
    src = plan.dup_source[dup]
    assert 0.5 * cfg.dup_rate * n < dup.size < 2 * cfg.dup_rate * n
    assert (src < dup).all() and np.array_equal(plan.labels[src], plan.labels[dup])
    assert np.array_equal(plan.source_uid[src], plan.labels[src]) and (plan.dup_source[src] == -1).all()


def test_near_duplicates_look_alike():
    plan = plan_training_set(TINY)
    i = int(np.flatnonzero(plan.dup_source >= 0)[0])
    j = int(plan.dup_source[i])
    label = plan.labels[i]
    others = [k for k in np.flatnonzero(plan.labels == label) if k not in (i, j) and plan.dup_source[k] < 0
              and plan.source_uid[k] == label]

    def img(k):
        return render_aligned(TINY, int(plan.source_uid[k]), training_variation(TINY, k, int(plan.dup_source[k]))).astype(float)

    dup_diff = np.abs(img(i) - img(j)).mean()
    other_diff = np.mean([np.abs(img(k) - img(j)).mean() for k in others[:5]])
    assert dup_diff < 0.5 * other_diff


def test_verification_bins_hold_balanced_pairs(tiny):
    for name in ("syn_frontal", "syn_pose"):
        (images, flipped), issame = load_bin(tiny / f"{name}.bin", image_size=(32, 32))
        assert images.shape == (4 * TINY.val_pairs, 3, 32, 32)
        assert issame.shape == (2 * TINY.val_pairs,) and issame.sum() == TINY.val_pairs


def _read_meta(meta, name):
    return [line.split() for line in (meta / name).read_text().splitlines()]


def test_ijb_meta_files_are_consistent(tiny):
    root, meta = tiny / "ijb", tiny / "ijb" / "meta"
    tid_mid = _read_meta(meta, "ijbc_face_tid_mid.txt")
    names = [row[0] for row in tid_mid]
    assert sorted(names) == sorted(p.name for p in (root / "loose_crop").iterdir())
    template_of = {row[0]: int(row[1]) for row in tid_mid}
    templates = set(template_of.values())
    assert len(templates) == TINY.ijb_templates

    five = _read_meta(meta, "ijbc_name_5pts_score.txt")
    assert [row[0] for row in five] == names
    for row in five:
        img = cv2.imread(str(root / "loose_crop" / row[0]))
        assert img.shape[0] > TINY.image_size and img.shape[1] > TINY.image_size  # loose, larger than aligned
        pts = np.array(row[1:11], float).reshape(5, 2)
        assert (pts > 0).all() and (pts[:, 0] < img.shape[1]).all() and (pts[:, 1] < img.shape[0]).all()
        assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # image-left eye and mouth corner first
        assert 0.6 <= float(row[11]) <= 1.0

    pairs = np.array(_read_meta(meta, "ijbc_template_pair_label.txt"), int)
    assert set(pairs[:, :2].ravel()) <= templates and set(pairs[:, 2]) == {0, 1}

    rows = {}
    for name in ("ijbc_1N_gallery_G1.csv", "ijbc_1N_gallery_G2.csv", "ijbc_1N_probe_mixed.csv"):
        with open(meta / name, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"]
            rows[name] = list(reader)
        for r in rows[name]:
            assert template_of[r["FILENAME"]] == int(r["TEMPLATE_ID"])
    subjects = {k: {r["SUBJECT_ID"] for r in v} for k, v in rows.items()}
    assert not subjects["ijbc_1N_gallery_G1.csv"] & subjects["ijbc_1N_gallery_G2.csv"]
    assert subjects["ijbc_1N_probe_mixed.csv"] <= subjects["ijbc_1N_gallery_G1.csv"] | subjects["ijbc_1N_gallery_G2.csv"]
    subject_of = {int(r["TEMPLATE_ID"]): r["SUBJECT_ID"] for v in rows.values() for r in v}
    assert set(subject_of) == templates
    # a pair is genuine exactly when both templates show the same subject
    assert all((subject_of[a] == subject_of[b]) == bool(lab) for a, b, lab in pairs)


def test_ijb_landmarks_written_are_the_rendered_ones(tiny):
    ijb = plan_ijb(TINY)
    _, _, detected, score = ijb_image(TINY, 1, int(ijb.uid[0]), int(ijb.media[0]), int(ijb.frame[0]))
    row = _read_meta(tiny / "ijb" / "meta", "ijbc_name_5pts_score.txt")[0]
    assert np.allclose(np.array(row[1:11], float), detected.reshape(-1), atol=1e-3)
    assert float(row[11]) == pytest.approx(score, abs=1e-4)


def test_aligning_a_loose_crop_by_its_landmarks_gives_the_training_frame():
    cfg = dataclasses.replace(TINY, image_size=64)
    size, crop = 64, 112
    still = dict(sample_variation(np.random.default_rng(0), PROFILES["frontal"]), rotation=0.0, scale=1.0,
                 shift=np.zeros(2), yaw=0.0, pitch=0.0, smile=0.0, gain=1.0, cast=np.ones(3), gradient=0.0,
                 gamma=1.0, blur=0.0, lowres=1.0, noise=0.0, occluder=-1)
    # the face region of the aligned frame (canonical units 28..84 x 36..100)
    face = (slice(36 * size // 112, 100 * size // 112), slice(28 * size // 112, 84 * size // 112))
    diffs, other = [], []
    for uid, angle, zoom, offset in ((0, 20.0, 0.9, (8, -5)), (1, -12.0, 1.1, (-6, 4)), (2, 5.0, 0.8, (0, 9))):
        direct = render_aligned(cfg, uid, still).astype(float)
        p, base, scale = identity_render(cfg, uid)
        var = dict(still, rotation=angle, scale=zoom)
        M = pose_matrix(var, size / 112.0, np.array([crop / 2 + offset[0], crop / 2 + offset[1]]))
        loose = render_image(base, scale, p, var, M, (crop, crop))
        aligned = align_face(loose, image_landmarks(p, var, M), size).astype(float)
        diffs.append(np.abs(aligned[face] - direct[face]).mean())
        other.append(np.abs(aligned[face] - render_aligned(cfg, uid + 3, still).astype(float)[face]).mean())
    assert max(diffs) < 4.0, diffs
    assert min(other) > 3 * max(diffs), (diffs, other)


def test_refuses_a_non_empty_folder_and_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    small = dataclasses.replace(TINY, num_ids=4, val_pairs=0, ijb_templates=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_dataset(out, small, progress=False)
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    generate_dataset(out, small, overwrite=True, progress=False)
    assert not (out / "mine.txt").exists() and (out / "train.rec").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "make_synthetic_dataset.py", "--out", str(out), "--num-ids", "5", "--image-size", "24",
           "--seed", "1", "--flip-rate", "0.1", "--open-rate", "0.05", "--val-pairs", "4", "--ijb-ids", "2",
           "--ijb-templates", "4", "--workers", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "images of 5 identities" in done.stdout
    assert json.loads((out / "noise.json").read_text())["num_classes"] == 5
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    bad = subprocess.run(cmd + ["--flip-rate", "0.7"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "flip_rate" in bad.stderr
