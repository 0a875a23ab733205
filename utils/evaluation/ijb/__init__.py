"""IJB-B / IJB-C evaluation on the official release layout: 1:1 verification and 1:N identification.

The release layout and the meta files' formats: `utils/evaluation/ijb/meta.py`. The package is split by concern:
`meta` (reading and checking the meta files), `features` (aligned, embedded, cached image features and
template pooling), `metrics` (ROC, TAR@FAR, 1:N), `report` (tables and the ROC plot); `evaluate_ijb`
puts them together.

Template features follow InsightFace's `eval_ijbc.py` (modes F1 N1 D1 by default):

    image feature  = f(image) + f(flipped image)         (flip_test; else f(image))
                     / ||.||                             (only when norm_score is off: drop the norm)
                     * detector_score                    (detector_score)
    media feature  = mean of the image features of that media (video frames or one still)
    template       = sum of its media features, L2-normalised

1:1: cosine of every template pair; ROC as sklearn `roc_curve(label, score)` (InsightFace calls it
with the default drop_intermediate=True, see `roc_curve`); TAR at each FAR target is InsightFace's
pick: the ROC point whose FPR is nearest the target (ties: largest TPR), see `tar_at_far`.

1:N (open-set identification, the IJB-C protocol; InsightFace's own script differs, see `evaluate_1n`):
per gallery G1 and G2 separately, with the mixed-media probe templates; per gallery and averaged.
"""
import logging
import os

import torch

from utils.evaluation.ijb.features import (AlignedFaceDataset, IJBFeatures, extract_features, feature_cache_key,  # noqa: F401
                                image2template_features, image_features, load_feature_cache, save_feature_cache,
                                template_pair_scores)
from utils.evaluation.ijb.meta import (FAR_TARGETS, FPIR_TARGETS, RANKS, TARGETS, IJBMeta, IJBMetaError, load_ijb_meta,  # noqa: F401
                            read_1n_list, read_landmarks, read_template_media_list, read_template_pair_list)
from utils.evaluation.ijb.metrics import (auc, downsample_roc, evaluate_1n, identification_metrics, roc_curve,  # noqa: F401
                               tar_at_far)
from utils.evaluation.ijb.report import format_ijb_table, plot_roc, save_identification_table, save_tar_table  # noqa: F401
from utils.evaluation.verification import far_label

logger = logging.getLogger("utils.evaluation.ijb")

# ----------------------------------------------------------------------------------------------------
# Everything together


def evaluate_ijb(model_or_features, root, target="ijbc", *, image_size=112, batch_size=256, device=None, dtype=None,
                 num_workers=0, flip_test=True, norm_score=True, detector_score=True, cache_path=None,
                 checkpoint=None, out_dir=None, name="model", far_targets=FAR_TARGETS, progress=True):
    """IJB 1:1 (and 1:N when its CSVs exist) for a torch model (RGB uint8 -> normalised -> embedding) or
    precomputed IJBFeatures.

    Returns a JSON-ready dict: target, counts, 'TAR@FAR=1e-6' ... 'TAR@FAR=1e-1' (fractions), auc,
    options, '1:N' ({'G1', 'G2', 'mean'} of `identification_metrics`, only with 1:N files) and 'roc'
    (a downsampled curve for `plot_roc`). With `out_dir`, writes `<target>_tar_far.csv`,
    `<target>_roc.png` and, with 1:N, `<target>_1n.csv`. `cache_path` (+ `checkpoint`, the weights file)
    keeps the image features so that re-scoring does not run the network again.
    """
    meta = load_ijb_meta(root, target)
    if isinstance(model_or_features, IJBFeatures):
        features = model_or_features
    elif isinstance(model_or_features, torch.nn.Module):
        features = extract_features(model_or_features, meta, image_size, batch_size, device, dtype, num_workers,
                                    flip=flip_test, cache_path=cache_path, checkpoint=checkpoint, progress=progress)
    else:
        raise TypeError(f"expected a torch.nn.Module or IJBFeatures, got {type(model_or_features).__name__}")
    if features.img_feats.shape[0] != len(meta.names):
        raise ValueError(f"{features.img_feats.shape[0]} image features for {len(meta.names)} images of {root}")

    img_feats = image_features(features.img_feats, features.flip_feats, meta.faceness, flip_test, norm_score,
                               detector_score)
    template_feats, unique_templates = image2template_features(img_feats, meta.templates, meta.medias)
    scores = template_pair_scores(template_feats, unique_templates, meta.pair_templates)
    fpr, tpr, _ = roc_curve(meta.pair_labels, scores)
    result = {
        "target": meta.target,
        "num_images": len(meta.names),
        "num_templates": int(unique_templates.size),
        "num_pairs": int(scores.size),
        "num_genuine": int(meta.pair_labels.sum()),
        "num_impostor": int(scores.size - meta.pair_labels.sum()),
        **{f"TAR@FAR={far_label(far)}": tar for far, tar in tar_at_far(fpr, tpr, far_targets).items()},
        "auc": auc(fpr, tpr),
        "options": {"flip_test": flip_test, "norm_score": norm_score, "detector_score": detector_score,
                    "image_size": image_size},
    }
    if meta.probe is not None:
        result["1:N"] = evaluate_1n(template_feats, unique_templates, meta.galleries, meta.probe)
    result["roc"] = downsample_roc(fpr, tpr)
    logger.info("%s 1:1 TAR (%%)\n%s", meta.target, format_ijb_table({name: result}, far_targets))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        save_tar_table({name: result}, os.path.join(out_dir, f"{meta.target}_tar_far.csv"), far_targets)
        plot_roc({name: (fpr, tpr)}, os.path.join(out_dir, f"{meta.target}_roc.png"),
                 title=f"ROC on {meta.target.upper()}")
        if "1:N" in result:
            save_identification_table({name: result}, os.path.join(out_dir, f"{meta.target}_1n.csv"))
    return result
