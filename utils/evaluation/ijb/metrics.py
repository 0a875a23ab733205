"""IJB metrics: 1:1 ROC and TAR at FAR, 1:N open-set identification.

1:1: cosine of every template pair; ROC as sklearn `roc_curve(label, score)` (InsightFace calls it
with the default drop_intermediate=True, see `roc_curve`); TAR at each FAR target is InsightFace's
pick: the ROC point whose FPR is nearest the target (ties: largest TPR), see `tar_at_far`.

1:N (open-set identification, the IJB-C protocol; InsightFace's own script differs, see `evaluate_1n`):
per gallery G1 and G2 separately, with the mixed-media probe templates; per gallery and averaged.
"""
import logging

import numpy as np

from utils.errors import InputError
from utils.evaluation.ijb.meta import FAR_TARGETS, FPIR_TARGETS, RANKS, template_rows

logger = logging.getLogger("utils.evaluation.ijb")

# ----------------------------------------------------------------------------------------------------
# 1:1 metrics


def roc_curve(labels, scores, drop_intermediate=True):
    """sklearn's `roc_curve(labels, scores)` in NumPy: (fpr, tpr, thresholds), one point per distinct score
    (accept when score >= threshold) after (0, 0) at threshold +inf.

    With `drop_intermediate` (sklearn's default, and therefore what InsightFace's IJB script gets), points
    that lie on a straight line between their neighbours are dropped; this can change which point is
    nearest a FAR target on a straight stretch of the curve, so it is kept for parity.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape or labels.size == 0:
        raise ValueError(f"expected labels and scores of one equal, non-zero length, got {labels.shape}, {scores.shape}")
    if not ((labels == 0) | (labels == 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(scores).all():
        raise InputError(f"{np.count_nonzero(~np.isfinite(scores))} scores are NaN or infinite (a diverged model?)")
    # only the counts at the last of each run of equal scores are read, so the order within a run (the
    # one thing a stable sort would fix) does not matter
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    last_of_score = np.r_[np.flatnonzero(np.diff(sorted_scores)), scores.size - 1]
    tps = np.cumsum(labels[order], dtype=np.float64)[last_of_score]
    fps = 1 + last_of_score - tps
    thresholds = sorted_scores[last_of_score]
    if drop_intermediate and fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps, thresholds = np.r_[0, fps], np.r_[0, tps], np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def _tar_nearest(fpr, tpr, far):
    # InsightFace: reverse the curve, then min over (|fpr - far|, index): the nearest FPR, and among equal
    # FPRs the point latest on the curve, i.e. the largest TPR. The FPR may be above the target.
    return tpr[::-1][int(np.argmin(np.abs(fpr[::-1] - far)))]


def _tar_floor(fpr, tpr, far):
    # Conservative alternative: the largest TPR whose FPR does not exceed the target.
    return tpr[max(int(np.searchsorted(fpr, far, side="right")) - 1, 0)]


TAR_RULES = {"nearest": _tar_nearest, "floor": _tar_floor}


def tar_at_far(fpr, tpr, far_targets=FAR_TARGETS, rule="nearest"):
    """{far: TAR} read off a ROC (fpr ascending). rule 'nearest' is InsightFace's; 'floor' never exceeds the FAR."""
    try:
        pick = TAR_RULES[rule]
    except KeyError:
        raise InputError(f"unknown TAR rule {rule!r}; valid: {sorted(TAR_RULES)}") from None
    fpr, tpr = np.asarray(fpr), np.asarray(tpr)
    return {far: float(pick(fpr, tpr, far)) for far in far_targets}


