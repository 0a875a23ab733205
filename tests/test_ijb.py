"""IJB-B/C evaluation (utils/evaluation/ijb.py) and five-point alignment (utils/data/alignment.py)."""
import csv
import os
from fractions import Fraction
from itertools import combinations

import cv2
import numpy as np
import pytest
import torch

from utils.data.alignment import ARCFACE_TEMPLATE_112, align_face, arcface_template, estimate_similarity
from utils.evaluation.ijb import (FAR_TARGETS, FPIR_TARGETS, RANKS, IJBFeatures, IJBMetaError, auc, evaluate_ijb,
                       extract_features, identification_metrics, image2template_features, image_features,
                       load_ijb_meta, plot_roc, roc_curve, tar_at_far, template_pair_scores)
from utils.evaluation.verification import far_label

# ----------------------------------------------------------------------------------------------------
# Alignment


def _similarity(scale, angle_deg, tx, ty):
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def _smooth_face(seed, size=112):
    """A smooth random RGB texture: bilinear resampling of it is nearly exact."""
    small = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def test_template_scales_with_crop_size():
    np.testing.assert_allclose(arcface_template(112), ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(arcface_template(224), 2 * ARCFACE_TEMPLATE_112)


def test_estimate_similarity_recovers_a_known_transform():
    matrix = _similarity(1.7, -23.0, 31.5, -4.25)
    src = ARCFACE_TEMPLATE_112
    np.testing.assert_allclose(estimate_similarity(src, _apply(matrix, src)), matrix, atol=1e-10)


def test_mirrored_landmarks_give_a_rotation_not_a_reflection():
    mirrored = ARCFACE_TEMPLATE_112 * [-1, 1] + [112, 0]
    matrix = estimate_similarity(mirrored, ARCFACE_TEMPLATE_112)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_align_face_undoes_a_similarity_warp():
    face = _smooth_face(0)
    forward = _similarity(1.6, 28.0, 95.0, 40.0)
    canvas = cv2.warpAffine(face, forward, (320, 320), flags=cv2.INTER_LINEAR)
    landmarks = _apply(forward, ARCFACE_TEMPLATE_112)

    back = estimate_similarity(landmarks, arcface_template(112))
    assert np.abs(_apply(back, landmarks) - ARCFACE_TEMPLATE_112).max() < 0.01

    aligned = align_face(canvas, landmarks, 112)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    inner = (slice(8, 104), slice(8, 104))
    diff = np.abs(aligned[inner].astype(int) - face[inner].astype(int))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 8


def test_degenerate_landmarks_are_refused():
    with pytest.raises(ValueError, match="degenerate"):
        align_face(np.zeros((50, 50, 3), np.uint8), np.ones((5, 2)))


# ----------------------------------------------------------------------------------------------------
# Literal, loop-by-loop statements of the IJB numbers, to hold the vectorised code to.


def reference_roc_points(labels, scores):
    """sklearn's roc_curve as counts [(false accepts, true accepts)], accept when score >= threshold: (0, 0),
    then one point per distinct score from high to low, less the inner points that sklearn's
    drop_intermediate removes (the step into the point equals the step out of it)."""
    points = []
    for threshold in sorted(set(scores), reverse=True):
        accepted = [label for label, score in zip(labels, scores) if score >= threshold]
        points.append((accepted.count(0), accepted.count(1)))
    if len(points) > 2:
        points = [points[0]] + [b for a, b, c in zip(points, points[1:], points[2:])
                                if (b[0] - a[0], b[1] - a[1]) != (c[0] - b[0], c[1] - b[1])] + [points[-1]]
    return [(0, 0)] + points


def reference_tar_at_far(labels, scores, far, rule="nearest"):
    """TAR at FAR read off the ROC: 'nearest' (InsightFace) takes the point whose FPR is nearest `far`, the
    last such point on ties (the largest TPR); 'floor' the last point whose FPR is at most `far`."""
    labels = [int(label) for label in labels]
    num_impostor, num_genuine = labels.count(0), labels.count(1)
    best_distance, tar = None, None
    for fp, tp in reference_roc_points(labels, scores):
        fpr, tpr = fp / num_impostor, tp / num_genuine
        if rule == "floor" and fpr <= far:
            tar = tpr
        if rule == "nearest" and (best_distance is None or abs(fpr - far) <= best_distance):
            best_distance, tar = abs(fpr - far), tpr
    return tar


def reference_auc(labels, scores):
    """The ROC's area as the Mann-Whitney count: the fraction of (genuine, impostor) pairs in which the genuine
    pair scores higher, a tie counting one half."""
    genuine = [s for s, label in zip(scores, labels) if label == 1]
    impostor = [s for s, label in zip(scores, labels) if label == 0]
    wins = sum((g > i) + 0.5 * (g == i) for g in genuine for i in impostor)
    return wins / (len(genuine) * len(impostor))


def reference_template_features(features, meta, flip_test=True):
    """{template id: feature} as InsightFace's eval_ijbc.py (norm kept, times the detector score): per
    template, the mean image feature of each of its media, summed, then divided by its norm."""
    image_feats = features.img_feats.astype(np.float64)
    if flip_test:
        image_feats = image_feats + features.flip_feats
    image_feats = image_feats * meta.faceness[:, None]
    out = {}
    for template in np.unique(meta.templates):
        total = 0
        for media in np.unique(meta.medias[meta.templates == template]):
            total = total + image_feats[(meta.templates == template) & (meta.medias == media)].mean(axis=0)
        out[int(template)] = total / np.linalg.norm(total)
    return out


def reference_identification(template, probe, gallery, ranks=RANKS, fpir_targets=FPIR_TARGETS):
    """identification_metrics by a loop over the probes. A mated probe's rank is 1 + the number of other
    subjects' gallery templates scoring at least its best mated score; at FPIR f the threshold is the lowest
    non-mated top score (or -inf) at which at most floor(f * #non-mated) non-mated probes score above it."""
    gallery_templates, gallery_subjects = gallery
    ranks_of_mated, best_of_mated, top_of_nonmated = [], [], []
    for probe_template, subject in zip(*probe):
        scores = [float(template[probe_template] @ template[g]) for g in gallery_templates]
        mated = [s for s, g in zip(scores, gallery_subjects) if g == subject]
        if mated:
            best_of_mated.append(max(mated))
            ranks_of_mated.append(1 + sum(s >= max(mated) for s, g in zip(scores, gallery_subjects) if g != subject))
        else:
            top_of_nonmated.append(max(scores))
    out = {f"rank-{k}": sum(r <= k for r in ranks_of_mated) / len(ranks_of_mated) for k in ranks}
    for fpir in fpir_targets:
        allowed = int(Fraction(repr(fpir)) * len(top_of_nonmated))  # floor, in exact decimal arithmetic
        threshold = min(t for t in top_of_nonmated + [-np.inf] if sum(x > t for x in top_of_nonmated) <= allowed)
        hits = sum(r == 1 and b > threshold for r, b in zip(ranks_of_mated, best_of_mated))
        out[f"TPIR@FPIR={fpir:g}"] = hits / len(ranks_of_mated)
    out.update(num_mated_probes=len(ranks_of_mated), num_nonmated_probes=len(top_of_nonmated),
               num_gallery_templates=len(gallery_templates))
    return out


def reference_ijb(features, meta, flip_test=True):
    """evaluate_ijb's 1:1 numbers and 1:N metrics (default options otherwise) by loops, from the raw features."""
    template = reference_template_features(features, meta, flip_test)
    scores = [float(template[a] @ template[b]) for a, b in meta.pair_templates]
    labels = meta.pair_labels.tolist()
    out = {f"TAR@FAR={far_label(far)}": reference_tar_at_far(labels, scores, far) for far in FAR_TARGETS}
    out.update(auc=reference_auc(labels, scores), pair_scores=scores)
    if meta.probe is not None:
        one_to_n = {name: reference_identification(template, meta.probe, gallery)
                    for name, gallery in meta.galleries.items()}
        metric_names = [k for k in one_to_n["G1"] if k.startswith(("rank-", "TPIR@"))]
        one_to_n["mean"] = {k: sum(r[k] for r in one_to_n.values()) / len(one_to_n) for k in metric_names}
        out["1:N"] = one_to_n
    return out


def assert_equals_reference(result, reference):
    """Every TAR exactly (the same ROC point is picked), the AUC and the 1:N metrics to rounding."""
    tar_keys = [f"TAR@FAR={far_label(far)}" for far in FAR_TARGETS]
    assert {k: result[k] for k in tar_keys} == {k: reference[k] for k in tar_keys}
    assert result["auc"] == pytest.approx(reference["auc"], abs=1e-12)
    assert ("1:N" in result) == ("1:N" in reference)
    if "1:N" in reference:
        assert set(result["1:N"]) == set(reference["1:N"])
        for name, metrics in reference["1:N"].items():
            assert result["1:N"][name] == pytest.approx(metrics, abs=1e-12), name


# ----------------------------------------------------------------------------------------------------
# 1:1 metrics


def test_roc_curve_matches_sklearn_documented_example():
    # sklearn's roc_curve docstring: y = [1, 1, 2, 2] (positive 2), scores [0.1, 0.4, 0.35, 0.8]
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_roc_curve_without_dropping_is_the_brute_force_curve():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 2)  # many ties
    labels = rng.integers(0, 2, 300)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    for f, t, th in zip(fpr[1:], tpr[1:], thresholds[1:]):
        accept = scores >= th
        assert f == np.sum(accept & (labels == 0)) / np.sum(labels == 0)
        assert t == np.sum(accept & (labels == 1)) / np.sum(labels == 1)
    kept_fpr, kept_tpr, _ = roc_curve(labels, scores)
    points = set(zip(fpr, tpr))
    assert set(zip(kept_fpr, kept_tpr)) <= points and len(kept_fpr) < len(fpr)


