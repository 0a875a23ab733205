"""What the angle-based cleaning rules decide on where the samples lie among the class centres (the scores'
`label_cos`, `other_cos`, `other_class` and a sub-center head's `label_subcenter_cos`, utils/artifacts/records.py).

- `subcenter_flags`: Sub-center ArcFace's rule (Deng et al., ECCV 2020). Each identity has k sub-centers; its
  dominant one is the sub-center most of its images are nearest to. A sample is flagged when its nearest sub-center
  of its identity is not the dominant one, or its angle to the dominant one exceeds `max_angle` degrees (0: a bound
  from the data, as `center_angle` sets its outlier bound: the per-identity median plus Tukey's fence).
  `subcenter_loop` is the same rule as a plain loop (the tests hold the two equal).
- `center_angle_flags`: RobustFace's angle view. theta_y, the angle to the labelled identity's centre, against
  theta_o, the angle to the nearest other identity's centre: a clean sample sits near its own centre and far from
  the others (theta_y - theta_o well below 0); a flipped one near another identity's centre, an intruder far from
  every centre. The threshold on theta_y - theta_o is estimated from the data (`split_threshold`), so no noise rate is
  assumed. `center_angle_loop` is the rule as a plain loop.
"""
from __future__ import annotations

import numpy as np

from utils.cleaning.flags import Flags
from utils.errors import InputError


def degrees(cos) -> np.ndarray:
    """Angles in degrees of cosines (NaN stays NaN)."""
    return np.degrees(np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)))