def auc(fpr, tpr):
    """Area under the ROC by the trapezoid rule (sklearn `auc`)."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy < 2 has only trapz
    return float(trapezoid(tpr, fpr))


def downsample_roc(fpr, tpr, num=701):
    """A light ROC for plots and JSON: for each of `num` log-spaced FPRs in [1e-7, 1], the last ROC point
    at or below it. -> {'fpr': [...], 'tpr': [...]}."""
    grid = np.logspace(-7, 0, num)
    idx = np.unique(np.searchsorted(fpr, grid, side="right") - 1)
    idx = idx[idx >= 0]
    return {"fpr": np.asarray(fpr)[idx].tolist(), "tpr": np.asarray(tpr)[idx].tolist()}

# ----------------------------------------------------------------------------------------------------
# 1:N metrics


def _probe_stats(scores, probe_subjects, gallery_subjects):
    """Per probe (rows of a probe x gallery score block): mated?, best mated score, rank, top score."""
    mated = probe_subjects[:, None] == gallery_subjects[None, :]
    is_mated = mated.any(axis=1)
    best_mated = np.where(mated, scores, -np.inf).max(axis=1)
    # ties with a non-mated template count against the probe, so constant scores do not look perfect
    rank = 1 + np.sum(~mated & (scores >= best_mated[:, None]), axis=1)
    return is_mated, best_mated, rank, scores.max(axis=1)


def _identification(is_mated, best_mated, rank, top, ranks, fpir_targets):
    mated, nonmated = np.flatnonzero(is_mated), np.flatnonzero(~is_mated)
    out = {f"rank-{k}": float(np.mean(rank[mated] <= k)) if mated.size else float("nan") for k in ranks}
    nonmated_top = np.sort(top[nonmated])[::-1]
    for fpir in fpir_targets:
        if not (mated.size and nonmated.size):
            out[f"TPIR@FPIR={fpir:g}"] = float("nan")
            continue
        allowed = int(np.floor(fpir * nonmated.size + 1e-9))  # false alarms allowed at this FPIR
        threshold = nonmated_top[allowed] if allowed < nonmated.size else -np.inf
        hits = (rank[mated] == 1) & (best_mated[mated] > threshold)
        out[f"TPIR@FPIR={fpir:g}"] = float(np.mean(hits))
    out["num_mated_probes"], out["num_nonmated_probes"] = int(mated.size), int(nonmated.size)
    return out


def identification_metrics(scores, probe_subjects, gallery_subjects, ranks=RANKS, fpir_targets=FPIR_TARGETS):
    """Open-set identification metrics of a probe x gallery score matrix (Q, G).

    Mated probes have their subject in the gallery. Rank of a mated probe = 1 + the number of gallery
    templates of other subjects scoring >= its best mated score; rank-k = fraction of mated probes with
    rank <= k (closed set). Non-mated probes raise a false alarm when their top score exceeds the
    threshold; the threshold at FPIR f is the (floor(f * #non-mated) + 1)-th largest non-mated top score,
    so at most that fraction alarm. TPIR at FPIR f = fraction of mated probes at rank 1 with their mated
    score above that threshold.
    """
    stats = _probe_stats(np.asarray(scores, dtype=np.float64), np.asarray(probe_subjects),
                         np.asarray(gallery_subjects))
    return _identification(*stats, ranks, fpir_targets)


def evaluate_1n(template_feats, unique_templates, galleries, probe, ranks=RANKS, fpir_targets=FPIR_TARGETS,
                probe_block=4096):
    """`identification_metrics` per gallery ({'G1': ..., 'G2': ...}) and their mean ('mean').

    InsightFace's `ijb_1n.py` instead merges G1 and G2 into one gallery and thresholds at a fraction of all
    non-mated (probe, gallery) scores; the numbers here follow the IJB-C protocol (separate galleries,
    FPIR over non-mated probe searches), which is what papers report as TPIR@FPIR.
    """
    probe_templates, probe_subjects = probe
    probe_feats = template_feats[template_rows(unique_templates, probe_templates)]
    results = {}
    for name, (gallery_templates, gallery_subjects) in galleries.items():
        gallery_feats = template_feats[template_rows(unique_templates, gallery_templates)]
        parts = [_probe_stats(probe_feats[s:s + probe_block] @ gallery_feats.T, probe_subjects[s:s + probe_block],
                              gallery_subjects) for s in range(0, len(probe_templates), probe_block)]
        stats = [np.concatenate(column) for column in zip(*parts)]
        results[name] = _identification(*stats, ranks, fpir_targets)
        results[name]["num_gallery_templates"] = int(len(gallery_templates))
    if results:
        metric_names = [k for k in next(iter(results.values())) if k.startswith(("rank-", "TPIR@"))]
        results["mean"] = {k: float(np.mean([r[k] for r in results.values()])) for k in metric_names}
    return results