@pytest.mark.parametrize("rule", ["nearest", "floor"])
def test_separable_scores_give_tar_one_everywhere(rule):
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(2000, int), np.zeros(20000, int)]
    scores = np.r_[rng.uniform(0.6, 1.0, 2000), rng.uniform(-1.0, 0.5, 20000)]
    fpr, tpr, _ = roc_curve(labels, scores)
    assert all(t == 1.0 for t in tar_at_far(fpr, tpr, rule=rule).values())


def test_random_scores_give_tar_close_to_far():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400_000)
    fpr, tpr, _ = roc_curve(labels, rng.random(labels.size))
    tars = tar_at_far(fpr, tpr, far_targets=(1e-1, 1e-2))
    assert tars[1e-1] == pytest.approx(1e-1, abs=5e-3)
    assert tars[1e-2] == pytest.approx(1e-2, abs=2e-3)


def test_tar_rules_on_a_hand_made_curve():
    fpr = np.array([0.0, 0.0, 0.1, 0.1, 0.3, 1.0])
    tpr = np.array([0.0, 0.2, 0.4, 0.6, 0.9, 1.0])
    # nearest FPR to 0.25 is 0.3 (above the target): InsightFace's pick
    assert tar_at_far(fpr, tpr, (0.25,))[0.25] == 0.9
    # at FPR 0.1 two points: the larger TPR wins
    assert tar_at_far(fpr, tpr, (0.12,))[0.12] == 0.6
    assert tar_at_far(fpr, tpr, (0.25,), rule="floor")[0.25] == 0.6
    with pytest.raises(ValueError, match="valid"):
        tar_at_far(fpr, tpr, rule="median")


