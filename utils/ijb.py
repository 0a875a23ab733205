"""IJB-B / IJB-C evaluation on the official release layout: 1:1 verification and 1:N identification.

Layout under `root` (`t` = 'ijbc' or 'ijbb'):

    loose_crop/*.jpg                   the images
    meta/t_face_tid_mid.txt            "image template_id media_id"
    meta/t_name_5pts_score.txt         "image x1 y1 ... x5 y5 detector_score", same images, same order
    meta/t_template_pair_label.txt     "template_a template_b label" (1 = same subject)
    meta/t_1N_gallery_G1.csv, ..._G2.csv, t_1N_probe_mixed.csv    optional, for 1:N (IJB-B: S1, S2)

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
import csv
import hashlib
import itertools
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from tqdm import tqdm

from utils.alignment import align_face
from utils.artifacts import atomic_path, atomic_write_csv
from utils.verification import (autocast_dtype, embed_batch, eval_mode, far_label, l2_normalize,
                                model_device)

logger = logging.getLogger(__name__)

TARGETS = ("ijbb", "ijbc")
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FPIR_TARGETS = (0.01, 0.1)
RANKS = (1, 5, 10)
# IJB-C calls its two galleries G1/G2, IJB-B S1/S2; the first name that exists is used.
GALLERY_FILES = {"G1": ("{t}_1N_gallery_G1.csv", "{t}_1N_gallery_S1.csv"),
                 "G2": ("{t}_1N_gallery_G2.csv", "{t}_1N_gallery_S2.csv")}
PROBE_FILE = "{t}_1N_probe_mixed.csv"
CSV_COLUMNS = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME")


class IJBMetaError(ValueError):
    """A meta file that does not describe a usable IJB evaluation; the message names file and line."""


# ----------------------------------------------------------------------------------------------------
# Meta readers


_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True  # the bytes that bytes.split() splits on


def _read_fields(path, num_fields, expected):
    """The non-blank lines of a whitespace-separated text file, each of exactly `num_fields` fields.

    -> (fields (M, num_fields) object array of bytes, line number (M,) of each row). Fields are counted
    per line on the raw bytes with NumPy: a Python loop over IJB-C's 469k lines takes seconds.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise IJBMetaError(f"{path}: no data lines ({expected} expected)")
    buf = np.frombuffer(raw, dtype=np.uint8)
    space = _WHITESPACE[buf]
    token_starts = np.flatnonzero(~space & np.r_[True, space[:-1]])
    newlines = np.flatnonzero(buf == 10)
    counts = np.bincount(np.searchsorted(newlines, token_starts), minlength=newlines.size + 1)
    bad = np.flatnonzero((counts > 0) & (counts != num_fields))
    if bad.size:
        line = raw.split(b"\n")[bad[0]].decode("utf-8", "replace").rstrip("\r")
        raise IJBMetaError(f"{path}, line {bad[0] + 1}: expected {num_fields} fields ({expected}), "
                           f"found {counts[bad[0]]}: {line!r}")
    fields = np.empty(token_starts.size, dtype=object)
    fields[:] = raw.split()
    return fields.reshape(-1, num_fields), np.flatnonzero(counts) + 1


def _to_numbers(path, fields, lines, dtype, expected):
    """`fields` (M, k) of bytes as a `dtype` array; the first bad value is reported with its line."""
    integer = np.issubdtype(np.dtype(dtype), np.integer)
    try:
        values = fields.astype(dtype)
        if integer or np.isfinite(values).all():
            return values
    except (ValueError, TypeError, OverflowError):
        pass
    for row, lineno in zip(fields, lines):
        for value in row:
            try:
                ok = np.isfinite(int(value) if integer else float(value))
            except (ValueError, OverflowError):
                ok = False
            if not ok:
                kind = "an integer" if integer else "a finite number"
                raise IJBMetaError(f"{path}, line {lineno}: {value.decode('utf-8', 'replace')!r} is not {kind} "
                                   f"({expected})")
    raise IJBMetaError(f"{path}: values do not convert to {np.dtype(dtype)} ({expected})")


