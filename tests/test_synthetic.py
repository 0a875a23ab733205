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

from utils.data import recordio
from utils.data.alignment import align_face
from utils.synthetic.generator import (IJB_TARGETS, PROFILES, SyntheticConfig, generate_dataset, ijb_image, plan_ijb,
                             plan_pairs, plan_training_set, render_aligned, render_image, identity_render,
                             image_landmarks, pose_matrix, sample_identity, sample_variation, training_variation)
from utils.evaluation.verification import load_bin

REPO = Path(__file__).resolve().parents[1]
TINY = SyntheticConfig(num_ids=12, image_size=32, seed=3, flip_rate=0.1, open_rate=0.05, redundancy=0.1,
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
        pairs = plan_pairs(cfg, b)
        uids = pairs.pool_uid[pairs.position]
        assert ((uids >= cfg.val_uid0) & (uids < cfg.val_uid0 + cfg.num_val_ids)).all()
        uids = uids.reshape(-1, 2)
        assert np.array_equal(uids[:, 0] == uids[:, 1], pairs.issame) and pairs.issame.sum() == cfg.val_pairs
    held_out = [np.arange(cfg.val_uid0, cfg.ijb_uid0)]
    for target in IJB_TARGETS:
        ijb = plan_ijb(cfg, target)
        lo, hi = cfg.ijb_uid_range(target)
        assert ((ijb.uid >= lo) & (ijb.uid < hi)).all()
        held_out.append(ijb.uid)
    assert not np.isin(plan.source_uid, np.concatenate(held_out)).any()
    assert not np.isin(plan_ijb(cfg, "ijbb").uid, plan_ijb(cfg, "ijbc").uid).any()
    # long-tailed identity sizes, like CASIA-WebFace
    assert plan.counts.max() >= 5 * np.median(plan.counts)
    # near-duplicates re-shoot an earlier clean image of their own identity
    dup = np.flatnonzero(plan.dup_source >= 0)
    src = plan.dup_source[dup]
    assert 0.5 * cfg.redundancy * n < dup.size < 2 * cfg.redundancy * n
    assert (src < dup).all() and np.array_equal(plan.labels[src], plan.labels[dup])
    assert np.array_equal(plan.source_uid[src], plan.labels[src]) and (plan.dup_source[src] == -1).all()


def test_redundancy_is_the_share_of_each_identity_that_re_shoots():
    cfg = SyntheticConfig(num_ids=300, image_size=32, redundancy=0.4, redundant_id_share=1.0)
    plan = plan_training_set(cfg)
    assert np.array_equal(plan.redundant_ids, np.arange(cfg.num_ids)) and plan.dup_probability == 0.4
    is_dup = plan.dup_source >= 0
    # an identity's first clean image and its noisy images never re-shoot: the realised share is a bit lower
    assert 0.8 * cfg.redundancy < is_dup.mean() <= cfg.redundancy
    per_id = np.bincount(plan.labels[is_dup], minlength=cfg.num_ids) / plan.counts
    big = plan.counts >= 40
    assert abs(np.median(per_id[big]) - cfg.redundancy) < 0.06
    none = plan_training_set(dataclasses.replace(cfg, redundancy=0.0))
    assert (none.dup_source == -1).all()
    # the knob moves nothing but the re-shoots: same sizes and label noise
    assert np.array_equal(none.labels, plan.labels) and np.array_equal(none.source_uid, plan.source_uid)


def test_redundancy_needs_enough_redundant_identities():
    with pytest.raises(ValueError, match="redundant_id_share"):
        SyntheticConfig(redundancy=0.5).validate()
    SyntheticConfig(redundancy=0.5, redundant_id_share=1.0).validate()
    with pytest.raises(ValueError, match="ijb_targets"):
        SyntheticConfig(ijb_targets="ijbc,ijba").validate()


def test_redundancy_json_is_the_ground_truth(tiny):
    plan = plan_training_set(TINY)
    truth = json.loads((tiny / "redundancy.json").read_text())
    dup = np.flatnonzero(plan.dup_source >= 0)
    assert truth["index"] == dup.tolist() and truth["source"] == plan.dup_source[dup].tolist()
    assert (truth["redundancy"], truth["redundant_id_share"]) == (TINY.redundancy, TINY.redundant_id_share)
    assert truth["num_images"] == plan.num_images and truth["share"] == dup.size / plan.num_images
    assert truth["with_twin_share"] == np.union1d(dup, plan.dup_source[dup]).size / plan.num_images
    assert truth["redundant_identities"] == plan.redundant_ids.tolist()
    described = json.loads((tiny / "dataset.json").read_text())
    assert described["redundancy"]["share"] == truth["share"] and described["config"]["redundancy"] == TINY.redundancy


def test_ijbb_changes_no_other_file(tiny, tmp_path):
    generate_dataset(tmp_path / "ijbc_only", dataclasses.replace(TINY, ijb_targets="ijbc"), progress=False)
    first, only = _files(tiny), _files(tmp_path / "ijbc_only")
    assert [name for name in only if name != "dataset.json" and only[name] != first[name]] == []
    assert not [name for name in only if "ijbb" in name]


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


def test_default_verification_pairs_are_distinct_and_spread_over_identities():
    cfg = SyntheticConfig(num_ids=150, image_size=32)
    for b in (0, 1):
        pairs = plan_pairs(cfg, b)
        assert pairs.issame.size == 6000 and pairs.issame.sum() == 3000  # LFW's size: 3000 + 3000
        ab = np.sort(pairs.position.reshape(-1, 2), axis=1)
        genuine, impostor = ab[pairs.issame], ab[~pairs.issame]
        assert (genuine[:, 0] != genuine[:, 1]).all()  # two different images of one identity
        assert len(np.unique(genuine, axis=0)) == len(genuine) and len(np.unique(impostor, axis=0)) == len(impostor)
        per_id = np.bincount(pairs.pool_uid[genuine[:, 0]] - cfg.val_uid0, minlength=cfg.num_val_ids)
        assert per_id.max() - per_id.min() <= 1
        kin = [sample_identity(cfg, int(a)).family == sample_identity(cfg, int(b)).family
               for a, b in pairs.pool_uid[impostor]]
        assert 0.45 < np.mean(kin) < 0.6  # half hard negatives, plus chance family matches


def test_verification_bins_hold_balanced_pairs(tiny):
    for name in ("syn_frontal", "syn_pose"):
        (images, flipped), issame = load_bin(tiny / f"{name}.bin", image_size=(32, 32))
        assert images.shape == (4 * TINY.val_pairs, 3, 32, 32)
        assert issame.shape == (2 * TINY.val_pairs,) and issame.sum() == TINY.val_pairs


def _read_meta(meta, name):
    return [line.split() for line in (meta / name).read_text().splitlines()]


def test_ijb_targets_share_loose_crop_with_disjoint_images(tiny):
    names = {t: [row[0] for row in _read_meta(tiny / "ijb" / "meta", f"{t}_face_tid_mid.txt")] for t in IJB_TARGETS}
    assert not set(names["ijbc"]) & set(names["ijbb"])
    assert sorted(names["ijbc"] + names["ijbb"]) == sorted(p.name for p in (tiny / "ijb" / "loose_crop").iterdir())
    # IJB-C's files come first and do not depend on whether IJB-B is written beside them
    assert names["ijbc"][0] == "1.jpg" and names["ijbb"][0] == f"{len(names['ijbc']) + 1}.jpg"


@pytest.mark.parametrize("target", list(IJB_TARGETS))
def test_ijb_meta_files_are_consistent(tiny, target):
    root, meta = tiny / "ijb", tiny / "ijb" / "meta"
    tid_mid = _read_meta(meta, f"{target}_face_tid_mid.txt")
    names = [row[0] for row in tid_mid]
    assert set(names) <= {p.name for p in (root / "loose_crop").iterdir()}
    template_of = {row[0]: int(row[1]) for row in tid_mid}
    templates = set(template_of.values())
    assert len(templates) == TINY.ijb_templates

    five = _read_meta(meta, f"{target}_name_5pts_score.txt")
    assert [row[0] for row in five] == names
    for row in five:
        img = cv2.imread(str(root / "loose_crop" / row[0]))
        assert img.shape[0] > TINY.image_size and img.shape[1] > TINY.image_size  # loose, larger than aligned
        pts = np.array(row[1:11], float).reshape(5, 2)
        assert (pts > 0).all() and (pts[:, 0] < img.shape[1]).all() and (pts[:, 1] < img.shape[0]).all()
        assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # image-left eye and mouth corner first
        assert 0.6 <= float(row[11]) <= 1.0

    pairs = np.array(_read_meta(meta, f"{target}_template_pair_label.txt"), int)
    assert set(pairs[:, :2].ravel()) <= templates and set(pairs[:, 2]) == {0, 1}

    # 1:N files in the real release's naming: galleries G1/G2 (IJB-C), S1/S2 (IJB-B)
    g1, g2 = (f"{target}_1N_gallery_{g}.csv" for g in IJB_TARGETS[target]["galleries"])
    probe = f"{target}_1N_probe_mixed.csv"
    rows = {}
    for name in (g1, g2, probe):
        with open(meta / name, newline="") as f:
            reader = csv.DictReader(f)
            assert reader.fieldnames == ["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"]
            rows[name] = list(reader)
        for r in rows[name]:
            assert template_of[r["FILENAME"]] == int(r["TEMPLATE_ID"])
    subjects = {k: {r["SUBJECT_ID"] for r in v} for k, v in rows.items()}
    assert not subjects[g1] & subjects[g2]
    assert subjects[probe] <= subjects[g1] | subjects[g2]
    subject_of = {int(r["TEMPLATE_ID"]): r["SUBJECT_ID"] for v in rows.values() for r in v}
    assert set(subject_of) == templates
    # a pair is genuine exactly when both templates show the same subject
    assert all((subject_of[a] == subject_of[b]) == bool(lab) for a, b, lab in pairs)


@pytest.mark.parametrize("target", list(IJB_TARGETS))
def test_ijb_landmarks_written_are_the_rendered_ones(tiny, target):
    ijb = plan_ijb(TINY, target)
    k = ijb.uid.size - 1  # the target's last image
    _, _, detected, score = ijb_image(TINY, k + 1, int(ijb.uid[k]), int(ijb.media[k]), int(ijb.frame[k]), target)
    row = _read_meta(tiny / "ijb" / "meta", f"{target}_name_5pts_score.txt")[k]
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
    cmd = [sys.executable, "make_synthetic_dataset.py", "--out", str(out), "--num_ids", "5", "--image_size", "24",
           "--seed", "1", "--flip_rate", "0.1", "--open_rate", "0.05", "--val_pairs", "4", "--ijb_ids", "2",
           "--ijb_templates", "4", "--workers", "1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "images of 5 identities" in done.stdout
    assert json.loads((out / "noise.json").read_text())["num_classes"] == 5
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "--overwrite" in again.stderr
    bad = subprocess.run(cmd + ["--flip_rate", "0.7"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "flip_rate" in bad.stderr
    bad = subprocess.run(cmd + ["--redundancy", "0.5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "redundant_id_share" in bad.stderr
    knobs = subprocess.run(cmd + ["--ijb_targets", "ijbb", "--redundancy", "0.3", "--redundant_id_share", "1",
                                  "--overwrite"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert knobs.returncode == 0, knobs.stderr
    assert json.loads((out / "redundancy.json").read_text())["redundancy"] == 0.3
    assert sorted(p.name for p in (out / "ijb" / "meta").iterdir() if "ijbc" in p.name) == []
