"""IJB image features (aligned, embedded, cached) and template features and pair scores.

Template features follow InsightFace's `eval_ijbc.py` (modes F1 N1 D1 by default):

    image feature  = f(image) + f(flipped image)         (flip_test; else f(image))
                     / ||.||                             (only when norm_score is off: drop the norm)
                     * detector_score                    (detector_score)
    media feature  = mean of the image features of that media (video frames or one still)
    template       = sum of its media features, L2-normalised
"""
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from tqdm import tqdm

from utils.data.alignment import align_face
from utils.artifacts.files import atomic_path
from utils.models.embedding import amp_dtype, embed_batch, eval_mode, model_device
from utils.errors import InputError
from utils.evaluation.verification import l2_normalize
from utils.evaluation.ijb.meta import template_rows

logger = logging.getLogger("utils.evaluation.ijb")

# ----------------------------------------------------------------------------------------------------
# Image features


class AlignedFaceDataset(torch.utils.data.Dataset):
    """The IJB images, each aligned from its five landmarks: uint8 (3, S, S) RGB tensors."""

    def __init__(self, image_dir, names, landmarks, image_size=112):
        self.image_dir, self.names, self.landmarks, self.image_size = image_dir, names, landmarks, image_size

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        path = os.path.join(self.image_dir, self.names[index])
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"{path}: cannot be read as an image")
        try:
            face = align_face(img, self.landmarks[index], self.image_size)  # BGR in, BGR out
        except ValueError as e:
            raise InputError(f"{path}: {e}") from e
        return torch.from_numpy(np.ascontiguousarray(cv2.cvtColor(face, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)))


@dataclass
class IJBFeatures:
    """Raw network outputs per image, in the order of the meta lists."""
    img_feats: np.ndarray  # (N, D) float32
    flip_feats: np.ndarray = None  # (N, D) float32, features of the flipped images; None without flip test


def feature_cache_key(checkpoint, meta, image_size, flip, dtype, device=None):
    """What the cached features depend on: the weights file (path, mtime, size), the image list and its
    landmarks (hashed), the meta files' mtimes, crop size, flip and precision."""
    if checkpoint is None or not os.path.isfile(checkpoint):
        raise ValueError(f"a feature cache needs `checkpoint`, the weights file the model was loaded from; got "
                         f"{checkpoint!r}")
    stat = os.stat(checkpoint)
    digest = hashlib.sha1("\n".join(meta.names).encode("utf-8"))
    digest.update(np.ascontiguousarray(meta.landmarks).tobytes())
    meta_files = [meta.meta_path("{t}_face_tid_mid.txt"), meta.meta_path("{t}_name_5pts_score.txt")]
    return {
        "format": 1,
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "checkpoint_size": stat.st_size,
        "root": os.path.abspath(meta.root),
        "target": meta.target,
        "meta_mtime_ns": [os.stat(p).st_mtime_ns for p in meta_files],
        "num_images": len(meta.names),
        "images_sha1": digest.hexdigest(),
        "image_size": int(image_size),
        "flip": bool(flip),
        "dtype": str(amp_dtype(dtype, device)),
    }