def _line_of_row(path, row):
    """Line number of the `row`-th (0-based) non-blank line (for error messages only: it reads the file)."""
    with open(path, "rb") as f:
        nonblank = (lineno for lineno, line in enumerate(f, 1) if line.strip())
        return next(itertools.islice(nonblank, row, None), None)


def read_template_media_list(path):
    """`t_face_tid_mid.txt` -> (image names [N], template ids (N,) int64, media ids (N,) int64, line of each)."""
    expected = "'image template_id media_id'"
    fields, lines = _read_fields(path, 3, expected)
    ids = _to_numbers(path, fields[:, 1:], lines, np.int64, expected)
    return [name.decode("utf-8") for name in fields[:, 0]], ids[:, 0].copy(), ids[:, 1].copy(), lines


def read_landmarks(path):
    """`t_name_5pts_score.txt` -> (image names [N], landmarks (N, 5, 2) float32 (x, y), detector scores (N,),
    line of each)."""
    expected = "'image x1 y1 ... x5 y5 detector_score'"
    fields, lines = _read_fields(path, 12, expected)
    values = _to_numbers(path, fields[:, 1:], lines, np.float64, expected)
    names = [name.decode("utf-8") for name in fields[:, 0]]
    return names, values[:, :10].reshape(-1, 5, 2).astype(np.float32), values[:, 10].astype(np.float32), lines


def read_template_pair_list(path):
    """`t_template_pair_label.txt` -> (pairs (P, 2) int64 template ids, labels (P,) int64 in {0, 1})."""
    expected = "'template_a template_b label', integers"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty file is reported below
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)  # C parser: 15.7M lines in seconds
    except ValueError:
        table = None
    if table is None or table.shape[0] == 0 or table.shape[1] != 3:
        fields, lines = _read_fields(path, 3, expected)  # slower, but says where
        table = _to_numbers(path, fields, lines, np.int64, expected)
    bad = np.flatnonzero((table[:, 2] != 0) & (table[:, 2] != 1))
    if bad.size:
        raise IJBMetaError(f"{path}, line {_line_of_row(path, int(bad[0]))}: label {table[bad[0], 2]} is not 0 or 1")
    return table[:, :2].copy(), table[:, 2].copy()