def test_tar_and_auc_of_ten_scores_by_hand():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.3, 0.75, 0.5, 0.4, 0.2, 0.1, 0.0]
    fpr, tpr, _ = roc_curve(labels, scores)
    # accepted (impostors, genuine) from the highest score down: (0,1) (0,2) (1,2) (1,3) (2,3) (3,3) (3,4) (4,4)
    # (5,4) (6,4); sklearn drops (2,3), (4,4) and (5,4): the step into each equals the step out of it
    np.testing.assert_allclose(fpr, np.array([0, 0, 0, 1, 1, 3, 3, 6]) / 6)
    np.testing.assert_allclose(tpr, np.array([0, 1, 2, 2, 3, 3, 4, 4]) / 4)
    # FAR 1e-1: the nearest FPR is 1/6 (0.067 away, FPR 0 is 0.1 away), twice: the larger TPR, 3/4.
    # FAR 0.4: the nearest FPR left is 1/2 -> TPR 1 (the dropped point (2,3), FPR 1/3, would have given 3/4).
    # floor at 1e-1: the last point with FPR 0 -> 2/4.
    assert tar_at_far(fpr, tpr, (1e-1, 0.4)) == {1e-1: 0.75, 0.4: 1.0}
    assert tar_at_far(fpr, tpr, (1e-1,), rule="floor") == {1e-1: 0.5}
    # AUC: genuine 0.9 and 0.8 beat all 6 impostors, 0.7 beats 5, 0.3 beats 3 -> 20 of 24 pairs
    assert auc(fpr, tpr) == pytest.approx(20 / 24, abs=1e-15)
    assert (reference_tar_at_far(labels, scores, 1e-1), reference_tar_at_far(labels, scores, 0.4)) == (0.75, 1.0)
    assert reference_tar_at_far(labels, scores, 1e-1, "floor") == 0.5 and reference_auc(labels, scores) == 20 / 24