def load_feature_cache(path, key):
    """The cached IJBFeatures when `path` exists and was written under the same key, else None."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        stored = json.loads(str(data["key"]))
        if stored != key:
            changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
            logger.info("feature cache %s is stale (%s changed); recomputing", path, ", ".join(changed))
            return None
        flip_feats = data["flip_feats"] if "flip_feats" in data.files else None
        return IJBFeatures(data["img_feats"], flip_feats)


def save_feature_cache(path, features, key):
    arrays = {"img_feats": features.img_feats, "key": np.array(json.dumps(key, sort_keys=True))}
    if features.flip_feats is not None:
        arrays["flip_feats"] = features.flip_feats
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def extract_features(model, meta, image_size=112, batch_size=256, device=None, dtype=None, num_workers=0,
                     flip=True, cache_path=None, checkpoint=None, progress=True):
    """Align and embed every IJB image (and its flip): IJBFeatures, from `cache_path` when it is current.

    Decoding and alignment run in a DataLoader (`num_workers` processes); the network runs in eval mode
    under no_grad, with bf16 autocast on CUDA when `dtype` asks for it.
    """
    device = torch.device(device) if device is not None else model_device(model)
    key = None
    if cache_path is not None:
        key = feature_cache_key(checkpoint, meta, image_size, flip, dtype, device)
        cached = load_feature_cache(cache_path, key)
        if cached is not None:
            logger.info("%s features from cache %s", meta.target, cache_path)
            return cached
    amp = amp_dtype(dtype, device)
    dataset = AlignedFaceDataset(meta.image_dir, meta.names, meta.landmarks, image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    bar = tqdm(total=len(dataset), desc=f"{meta.target} features", unit="img", disable=not progress)
    feats, flip_feats = [], []
    start = time.perf_counter()
    with eval_mode(model):
        for batch in loader:
            emb, emb_flip = embed_batch(model, batch, device, amp, flip)
            feats.append(emb)
            flip_feats.append(emb_flip)
            bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    logger.info("%s features: %d images in %.1fs (%.1f images/s)", meta.target, len(dataset), seconds,
                len(dataset) / max(seconds, 1e-9))
    features = IJBFeatures(np.concatenate(feats), np.concatenate(flip_feats) if flip else None)
    if cache_path is not None:
        save_feature_cache(cache_path, features, key)
    return features

# ----------------------------------------------------------------------------------------------------
# Template features and scores


def image_features(img_feats, flip_feats=None, faceness=None, flip_test=True, norm_score=True, detector_score=True):
    """Per-image input features (N, D) float32 for template pooling, as InsightFace's F/N/D test modes.

    flip_test: img + flip feature; norm_score off: each feature L2-normalised (zero rows stay zero, where
    InsightFace would divide by zero); detector_score: multiplied by the faceness score.
    """
    feats = np.asarray(img_feats, dtype=np.float32)
    if flip_test:
        if flip_feats is None:
            raise ValueError("flip_test needs the features of the flipped images")
        feats = feats + np.asarray(flip_feats, dtype=np.float32)
    if not norm_score:
        norms = np.sqrt(np.sum(feats ** 2, axis=-1, keepdims=True))
        feats = feats / np.where(norms > 0, norms, 1)
    if detector_score:
        if faceness is None:
            raise ValueError("detector_score needs the faceness scores")
        feats = feats * np.asarray(faceness, dtype=np.float32)[:, None]
    return feats


def _group_sums(values, group, num_groups, chunk_rows=65536):
    """Float64 sums of the rows of `values` (N, D) per group id (N,) in [0, num_groups): (num_groups, D).

    torch's index_add_, chunk by chunk: NumPy's add.reduceat / add.at are an order of magnitude slower
    on IJB-C's 469k x 512 features, and a float64 copy of them all would take 2 GB.
    """
    sums = torch.zeros((num_groups, values.shape[1]), dtype=torch.float64)
    group = torch.from_numpy(np.ascontiguousarray(group, dtype=np.int64))
    for start in range(0, values.shape[0], chunk_rows):
        chunk = torch.from_numpy(np.ascontiguousarray(values[start:start + chunk_rows])).to(torch.float64)
        sums.index_add_(0, group[start:start + chunk_rows], chunk)
    return sums.numpy()


def image2template_features(img_feats, templates, medias):
    """Template features as InsightFace: per template, the mean image feature of each media, summed over
    its media, then L2-normalised. -> (features (T, D) float64, template ids (T,) sorted ascending)."""
    img_feats = np.asarray(img_feats)
    templates, medias = np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)
    if img_feats.ndim != 2 or img_feats.shape[0] == 0 or not (img_feats.shape[0] == len(templates) == len(medias)):
        raise ValueError(f"expected (N, D) features with N = {len(templates)} templates = {len(medias)} medias, "
                         f"got {img_feats.shape}")
    # a media is a (template, media id) pair: the same video may serve two templates
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    new_media = np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])]
    media_of_image = np.empty(order.size, dtype=np.int64)
    media_of_image[order] = np.cumsum(new_media) - 1
    media_templates = t_sorted[new_media]
    media_means = _group_sums(img_feats, media_of_image, media_templates.size)
    media_means /= np.bincount(media_of_image)[:, None]
    new_template = np.r_[True, media_templates[1:] != media_templates[:-1]]
    template_of_media = np.cumsum(new_template) - 1
    template_feats = _group_sums(media_means, template_of_media, int(template_of_media[-1]) + 1)
    return l2_normalize(template_feats), media_templates[new_template]


def _used_rows(rows, num_rows):
    """(the distinct rows used, sorted; the position of each entry of `rows` among them), without a sort."""
    used = np.zeros(num_rows, dtype=bool)
    used[rows] = True
    return np.flatnonzero(used), (np.cumsum(used) - 1)[rows]


def template_pair_scores(template_feats, unique_templates, pair_templates, block_elements=1 << 24):
    """Cosine similarity (P,) float64 of each template pair (P, 2), in blocks of about `block_elements`.

    When the pairs cover a dense part of (templates a) x (templates b), as in IJB (gallery x probe),
    block matrix products are computed and read at the pairs; otherwise the pairs are gathered in chunks.
    Either way a block holds about `block_elements` float64 values (128 MB by default), so IJB-C's
    15.7M pairs need no more than a few hundred MB.
    """
    pair_templates = np.asarray(pair_templates, dtype=np.int64)
    a = template_rows(unique_templates, pair_templates[:, 0])
    b = template_rows(unique_templates, pair_templates[:, 1])
    scores = np.empty(a.shape[0], dtype=np.float64)
    if a.size == 0:
        return scores
    rows_a, a_pos = _used_rows(a, len(unique_templates))
    rows_b, b_pos = _used_rows(b, len(unique_templates))
    if rows_a.size * rows_b.size <= 16 * a.size:  # a GEMM entry costs far less than a gathered pair
        feats_b_t = np.ascontiguousarray(template_feats[rows_b].T)
        step = max(1, block_elements // rows_b.size)
        block_of_pair = a_pos // step
        num_blocks = int(block_of_pair.max()) + 1
        # stable argsort of small integers is a radix sort
        order = np.argsort(block_of_pair.astype(np.int16 if num_blocks < 2 ** 15 else np.int64), kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(block_of_pair, minlength=num_blocks))]
        for k in range(num_blocks):
            sel = order[bounds[k]:bounds[k + 1]]
            block = template_feats[rows_a[k * step:(k + 1) * step]] @ feats_b_t
            scores[sel] = block[a_pos[sel] - k * step, b_pos[sel]]
    else:
        step = max(1, block_elements // template_feats.shape[1])
        for start in range(0, a.size, step):
            fa, fb = template_feats[a[start:start + step]], template_feats[b[start:start + step]]
            scores[start:start + step] = np.einsum("ij,ij->i", fa, fb)
    return scores