def read_1n_list(path):
    """A 1:N gallery or probe CSV (header naming at least TEMPLATE_ID, SUBJECT_ID, FILENAME, any order,
    extra columns ignored; one row per image) -> (template ids (T,) int64, subject ids (T,) int64, line of
    each template's first row), one entry per template in file order. FILENAME is only checked to be
    there: images are tied to templates by the tid_mid list, whose names are the loose_crop files."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        columns = {name.strip().upper(): i for i, name in enumerate(header or [])}
        missing = [c for c in CSV_COLUMNS if c not in columns]
        if missing:
            raise IJBMetaError(f"{path}, line 1: header must name {', '.join(CSV_COLUMNS)}; missing {missing}, "
                               f"found {header}")
        t_col, s_col, f_col = (columns[c] for c in CSV_COLUMNS)
        subject_of, first_line = {}, {}
        for row in reader:
            lineno = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise IJBMetaError(f"{path}, line {lineno}: expected {len(header)} fields as the header, found "
                                   f"{len(row)}: {row}")
            try:
                template, subject = int(row[t_col]), int(row[s_col])
            except ValueError:
                raise IJBMetaError(f"{path}, line {lineno}: TEMPLATE_ID and SUBJECT_ID must be integers, found "
                                   f"{row[t_col]!r}, {row[s_col]!r}") from None
            if not row[f_col].strip():
                raise IJBMetaError(f"{path}, line {lineno}: empty FILENAME")
            if subject_of.setdefault(template, subject) != subject:
                raise IJBMetaError(f"{path}, line {lineno}: template {template} has subject {subject} here but "
                                   f"{subject_of[template]} on line {first_line[template]}")
            first_line.setdefault(template, lineno)
    if not subject_of:
        raise IJBMetaError(f"{path}: no rows after the header")
    templates = np.fromiter(subject_of.keys(), dtype=np.int64, count=len(subject_of))
    subjects = np.fromiter(subject_of.values(), dtype=np.int64, count=len(subject_of))
    return templates, subjects, np.array([first_line[t] for t in subject_of])


@dataclass
class IJBMeta:
    """Everything the evaluation reads from `root/meta`, checked against `root/loose_crop`."""
    root: str
    target: str
    names: list  # image file names in loose_crop, (N,)
    landmarks: np.ndarray  # (N, 5, 2) float32
    faceness: np.ndarray  # (N,) float32 detector scores
    templates: np.ndarray  # (N,) int64
    medias: np.ndarray  # (N,) int64
    pair_templates: np.ndarray  # (P, 2) int64
    pair_labels: np.ndarray  # (P,) int64, 1 = same subject
    galleries: dict = field(default_factory=dict)  # name -> (template ids, subject ids); empty without 1:N
    probe: tuple = None  # (template ids, subject ids) or None

    @property
    def image_dir(self):
        return os.path.join(self.root, "loose_crop")

    def meta_path(self, pattern):
        return os.path.join(self.root, "meta", pattern.format(t=self.target))


def _check_target(target):
    target = str(target).lower()
    if target not in TARGETS:
        raise ValueError(f"unknown IJB target {target!r}; valid: {list(TARGETS)}")
    return target


def _check_images_exist(image_dir, names, listed_in, lines):
    """One listdir of loose_crop; names with a folder part are checked one by one."""
    if not os.path.isdir(image_dir):
        raise IJBMetaError(f"{image_dir}: image folder missing (the images of {listed_in})")
    present = set(os.listdir(image_dir))
    missing = [i for i, name in enumerate(names)
               if name not in present and not ("/" in name and os.path.isfile(os.path.join(image_dir, name)))]
    if missing:
        shown = ", ".join(f"line {lines[i]} {names[i]!r}" for i in missing[:5])
        raise IJBMetaError(f"{listed_in}: {len(missing)} of {len(names)} images are missing from {image_dir}: "
                           f"{shown}{', ...' if len(missing) > 5 else ''}")


def _check_templates_known(path, templates, known, lines, what, listed_in):
    """Every template id of `path` must have images; `lines`: the line of each entry, or None to look it up."""
    unknown = np.flatnonzero(_rows_of(templates, known) < 0)
    if unknown.size:
        i = int(unknown[0])
        lineno = lines[i] if lines is not None else _line_of_row(path, i)
        raise IJBMetaError(f"{path}, line {lineno}: {what} {templates[i]} has no images in {listed_in} "
                           f"({unknown.size} unknown in this file)")


def _line(lines, i):
    return lines[i] if i < len(lines) else "end of file"


def load_ijb_meta(root, target="ijbc", check_images=True):
    """Read and cross-check every meta file of an IJB root; raise IJBMetaError naming file and line."""
    root, target = os.fspath(root), _check_target(target)
    meta = os.path.join(root, "meta")
    tid_mid_path = os.path.join(meta, f"{target}_face_tid_mid.txt")
    pts_path = os.path.join(meta, f"{target}_name_5pts_score.txt")
    pair_path = os.path.join(meta, f"{target}_template_pair_label.txt")
    for path in (tid_mid_path, pts_path, pair_path):
        if not os.path.isfile(path):
            raise IJBMetaError(f"{path}: missing (IJB layout: loose_crop/ and meta/{target}_*.txt under {root})")

    names, templates, medias, tid_mid_lines = read_template_media_list(tid_mid_path)
    pts_names, landmarks, faceness, pts_lines = read_landmarks(pts_path)
    if pts_names != names:
        i = next((k for k, (a, b) in enumerate(zip(names, pts_names)) if a != b), min(len(names), len(pts_names)))
        a = repr(names[i]) if i < len(names) else "nothing (end of file)"
        b = repr(pts_names[i]) if i < len(pts_names) else "nothing (end of file)"
        raise IJBMetaError(f"{tid_mid_path} and {pts_path} must list the same images in the same order: "
                           f"image {i + 1} is {a} ({tid_mid_path}, line {_line(tid_mid_lines, i)}) but {b} "
                           f"({pts_path}, line {_line(pts_lines, i)})")
    if check_images:
        _check_images_exist(os.path.join(root, "loose_crop"), names, pts_path, pts_lines)

    pair_templates, pair_labels = read_template_pair_list(pair_path)
    known = np.unique(templates)
    for column in (0, 1):
        _check_templates_known(pair_path, pair_templates[:, column], known, None, "template", tid_mid_path)

    result = IJBMeta(root, target, names, landmarks, faceness, templates, medias, pair_templates, pair_labels)
    probe_path = result.meta_path(PROBE_FILE)
    for gallery, patterns in GALLERY_FILES.items():
        path = next((p for p in map(result.meta_path, patterns) if os.path.isfile(p)), None)
        if path is not None and os.path.isfile(probe_path):
            g_templates, g_subjects, g_lines = read_1n_list(path)
            _check_templates_known(path, g_templates, known, g_lines, "gallery template", tid_mid_path)
            result.galleries[gallery] = (g_templates, g_subjects)
    if result.galleries:
        p_templates, p_subjects, p_lines = read_1n_list(probe_path)
        _check_templates_known(probe_path, p_templates, known, p_lines, "probe template", tid_mid_path)
        result.probe = (p_templates, p_subjects)
    return result


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
            raise ValueError(f"{path}: {e}") from e
        return torch.from_numpy(np.ascontiguousarray(cv2.cvtColor(face, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)))


@dataclass
class IJBFeatures:
    """Raw network outputs per image, in the order of the meta lists."""
    img_feats: np.ndarray  # (N, D) float32
    flip_feats: np.ndarray = None  # (N, D) float32, features of the flipped images; None without flip test


def feature_cache_key(checkpoint, meta, image_size, flip, dtype):
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
        "dtype": str(autocast_dtype(dtype)),
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
    key = None
    if cache_path is not None:
        key = feature_cache_key(checkpoint, meta, image_size, flip, dtype)
        cached = load_feature_cache(cache_path, key)
        if cached is not None:
            logger.info("%s features from cache %s", meta.target, cache_path)
            return cached
    device = torch.device(device) if device is not None else model_device(model)
    amp_dtype = autocast_dtype(dtype)
    dataset = AlignedFaceDataset(meta.image_dir, meta.names, meta.landmarks, image_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    bar = tqdm(total=len(dataset), desc=f"{meta.target} features", unit="img", disable=not progress)
    feats, flip_feats = [], []
    start = time.perf_counter()
    with eval_mode(model):
        for batch in loader:
            emb, emb_flip = embed_batch(model, batch, device, amp_dtype, flip)
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


def _rows_of(ids, unique_sorted):
    """The row of each id (any shape) in `unique_sorted` (sorted unique int64 ids), -1 where it is absent."""
    ids = np.asarray(ids, dtype=np.int64)
    lo, hi = int(unique_sorted[0]), int(unique_sorted[-1])
    if hi - lo <= 4 * max(ids.size, unique_sorted.size):  # a lookup table beats a binary search per id
        table = np.full(hi - lo + 1, -1, dtype=np.int64)
        table[unique_sorted - lo] = np.arange(unique_sorted.size)
        return np.where((ids >= lo) & (ids <= hi), table[np.clip(ids - lo, 0, hi - lo)], -1)
    pos = np.minimum(np.searchsorted(unique_sorted, ids), unique_sorted.size - 1)
    return np.where(unique_sorted[pos] == ids, pos, -1)


def _template_rows(unique_templates, template_ids):
    rows = _rows_of(template_ids, unique_templates)
    if (rows < 0).any():
        unknown = np.unique(np.asarray(template_ids)[rows < 0])
        raise KeyError(f"templates without features: {unknown[:10].tolist()}")
    return rows


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
    a = _template_rows(unique_templates, pair_templates[:, 0])
    b = _template_rows(unique_templates, pair_templates[:, 1])
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
        raise ValueError(f"{np.count_nonzero(~np.isfinite(scores))} scores are NaN or infinite (a diverged model?)")
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
        raise ValueError(f"unknown TAR rule {rule!r}; valid: {sorted(TAR_RULES)}") from None
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
    probe_feats = template_feats[_template_rows(unique_templates, probe_templates)]
    results = {}
    for name, (gallery_templates, gallery_subjects) in galleries.items():
        gallery_feats = template_feats[_template_rows(unique_templates, gallery_templates)]
        parts = [_probe_stats(probe_feats[s:s + probe_block] @ gallery_feats.T, probe_subjects[s:s + probe_block],
                              gallery_subjects) for s in range(0, len(probe_templates), probe_block)]
        stats = [np.concatenate(column) for column in zip(*parts)]
        results[name] = _identification(*stats, ranks, fpir_targets)
        results[name]["num_gallery_templates"] = int(len(gallery_templates))
    if results:
        metric_names = [k for k in next(iter(results.values())) if k.startswith(("rank-", "TPIR@"))]
        results["mean"] = {k: float(np.mean([r[k] for r in results.values()])) for k in metric_names}
    return results


# ----------------------------------------------------------------------------------------------------
# Reports




def save_tar_table(results_by_model, path, far_targets=FAR_TARGETS):
    """CSV: one row per model (name, target, TAR at each FAR as a fraction)."""
    columns = [f"TAR@FAR={far_label(far)}" for far in far_targets]
    rows = [[name, r.get("target", "")] + [f"{r[c]:.6f}" for c in columns] for name, r in results_by_model.items()]
    atomic_write_csv(path, ["model", "target"] + columns, rows)


def save_identification_table(results_by_model, path):
    """CSV: one row per model and gallery (G1, G2, mean) with the 1:N metrics."""
    rows, columns = [], None
    for name, r in results_by_model.items():
        for gallery, metrics in r.get("1:N", {}).items():
            columns = columns or [k for k in metrics if k.startswith(("rank-", "TPIR@"))]
            rows.append([name, r.get("target", ""), gallery] + [f"{metrics[c]:.6f}" for c in columns])
    atomic_write_csv(path, ["model", "target", "gallery"] + (columns or []), rows)


def plot_roc(results_by_model, path, title="ROC on IJB"):
    """Log-x ROC PNG with one line per model. Values: (fpr, tpr) or a result dict of `evaluate_ijb`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in results_by_model.items():
        if isinstance(curve, dict):
            curve = (curve["roc"]["fpr"], curve["roc"]["tpr"])
        fpr, tpr = (np.asarray(c, dtype=np.float64) for c in curve)
        positive = fpr > 0  # a log axis cannot show FPR 0
        ax.plot(fpr[positive], tpr[positive], lw=1, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(list(FAR_TARGETS) + [1.0])
    ax.grid(linestyle="--", linewidth=0.5)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def format_ijb_table(results_by_model, far_targets=FAR_TARGETS):
    """Text table of TAR (%) at each FAR, one row per model, for logs."""
    columns = [f"TAR@FAR={far_label(far)}" for far in far_targets]
    width = max([len("model")] + [len(n) for n in results_by_model])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{far_label(f):>7}" for f in far_targets)]
    for name, r in results_by_model.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * r[c]:7.2f}" for c in columns))
    return "\n".join(lines)


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