@pytest.mark.parametrize("seed", range(4))
def test_tar_at_far_and_auc_equal_a_loop_over_thresholds(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels, 1.0), 1)  # ties, and straight stretches of the ROC that sklearn drops
    fpr, tpr, _ = roc_curve(labels, scores)
    fars = (1e-2, 3e-2, 1e-1, 0.25, 0.5)
    for rule in ("nearest", "floor"):
        expected = {far: reference_tar_at_far(labels, scores, far, rule) for far in fars}
        assert tar_at_far(fpr, tpr, fars, rule) == expected, rule
    assert auc(fpr, tpr) == pytest.approx(reference_auc(labels, scores), abs=1e-12)


# ----------------------------------------------------------------------------------------------------
# Template features


def test_template_pooling_by_hand():
    feats = np.array([[1, 0], [3, 0], [0, 2], [0, 1], [5, 5], [1, 1]], dtype=np.float32)
    flips = np.array([[1, 0], [1, 0], [0, 0], [0, 1], [1, 1], [1, 1]], dtype=np.float32)
    faceness = np.array([1, 1, 0.5, 1, 1, 2], dtype=np.float32)
    templates = np.array([7, 7, 7, 7, 3, 3])
    medias = np.array([1, 1, 2, 2, 9, 8])

    inputs = image_features(feats, flips, faceness)  # flip sum, keep norm, times faceness
    np.testing.assert_allclose(inputs, [[2, 0], [4, 0], [0, 1], [0, 2], [6, 6], [4, 4]])
    pooled, ids = image2template_features(inputs, templates, medias)
    np.testing.assert_array_equal(ids, [3, 7])
    # template 7: media 1 mean (3, 0) + media 2 mean (0, 1.5) = (3, 1.5); template 3: (6, 6) + (4, 4)
    np.testing.assert_allclose(pooled, [[1 / np.sqrt(2), 1 / np.sqrt(2)], np.array([3, 1.5]) / np.hypot(3, 1.5)])

    unit = image_features(feats, flips, faceness, norm_score=False, detector_score=False)
    np.testing.assert_allclose(unit[[0, 2, 4]], [[1, 0], [0, 1], [np.sqrt(0.5), np.sqrt(0.5)]], rtol=1e-6)
    np.testing.assert_array_equal(image_features(feats, flip_test=False, detector_score=False), feats)