# ------------------------------------------------------------------------------------------------ sub-centers
def dominant_subcenters(sub_cos: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes,) per identity, the sub-center most of its scored images are nearest to (ties: the lowest;
    an identity without a scored image: 0)."""
    seen = np.isfinite(sub_cos).all(axis=1)
    nearest = np.argmax(sub_cos[seen], axis=1)
    k = sub_cos.shape[1]
    counts = np.bincount(labels[seen] * k + nearest, minlength=num_classes * k).reshape(num_classes, k)
    return np.argmax(counts, axis=1)


def subcenter_geometry(sub_cos, labels, num_classes: int) -> tuple:
    """Per sample: (scored, nearest sub-center is not its identity's dominant one, cosine and angle in degrees to the
    dominant one) from the (N, k) cosines to its identity's sub-centers."""
    sub_cos = np.asarray(sub_cos, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if sub_cos.ndim != 2 or sub_cos.shape[0] != labels.size:
        raise ValueError(f"subcenter rule: cosines of shape {sub_cos.shape} for {labels.size} labels")
    seen = np.isfinite(sub_cos).all(axis=1)
    dominant = dominant_subcenters(sub_cos, labels, num_classes)[labels]
    nearest = np.argmax(np.nan_to_num(sub_cos, nan=-2.0), axis=1)
    dominant_cos = sub_cos[np.arange(labels.size), dominant]
    return seen, nearest != dominant, dominant_cos, degrees(dominant_cos)


def subcenter_flags(sub_cos, labels, num_classes: int, max_angle: float, other_cos=None, other_class=None) -> Flags:
    """Sub-center ArcFace's rule on (N, k) cosines to each sample's labelled identity's sub-centers (module doc).

    A flagged sample nearer another identity's centre (`other_cos`) than its own dominant sub-center is mislabeled,
    with that identity as the suggestion; otherwise an outlier. Confidence: the cosine to the suggested identity, or
    for an outlier to its own dominant sub-center. Unscored samples (NaN) are not judged."""
    sub_cos = np.asarray(sub_cos, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    seen, not_dominant, dominant_cos, angle = subcenter_geometry(sub_cos, labels, num_classes)
    info = {}
    if max_angle > 0:
        too_far = angle > max_angle
    else:  # from the data: farther from the dominant sub-center than its identity's majority allows
        majority = seen & ~not_dominant
        excess = angle - _identity_medians(angle, labels, majority, num_classes)[labels]
        info["fence_degrees"] = tukey_fence(excess[majority])
        with np.errstate(invalid="ignore"):
            too_far = excess > info["fence_degrees"]
    flagged = seen & (not_dominant | too_far)
    index = np.flatnonzero(flagged).astype(np.int64)
    info.update({"max_angle": float(max_angle), "subcenters": int(sub_cos.shape[1]),
            "not_dominant": int((seen & not_dominant).sum()), "too_far": int((seen & too_far).sum())})
    if other_cos is None:
        outlier = np.ones(index.size, dtype=bool)
        return Flags(index, np.full(index.size, -1, np.int64), dominant_cos[index], info, outlier)
    other_cos = np.asarray(other_cos, dtype=np.float64)[index]
    other_class = np.asarray(other_class, dtype=np.int64)[index]
    outlier = ~(other_cos > dominant_cos[index]) | (other_class < 0)
    info.update(mislabeled=int((~outlier).sum()), outliers=int(outlier.sum()))
    return Flags(index, np.where(outlier, -1, other_class), np.where(outlier, dominant_cos[index], other_cos),
                 info, outlier)


def subcenter_loop(sub_cos, labels, num_classes: int, max_angle: float) -> np.ndarray:
    """The sub-center rule as the paper states it, one identity and one image at a time: the flagged indices."""
    k = len(sub_cos[0])
    counts = [[0] * k for _ in range(num_classes)]
    for cos, y in zip(sub_cos, labels):
        if all(np.isfinite(c) for c in cos):
            nearest = max(range(k), key=lambda j: (cos[j], -j))  # the first of equal cosines, as np.argmax
            counts[y][nearest] += 1
    dominant = [max(range(k), key=lambda j: (row[j], -j)) for row in counts]
    scored = [i for i, cos in enumerate(sub_cos) if all(np.isfinite(c) for c in cos)]
    nearest = {i: max(range(k), key=lambda j: (sub_cos[i][j], -j)) for i in scored}
    angle = {i: float(np.degrees(np.arccos(min(1.0, max(-1.0, float(sub_cos[i][dominant[labels[i]]]))))))
             for i in scored}
    bound = {i: max_angle for i in scored}
    if max_angle <= 0:  # from the data: its identity's median angle among the majority + Tukey's fence over them all
        majority = [i for i in scored if nearest[i] == dominant[labels[i]]]
        everyone = [angle[i] for i in majority]
        median = {}
        for y in range(num_classes):
            mine = [angle[i] for i in majority if labels[i] == y]
            median[y] = float(np.median(mine if mine else everyone))
        q1, q3 = np.percentile([angle[i] - median[labels[i]] for i in majority], [25, 75])
        bound = {i: median[labels[i]] + q3 + 1.5 * (q3 - q1) for i in scored}
    flagged = [i for i in scored if nearest[i] != dominant[labels[i]] or angle[i] > bound[i]]
    return np.array(flagged, dtype=np.int64)


def require_geometry(scores: dict, keys, path_hint: str = "") -> None:
    """InputError naming the missing arrays of scores written before eval_trainset.py recorded the geometry."""
    missing = [k for k in keys if k not in scores]
    if missing:
        raise InputError(f"the scores{path_hint} lack {', '.join(missing)} (written before eval_trainset.py recorded "
                         f"where each sample lies among the class centres): run eval_trainset.py again")


# ---------------------------------------------------------------------------------------------- centre angles
def tukey_fence(values: np.ndarray) -> float:
    """Tukey's upper fence of `values`: Q3 + 1.5 (Q3 - Q1), the textbook outlier bound (nothing fitted here)."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + 1.5 * (q3 - q1))


def center_angle_flags(label_cos, other_cos, other_class, labels, num_classes: int) -> Flags:
    """RobustFace's angles as a cleaning rule; every threshold is estimated from the data.

    theta_y: the angle to the labelled identity's centre; theta_o: to the nearest other identity's centre. The
    majority are the samples nearer their own centre (theta_y <= theta_o). Flagged:
    - mislabeled, when another identity's centre is nearer than its own (theta_y > theta_o): suggested label that
      identity, confidence the cosine to it;
    - an outlier (open-set), when it is nearer its own centre but farther from it than its identity's majority
      allows: theta_y minus the median theta_y of its identity's majority above Tukey's fence of those differences
      over the whole majority (identities differ in spread: the median is per identity, the fence over all so that
      an identity of few images gets a stable bound). Confidence: the cosine to its own centre.
    A sample whose identity has no centre in the scoring model (a cleaning round's model that lost the identity:
    `label_cos` NaN, `other_cos` finite) is an outlier; unscored samples (both NaN) are not judged."""
    labels = np.asarray(labels, dtype=np.int64)
    label_cos = np.asarray(label_cos, dtype=np.float64)
    other_cos = np.asarray(other_cos, dtype=np.float64)
    other_class = np.asarray(other_class, dtype=np.int64)
    scored = np.isfinite(other_cos) | np.isfinite(label_cos)
    theta_y, theta_o = degrees(label_cos), degrees(other_cos)
    has_centre = np.isfinite(theta_y)
    with np.errstate(invalid="ignore"):
        nearer_other = has_centre & np.isfinite(theta_o) & (theta_y > theta_o)
    majority = has_centre & ~nearer_other
    if not majority.any():
        raise InputError("no sample is nearer its own identity's centre than another's: the geometry says nothing "
                         "about the labels (was the model trained? are these scores of this dataset?)")
    median = _identity_medians(theta_y, labels, majority, num_classes)
    excess = theta_y - median[labels]
    fence = tukey_fence(excess[majority])
    with np.errstate(invalid="ignore"):
        far = majority & (excess > fence)
    lost = scored & ~has_centre
    outlier_mask = far | lost
    flagged = nearer_other | outlier_mask
    index = np.flatnonzero(flagged).astype(np.int64)
    outlier = outlier_mask[index]
    suggested = np.where(outlier, -1, other_class[index])
    confidence = np.where(outlier, label_cos[index], other_cos[index])
    info = {"fence_degrees": fence, "majority": int(majority.sum()), "mislabeled": int(nearer_other.sum()),
            "outliers": int(outlier_mask.sum()), "identity_lost": int(lost.sum())}
    return Flags(index, suggested, confidence, info, outlier)


def _identity_medians(theta_y, labels, majority, num_classes: int) -> np.ndarray:
    """Per identity, the median theta_y of its majority; an identity without one: the whole majority's median.
    Vectorised (Glint360K has 360K identities): each identity's values sorted, the middle one or the mean of the two
    middle ones, as np.median takes them."""
    values, classes = theta_y[majority].astype(np.float64), labels[majority]
    order = np.lexsort((values, classes))
    values = values[order]
    counts = np.bincount(classes, minlength=num_classes)
    starts = np.cumsum(counts) - counts
    lo, hi = starts + (counts - 1) // 2, starts + counts // 2
    has = counts > 0
    medians = np.full(num_classes, float(np.median(values)))
    medians[has] = (values[lo[has]] + values[hi[has]]) / 2
    return medians


def center_angle_loop(label_cos, other_cos, labels, num_classes: int) -> np.ndarray:
    """The centre-angle rule written out sample by sample (the flagged indices), for the tests and the reader."""
    theta = lambda c: float(np.degrees(np.arccos(min(1.0, max(-1.0, c)))))  # noqa: E731
    majority_angles = {c: [] for c in range(num_classes)}
    for cy, co, y in zip(label_cos, other_cos, labels):
        if np.isfinite(cy) and not (np.isfinite(co) and theta(cy) > theta(co)):
            majority_angles[y].append(theta(cy))
    everyone = [a for angles in majority_angles.values() for a in angles]
    median = {c: float(np.median(a if a else everyone)) for c, a in majority_angles.items()}
    excess = [theta(cy) - median[y] for cy, co, y in zip(label_cos, other_cos, labels)
              if np.isfinite(cy) and not (np.isfinite(co) and theta(cy) > theta(co))]
    q1, q3 = np.percentile(excess, [25, 75])
    fence = q3 + 1.5 * (q3 - q1)
    flagged = []
    for i, (cy, co, y) in enumerate(zip(label_cos, other_cos, labels)):
        if not np.isfinite(cy):
            if np.isfinite(co):
                flagged.append(i)  # its identity has no centre in the model
        elif np.isfinite(co) and theta(cy) > theta(co):
            flagged.append(i)  # another identity's centre is nearer
        elif theta(cy) - median[y] > fence:
            flagged.append(i)  # farther from its centre than its identity's majority allows
    return np.array(flagged, dtype=np.int64)