@pytest.mark.parametrize("num_templates,pairs_kind", [(11, "dense"), (60, "sparse")])
def test_template_pair_scores_are_cosines(num_templates, pairs_kind):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(num_templates, 5))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    ids = np.arange(num_templates) * 10 + 3
    if pairs_kind == "dense":
        pairs = np.array([(a, b) for a in ids[:4] for b in ids[4:]])
    else:
        pairs = rng.choice(ids, size=(25, 2))
    expected = np.einsum("ij,ij->i", feats[(pairs[:, 0] - 3) // 10], feats[(pairs[:, 1] - 3) // 10])
    np.testing.assert_allclose(template_pair_scores(feats, ids, pairs, block_elements=16), expected, atol=1e-12)
    with pytest.raises(KeyError, match="without features"):
        template_pair_scores(feats, ids, [[3, 4]])


# ----------------------------------------------------------------------------------------------------
# 1:N metrics


def test_identification_metrics_by_hand():
    gallery_subjects = np.array([10, 20, 30])
    probe_subjects = np.array([10, 20, 30, 40, 50])
    scores = np.array([
        [0.9, 0.1, 0.2],  # mated, rank 1, score 0.9
        [0.8, 0.5, 0.1],  # mated, rank 2
        [0.3, 0.2, 0.6],  # mated, rank 1, score 0.6
        [0.7, 0.1, 0.0],  # non-mated, top 0.7
        [0.2, 0.4, 0.1],  # non-mated, top 0.4
    ])
    out = identification_metrics(scores, probe_subjects, gallery_subjects, ranks=(1, 2), fpir_targets=(0.0, 0.5))
    assert out["rank-1"] == pytest.approx(2 / 3) and out["rank-2"] == 1.0
    # FPIR 0: threshold 0.7 -> both rank-1 mated probes (0.9, 0.6)? only 0.9 > 0.7
    assert out["TPIR@FPIR=0"] == pytest.approx(1 / 3)
    # FPIR 0.5: one false alarm allowed -> threshold 0.4 -> 0.9 and 0.6 pass
    assert out["TPIR@FPIR=0.5"] == pytest.approx(2 / 3)
    assert out["num_mated_probes"] == 3 and out["num_nonmated_probes"] == 2


def test_ties_count_against_the_probe():
    out = identification_metrics(np.zeros((2, 3)), np.array([1, 2]), np.array([1, 2, 3]), ranks=(1, 3))
    assert out["rank-1"] == 0.0 and out["rank-3"] == 1.0


# ----------------------------------------------------------------------------------------------------
# A tiny IJB release written here


def _write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def make_ijb(root, num_subjects=4, seed=0):
    """Per subject 3 templates of 2 media of 1-2 images; every image a random similarity warp of the
    subject's face; G1 = first template of the first half of the subjects, G2 of the second half."""
    rng = np.random.default_rng(seed)
    (root / "loose_crop").mkdir(parents=True)
    (root / "meta").mkdir()
    tid_mid, pts, image_rows, template_subject = [], [], {}, {}
    image_id, media_id = 0, 0
    for subject in range(num_subjects):
        face = _smooth_face(100 + subject)
        for k in range(3):
            template = 100 * subject + k + 1
            template_subject[template] = subject
            for _ in range(2):
                media_id += 1
                for _ in range(rng.integers(1, 3)):
                    image_id += 1
                    name = f"{image_id}.jpg"
                    warp = _similarity(rng.uniform(0.8, 1.2), rng.uniform(-15, 15), rng.uniform(10, 40),
                                       rng.uniform(10, 40))
                    canvas = cv2.warpAffine(face, warp, (170, 170))
                    cv2.imwrite(str(root / "loose_crop" / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
                    lmk = _apply(warp, ARCFACE_TEMPLATE_112)
                    tid_mid.append(f"{name} {template} {media_id}")
                    pts.append(" ".join([name] + [f"{v:.3f}" for v in lmk.reshape(-1)] + [f"{rng.uniform(0.5, 1):.3f}"]))
                    image_rows.setdefault(template, []).append(name)
    _write_lines(root / "meta" / "ijbc_face_tid_mid.txt", tid_mid)
    _write_lines(root / "meta" / "ijbc_name_5pts_score.txt", pts)
    pairs = [f"{a} {b} {int(template_subject[a] == template_subject[b])}" for a, b in combinations(template_subject, 2)]
    _write_lines(root / "meta" / "ijbc_template_pair_label.txt", pairs)

    def write_csv(name, templates):
        with open(root / "meta" / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "FACE_X"])
            for t in templates:
                for image in image_rows[t]:
                    writer.writerow([t, template_subject[t], f"img/{image}", 0])

    half = num_subjects // 2
    write_csv("ijbc_1N_gallery_G1.csv", [100 * s + 1 for s in range(half)])
    write_csv("ijbc_1N_gallery_G2.csv", [100 * s + 1 for s in range(half, num_subjects)])
    write_csv("ijbc_1N_probe_mixed.csv", [t for t in template_subject if t % 100 != 1])
    return root


class LinearEmbedder(torch.nn.Module):
    """A fixed random linear map of the (pooled) aligned image; counts its forward calls."""

    def __init__(self, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.pool = torch.nn.AdaptiveAvgPool2d(14)
        self.fc = torch.nn.Linear(3 * 14 * 14, dim)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture
def ijb_root(tmp_path):
    return make_ijb(tmp_path / "ijb")


def test_end_to_end_with_a_dummy_model(ijb_root, tmp_path):
    model = LinearEmbedder()
    out = tmp_path / "out"
    result = evaluate_ijb(model, ijb_root, "ijbc", batch_size=8, out_dir=out, name="dummy", progress=False)
    meta = load_ijb_meta(ijb_root)
    assert result["num_images"] == len(meta.names) and result["num_templates"] == 12 and result["num_pairs"] == 66
    # 4 subjects x 3 templates: 4 x 3 genuine pairs of the 66
    assert (result["num_genuine"], result["num_impostor"]) == (12, 54)
    features = extract_features(model, meta, batch_size=5, progress=False)
    reference = reference_ijb(features, meta)
    # same-subject crops of one face are closer than other faces: with the pair scores pooled by a loop,
    # every genuine pair scores above every impostor pair, so every TAR, the AUC, every rank-k and every
    # TPIR (a mated score beats any non-mated top score) is exactly 1
    genuine = [s for s, label in zip(reference["pair_scores"], meta.pair_labels) if label == 1]
    assert min(genuine) > max(s for s, label in zip(reference["pair_scores"], meta.pair_labels) if label == 0)
    assert [result[f"TAR@FAR=1e-{k}"] for k in range(1, 7)] == [1.0] * 6 and result["auc"] == 1.0
    ones = {k: 1.0 for k in ("rank-1", "rank-5", "rank-10", "TPIR@FPIR=0.01", "TPIR@FPIR=0.1")}
    # G1 holds the first template of subjects 0 and 1; the 8 probes are the other two templates of each
    # subject: 4 of them mated
    counts = {"num_mated_probes": 4, "num_nonmated_probes": 4, "num_gallery_templates": 2}
    assert result["1:N"] == {"G1": {**ones, **counts}, "G2": {**ones, **counts}, "mean": ones}
    assert_equals_reference(result, reference)
    with open(out / "ijbc_tar_far.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:3] == ["model", "target", "TAR@FAR=1e-6"] and rows[1][0] == "dummy"
    assert (out / "ijbc_1n.csv").is_file()
    assert (out / "ijbc_roc.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in os.listdir(out) if p.startswith(".tmp_")]

    # the same features handed in directly give the same numbers
    again = evaluate_ijb(features, ijb_root, progress=False)
    assert again["TAR@FAR=1e-1"] == result["TAR@FAR=1e-1"] and again["auc"] == pytest.approx(result["auc"])


def test_feature_cache_hit_does_not_run_the_model(ijb_root, tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    cache = tmp_path / "feats.npz"
    model = LinearEmbedder()
    first = evaluate_ijb(model, ijb_root, cache_path=cache, checkpoint=checkpoint, batch_size=8, progress=False)
    calls = model.calls
    assert calls > 0 and cache.is_file()
    second = evaluate_ijb(model, ijb_root, cache_path=cache, checkpoint=checkpoint, batch_size=8, progress=False)
    assert model.calls == calls
    assert second["TAR@FAR=1e-2"] == first["TAR@FAR=1e-2"]
    # new weights (mtime changes): the cache is stale and the network runs again
    os.utime(checkpoint, ns=(1, 1))
    evaluate_ijb(model, ijb_root, cache_path=cache, checkpoint=checkpoint, batch_size=8, progress=False)
    assert model.calls > calls
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate_ijb(model, ijb_root, cache_path=cache, progress=False)


def test_plot_roc_several_models(tmp_path):
    curves = {"a": (np.array([0, 1e-5, 1e-3, 1.0]), np.array([0, 0.5, 0.8, 1.0])),
              "b": {"roc": {"fpr": [0, 1e-4, 1.0], "tpr": [0, 0.6, 1.0]}}}
    plot_roc(curves, tmp_path / "roc.png")
    assert (tmp_path / "roc.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------------------
# Meta errors name file and line


def _edit_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n")


def _line(path, lineno):
    return path.read_text().splitlines()[lineno - 1]


META_BREAKS = {
    "tid_mid field count": ("ijbc_face_tid_mid.txt", 3, lambda l: l + " 5", "ijbc_face_tid_mid.txt, line 3"),
    "tid_mid not a number": ("ijbc_face_tid_mid.txt", 2, lambda l: l.split()[0] + " x 1", "ijbc_face_tid_mid.txt, line 2"),
    "5pts field count": ("ijbc_name_5pts_score.txt", 4, lambda l: l.rsplit(" ", 1)[0], "ijbc_name_5pts_score.txt, line 4"),
    "5pts not a number": ("ijbc_name_5pts_score.txt", 2, lambda l: l.replace(" ", " abc ", 1).rsplit(" ", 1)[0],
                          "ijbc_name_5pts_score.txt, line 2"),
    "pair field count": ("ijbc_template_pair_label.txt", 5, lambda l: l + " 1", "ijbc_template_pair_label.txt, line 5"),
    "pair not a number": ("ijbc_template_pair_label.txt", 6, lambda l: "1 two 0", "ijbc_template_pair_label.txt, line 6"),
    "pair label": ("ijbc_template_pair_label.txt", 7, lambda l: l.rsplit(" ", 1)[0] + " 2",
                   "ijbc_template_pair_label.txt, line 7"),
    "pair unknown template": ("ijbc_template_pair_label.txt", 9, lambda l: "101 999 0",
                              "ijbc_template_pair_label.txt, line 9: template 999"),
    "csv header": ("ijbc_1N_gallery_G1.csv", 1, lambda l: "TEMPLATE_ID,SUBJECT,FILENAME,FACE_X",
                   "ijbc_1N_gallery_G1.csv, line 1"),
    "csv field count": ("ijbc_1N_probe_mixed.csv", 3, lambda l: l + ",extra", "ijbc_1N_probe_mixed.csv, line 3"),
    "csv not a number": ("ijbc_1N_gallery_G2.csv", 2, lambda l: "x," + l.split(",", 1)[1], "ijbc_1N_gallery_G2.csv, line 2"),
    "csv unknown template": ("ijbc_1N_probe_mixed.csv", 2, lambda l: "555," + l.split(",", 1)[1],
                             "ijbc_1N_probe_mixed.csv, line 2: probe template 555"),
}


@pytest.mark.parametrize("case", sorted(META_BREAKS))
def test_meta_errors_name_file_and_line(ijb_root, case):
    filename, lineno, edit, message = META_BREAKS[case]
    path = ijb_root / "meta" / filename
    _edit_line(path, lineno, edit(_line(path, lineno)))
    with pytest.raises(IJBMetaError) as info:
        load_ijb_meta(ijb_root, "ijbc")
    assert message in str(info.value)


def test_missing_image_is_reported_with_its_line(ijb_root):
    os.remove(ijb_root / "loose_crop" / "3.jpg")
    with pytest.raises(IJBMetaError, match=r"ijbc_name_5pts_score.txt: 1 of \d+ images are missing .*line 3 '3.jpg'"):
        load_ijb_meta(ijb_root)


def test_mismatched_image_lists(ijb_root):
    path = ijb_root / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[4], lines[5] = lines[5], lines[4]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(IJBMetaError, match=r"same images in the same order: image 5 .*tid_mid.txt, line 5.*line 5"):
        load_ijb_meta(ijb_root)


def test_blank_lines_are_skipped_but_counted(ijb_root):
    path = ijb_root / "meta" / "ijbc_face_tid_mid.txt"
    lines = path.read_text().splitlines()
    lines[3] = lines[3] + " extra"
    path.write_text("\n\n" + "\n".join(lines) + "\n")
    with pytest.raises(IJBMetaError, match="ijbc_face_tid_mid.txt, line 6: expected 3 fields"):
        load_ijb_meta(ijb_root)


def test_one_to_n_is_optional(ijb_root):
    os.remove(ijb_root / "meta" / "ijbc_1N_probe_mixed.csv")
    meta = load_ijb_meta(ijb_root)
    assert meta.probe is None and meta.galleries == {}
    features = IJBFeatures(np.random.default_rng(0).normal(size=(len(meta.names), 4)).astype(np.float32), None)
    result = evaluate_ijb(features, ijb_root, flip_test=False, progress=False)
    assert "1:N" not in result
    assert_equals_reference(result, reference_ijb(features, meta, flip_test=False))


@pytest.mark.parametrize("seed", range(3))
def test_noisy_features_give_the_loop_reference_numbers(ijb_root, seed):
    """Features that tell the 4 subjects apart only in part (one axis per subject, plus noise as large), so that
    TARs, AUC, rank-1 and TPIR fall short of the dummy model's 1: each equals the loop-by-loop reference."""
    meta = load_ijb_meta(ijb_root)
    rng = np.random.default_rng(seed)
    subject_axis = np.eye(4)[meta.templates // 100]  # make_ijb numbers subject s's templates 100 s + k
    features = IJBFeatures(*(subject_axis + rng.normal(size=(2, len(meta.names), 4))).astype(np.float32))
    result = evaluate_ijb(features, ijb_root, progress=False)
    reference = reference_ijb(features, meta)
    assert_equals_reference(result, reference)
    assert 0 < reference["auc"] < 1 and reference["1:N"]["mean"]["rank-1"] < 1  # no degenerate case


def test_unknown_target_lists_the_valid_ones(ijb_root):
    with pytest.raises(ValueError, match="ijbb"):
        load_ijb_meta(ijb_root, "ijba")
