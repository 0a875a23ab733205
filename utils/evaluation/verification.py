"""InsightFace `.bin` verification sets: reading, writing, embedding and the 10-fold protocol.

The protocol is InsightFace's `eval/verification.py` (itself from FaceNet's LFW code), reproduced so
that the same embeddings give the same numbers:

- the embedding of an image is the sum of the embeddings of the image and of its horizontal flip,
  and embeddings are L2-normalised before any distance is taken;
- pair i is rows 2i and 2i+1; its distance is the squared Euclidean distance (in [0, 4]);
  a pair is called "same" when distance < threshold (strictly);
- accuracy: 10 contiguous folds (sklearn `KFold(n_splits=10, shuffle=False)`); on each fold the
  threshold of `np.arange(0, 4, 0.01)` with the best accuracy on the other nine folds (the first one on
  ties, `np.argmax`) is applied to the held-out fold: one accuracy per fold;
- TAR at FAR 1e-3 (`calculate_val`): per fold, the FAR of the nine training folds at every threshold of
  `np.arange(0, 4, 0.001)` is interpolated linearly (SciPy's `interp1d(kind='slinear')` as it behaved
  when InsightFace wrote this, duplicates in the FAR column included; see `_slinear_threshold`) to find
  the threshold whose FAR is 1e-3, or 0 when even the largest FAR is below 1e-3; TAR and FAR are then
  measured on the held-out fold.

Everything is vectorised: per fold the accepted counts at all thresholds come from one `searchsorted`
on the sorted distances, which counts exactly the pairs with distance < threshold.
"""
import io
import logging
import math
import os
import pickle
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

try:  # a .bin pickled under numpy 1 or 2 names either module (see _bin_globals)
    from numpy._core import multiarray, numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric

from utils.artifacts.files import ArtifactError, atomic_path
from utils.models.embedding import embed_views

logger = logging.getLogger(__name__)


class BinFileError(ArtifactError, ValueError):
    """A `.bin` verification set that cannot be read: the message names the file and what was expected."""

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)  # squared distances, as InsightFace's calculate_roc
VAL_THRESHOLDS = np.arange(0, 4, 0.001)  # finer grid, as InsightFace's calculate_val


def save_bin(path, encoded_images, issame):
    """Write an InsightFace `.bin`: a pickle of (list of encoded image bytes, list of bool issame).

    Pair i is images 2i and 2i+1, so there must be exactly two images per issame entry.
    """
    encoded_images = [bytes(b) for b in encoded_images]
    issame = [bool(x) for x in issame]
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"{path}: {len(encoded_images)} images for {len(issame)} pairs; expected {2 * len(issame)}")
    with atomic_path(path, suffix=".bin") as tmp:
        with open(tmp, "wb") as f:
            pickle.dump((encoded_images, issame), f, protocol=4)


# ----------------------------------------------------------------------------------------------------
# Reading .bin files


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Python 3 pickles of `bytes` below protocol 3 call `_codecs.encode(text, 'latin1')`; nothing else is allowed."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}: a .bin encodes bytes as latin1 only")
    return text.encode("latin1")


def _bin_globals() -> dict:
    """The only globals a real .bin needs: byte strings and numpy arrays/scalars, as numpy 1 and 2 name them."""
    table = {}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for mod in ("builtins", "__builtin__"):  # Python 2 files name the builtins module __builtin__
        table[(mod, "bytes")] = bytes
        table[(mod, "bytearray")] = bytearray
    table[("_codecs", "encode")] = _latin1_encode
    return table


_BIN_GLOBALS = _bin_globals()


class RefusedPickle(pickle.UnpicklingError):
    """The pickle asks for a global a .bin never holds (it would run code on load)."""


class BinUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of `_bin_globals`, so a crafted .bin cannot run code."""

    def find_class(self, module, name):
        try:
            return _BIN_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None


def _unpickle_bin(path):
    """The (bins, issame) pair of a .bin written by Python 3, or by Python 2 (str payloads, numpy arrays).

    Unpickling runs only through `BinUnpickler`: a pickle that asks for any other global is refused.
    """
    with open(path, "rb") as f:
        raw = f.read()
    # Python 2 `str` payloads need encoding='bytes'; Python 2 numpy arrays only load with 'latin1'
    # (their payloads then come back as latin-1 `str`, turned back into bytes by `_as_buffer`).
    first_error = None
    for kwargs in ({}, {"encoding": "bytes"}, {"encoding": "latin1"}):
        try:
            obj = BinUnpickler(io.BytesIO(raw), **kwargs).load()
            break
        except RefusedPickle as e:
            raise ArtifactError(f"{path}: refused to load: the pickle asks for {e}; a .bin holds only encoded "
                                f"images and bool labels") from None
        except Exception as e:  # a corrupt pickle can raise almost anything; report the first failure
            first_error = first_error or e
    else:
        reason = " ".join(str(first_error).split())  # some unpickling errors span lines
        raise BinFileError(f"{path}: not a readable pickle ({type(first_error).__name__}: {reason}); expected "
                           f"an InsightFace .bin (a pickle of encoded images and bool labels)") from first_error
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise BinFileError(f"{path}: expected a pickle of (list of encoded images, list of bool issame), "
                         f"found {type(obj).__name__}" + (f" of length {len(obj)}" if hasattr(obj, "__len__") else ""))
    bins, issame = obj
    try:
        issame = np.asarray(list(issame), dtype=bool)
        num_images = len(bins)
    except (TypeError, ValueError) as e:
        raise BinFileError(f"{path}: expected (list of encoded images, list of bool issame): {e}") from e
    if num_images != 2 * len(issame):
        raise BinFileError(f"{path}: {num_images} images for {len(issame)} pairs; a .bin holds exactly two images "
                         f"per pair (expected {2 * len(issame)})")
    return bins, issame


def _as_buffer(entry):
    """An encoded image as a uint8 numpy buffer (bytes, bytearray, memoryview, numpy array or latin-1 str)."""
    if isinstance(entry, str):
        entry = entry.encode("latin1")
    if isinstance(entry, np.ndarray):
        return np.ascontiguousarray(entry).view(np.uint8).reshape(-1)
    return np.frombuffer(entry, dtype=np.uint8)


def _size_hw(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


_DECODE_CHUNK = 256


def load_bin(path, image_size=(112, 112)):
    """Read an InsightFace `.bin` verification set.

    Returns `(data_list, issame)` like InsightFace: `data_list = [images, flipped_images]`, both uint8
    tensors (N, 3, H, W) RGB (uint8 rather than InsightFace's float keeps LFW at 0.45 GB per copy;
    `utils.data.transforms.normalize_batch` scales them on the device), `flipped_images = images.flip(-1)`;
    `issame` is a numpy bool array (N / 2,). Images of another size are resized (bicubic, as InsightFace's
    `resize_short`) to `image_size` (H, W).
    """
    path = os.fspath(path)
    height, width = _size_hw(image_size)
    bins, issame = _unpickle_bin(path)
    images = torch.empty((len(bins), 3, height, width), dtype=torch.uint8)
    images_np = images.numpy()  # shares memory: threads write straight into the tensor

    def decode_one(idx):
        try:
            buf = _as_buffer(bins[idx])
        except (TypeError, ValueError) as e:
            raise BinFileError(f"{path}: image {idx} is a {type(bins[idx]).__name__}, not encoded image bytes") from e
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
        if img is None:
            raise BinFileError(f"{path}: image {idx} could not be decoded (expected JPEG or PNG bytes, {buf.size} bytes)")
        if img.shape[:2] != (height, width):
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_CUBIC)
        images_np[idx] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).transpose(2, 0, 1)

    def decode(start):
        for idx in range(start, min(start + _DECODE_CHUNK, len(bins))):
            decode_one(idx)

    # cv2 releases the GIL while decoding, so threads are enough to use every core; a task decodes a chunk of
    # images (one task per image spent more time in the pool's plumbing than in decoding 32x32 images).
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for _ in pool.map(decode, range(0, len(bins), _DECODE_CHUNK)):
            pass
    logger.info("loaded %s: %d pairs, images %s", path, len(issame), tuple(images.shape))
    return [images, images.flip(-1)], issame


# ----------------------------------------------------------------------------------------------------
# The 10-fold protocol


def l2_normalize(x):
    """Rows of `x` (float64) divided by their L2 norm; (near-)zero rows are left as they are (as sklearn)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms < 10 * np.finfo(np.float64).eps] = 1.0
    return x / norms[:, None]


def kfold_splits(num_samples, n_splits):
    """[(train_idx, test_idx)] of sklearn `KFold(n_splits, shuffle=False)`: contiguous test folds, the
    first `num_samples % n_splits` one sample larger. `n_splits=1` gives (all, all), as InsightFace's LFold."""
    indices = np.arange(num_samples)
    if n_splits == 1:
        return [(indices, indices)]
    if n_splits < 1 or num_samples < n_splits:
        raise ValueError(f"cannot split {num_samples} pairs into {n_splits} folds")
    sizes = np.full(n_splits, num_samples // n_splits)
    sizes[: num_samples % n_splits] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(np.concatenate([indices[:a], indices[b:]]), indices[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def pair_distances(embeddings, actual_issame):
    """Squared distances (P,) of the L2-normalised pairs (rows 2i, 2i+1) and issame as a bool array (P,)."""
    embeddings = np.asarray(embeddings)
    issame = np.asarray(actual_issame, dtype=bool).reshape(-1)
    if embeddings.ndim != 2 or embeddings.shape[0] != 2 * issame.shape[0]:
        raise ValueError(f"expected embeddings (2 * {issame.shape[0]}, D) for {issame.shape[0]} pairs, "
                         f"got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        logger.warning("embeddings contain NaN or infinity; their pairs count as 'different'")
    emb = l2_normalize(embeddings)
    return np.sum(np.square(emb[0::2] - emb[1::2]), axis=1), issame


def _accept_counts(dist, issame, thresholds):
    """Per threshold: accepted genuine and impostor pairs (distance < threshold), and the two totals."""
    genuine = np.sort(dist[issame])
    impostor = np.sort(dist[~issame])
    true_accepts = np.searchsorted(genuine, thresholds, side="left")
    false_accepts = np.searchsorted(impostor, thresholds, side="left")
    return true_accepts, false_accepts, genuine.size, impostor.size


def _slinear_threshold(far, thresholds, far_target):
    """`interp1d(far, thresholds, kind='slinear')(far_target)` as SciPy computed it for InsightFace.

    SciPy then built a degree-1 B-spline on knots (far[0], far..., far[-1]) even when `far` repeats
    (current SciPy refuses repeats). Its value, reproduced operation for operation: linear interpolation
    on the interval [far[q-1], far[q]] where q is the first index with far[q] > far_target (clamped to the
    last interval), and 0 on an interval of zero length. `far` is non-decreasing; far[0] <= far_target.
    """
    q = int(np.searchsorted(far, far_target, side="right"))
    q = min(max(q, 1), len(far) - 1)
    x0, x1 = far[q - 1], far[q]
    if x1 == x0:
        return 0.0
    w = 1.0 / (x1 - x0)
    return 0.0 + thresholds[q - 1] * (w * (x1 - far_target)) + thresholds[q] * (w * (far_target - x0))


def _ratio(num, den):
    return num / den if den else np.zeros_like(num, dtype=np.float64)


def _protocol(dist, issame, nrof_folds, far_target):
    """Both halves of InsightFace's `evaluate` on pair distances, fold by fold."""
    folds = kfold_splits(dist.shape[0], nrof_folds)
    num_thr = len(ACCURACY_THRESHOLDS)
    tprs, fprs = np.zeros((nrof_folds, num_thr)), np.zeros((nrof_folds, num_thr))
    accuracy, best_thresholds = np.zeros(nrof_folds), np.zeros(nrof_folds)
    val, far, val_thresholds = np.zeros(nrof_folds), np.zeros(nrof_folds), np.zeros(nrof_folds)
    for f, (train, test) in enumerate(folds):
        # calculate_roc: best-accuracy threshold on the training folds, applied to the test fold
        ta, fa, n_same, n_diff = _accept_counts(dist[train], issame[train], ACCURACY_THRESHOLDS)
        best = int(np.argmax((ta + (n_diff - fa)) / train.size))
        ta, fa, n_same, n_diff = _accept_counts(dist[test], issame[test], ACCURACY_THRESHOLDS)
        tprs[f], fprs[f] = _ratio(ta, n_same), _ratio(fa, n_diff)
        accuracy[f] = (ta[best] + (n_diff - fa[best])) / test.size
        best_thresholds[f] = ACCURACY_THRESHOLDS[best]

        # calculate_val: threshold at FAR = far_target on the training folds, TAR/FAR on the test fold
        _, fa, _, n_diff = _accept_counts(dist[train], issame[train], VAL_THRESHOLDS)
        far_train = _ratio(fa, n_diff)
        threshold = _slinear_threshold(far_train, VAL_THRESHOLDS, far_target) if far_train.max() >= far_target else 0.0
        ta, fa, n_same, n_diff = _accept_counts(dist[test], issame[test], np.array([threshold]))
        # InsightFace divides by zero here (a fold without genuine or impostor pairs); we report NaN
        val[f] = ta[0] / n_same if n_same else np.nan
        far[f] = fa[0] / n_diff if n_diff else np.nan
        val_thresholds[f] = threshold
    return {"tpr": tprs.mean(axis=0), "fpr": fprs.mean(axis=0), "accuracy": accuracy,
            "best_thresholds": best_thresholds, "val": val, "far": far, "val_thresholds": val_thresholds}


def evaluate(embeddings, actual_issame, nrof_folds=10):
    """InsightFace's 10-fold verification: `(tpr, fpr, accuracy)`.

    `embeddings` (2P, D), pair i at rows 2i and 2i+1 (L2-normalised here); `tpr`, `fpr` (400,): ROC over
    `ACCURACY_THRESHOLDS` averaged over folds; `accuracy` (nrof_folds,): one held-out accuracy per fold.
    """
    dist, issame = pair_distances(embeddings, actual_issame)
    out = _protocol(dist, issame, nrof_folds, 1e-3)
    return out["tpr"], out["fpr"], out["accuracy"]


def far_label(far):
    """'1e-3' for 0.001, '1e-6' for 1e-06; other values as '%g'."""
    exponent = math.log10(far) if far > 0 else 0.5
    if exponent == round(exponent):
        return f"1e{int(round(exponent))}"
    return f"{far:g}"


def evaluate_full(embeddings, actual_issame, nrof_folds=10, far_target=1e-3):
    """All of InsightFace's verification numbers as a dict.

    Keys: accuracy_mean, accuracy_std (np.std over folds, as InsightFace), accuracy_folds,
    best_threshold (mean over folds of the chosen squared-distance threshold), best_thresholds,
    tar_at_far_1e-3 (mean TAR over folds; the key follows `far_target`), tar_std, far_mean (the FAR
    actually reached on the held-out folds), num_pairs, nrof_folds.
    """
    dist, issame = pair_distances(embeddings, actual_issame)
    out = _protocol(dist, issame, nrof_folds, far_target)
    return {
        "accuracy_mean": float(np.mean(out["accuracy"])),
        "accuracy_std": float(np.std(out["accuracy"])),
        "accuracy_folds": out["accuracy"].tolist(),
        "best_threshold": float(np.mean(out["best_thresholds"])),
        "best_thresholds": out["best_thresholds"].tolist(),
        f"tar_at_far_{far_label(far_target)}": float(np.mean(out["val"])),
        "tar_std": float(np.std(out["val"])),
        "far_mean": float(np.mean(out["far"])),
        "num_pairs": int(dist.shape[0]),
        "nrof_folds": int(nrof_folds),
    }


# ----------------------------------------------------------------------------------------------------
# Running sets


class VerificationSet:
    """A `.bin` set loaded once (e.g. at the start of training) and evaluated with `.run(model)`.

    Only the unflipped images are kept (uint8, N x 3 x H x W); flipped copies are made per batch on the
    device, which halves host memory compared with keeping `load_bin`'s two copies. An image that several
    pairs share (LFW-style sets reuse images) is embedded once: `images` holds the distinct images and
    `positions` maps each pair position to its row.
    """

    def __init__(self, name, path, image_size=(112, 112)):
        self.name = name
        self.path = os.fspath(path)
        data_list, self.issame = load_bin(self.path, image_size)
        if len(self.issame) < 10:  # the protocol's 10 folds (training, eval_verification) need a pair each
            raise BinFileError(f"{self.path}: {len(self.issame)} pair(s), fewer than the 10 folds of the verification "
                               f"protocol; a verification set needs at least 10 pairs")
        all_images = data_list[0]
        first = {}
        rows = np.array([first.setdefault(img.tobytes(), i) for i, img in enumerate(all_images.numpy())])
        distinct = np.unique(rows)
        self.images = all_images[torch.from_numpy(distinct)] if distinct.size < rows.size else all_images
        self.positions = np.searchsorted(distinct, rows)

    def __len__(self):
        return len(self.issame)

    def run(self, model, batch_size=256, device=None, dtype=None, nrof_folds=10, flip=True, progress=False):
        """`evaluate_full` of the model's embeddings (image + flip when `flip`), plus name, xnorm, seconds.

        xnorm is InsightFace's XNorm: the mean L2 norm of the raw embeddings of every view.
        """
        start = time.perf_counter()
        emb, emb_flip = embed_views(model, self.images, batch_size, device, flip, dtype, progress, desc=self.name)
        emb, emb_flip = emb[self.positions], (emb_flip[self.positions] if flip else None)
        views = np.concatenate([emb, emb_flip]) if flip else emb
        xnorm = float(np.mean(np.linalg.norm(views.astype(np.float64), axis=1)))
        # InsightFace sums the two views in float64 before normalising
        summed = emb.astype(np.float64) + emb_flip if flip else emb
        result = evaluate_full(summed, self.issame, nrof_folds)
        result.update(name=self.name, xnorm=xnorm, seconds=time.perf_counter() - start)
        logger.info("[%s] XNorm %.3f  Accuracy-Flip %.5f+-%.5f  (%.1fs)", self.name, xnorm,
                    result["accuracy_mean"], result["accuracy_std"], result["seconds"])
        return result


def verify_bins(model, bin_paths, image_size=(112, 112), batch_size=256, device=None, dtype=None, nrof_folds=10):
    """{name: result dict of `VerificationSet.run`} for `bin_paths` {name: path or loaded VerificationSet}."""
    results = {}
    for name, source in bin_paths.items():
        vset = source if isinstance(source, VerificationSet) else VerificationSet(name, source, image_size)
        results[name] = vset.run(model, batch_size=batch_size, device=device, dtype=dtype, nrof_folds=nrof_folds)
    return results


def format_table(results):
    """A text table: accuracy +- std (%) and TAR@FAR=1e-3 (%) per target, then the mean over targets."""
    tar_key = "tar_at_far_1e-3"
    width = max([len("target")] + [len(name) for name in results])
    lines = [f"{'target':<{width}}  {'accuracy (%)':>17}  {'TAR@FAR=1e-3 (%)':>17}"]
    for name, r in results.items():
        tar = f"{100 * r[tar_key]:7.3f} +- {100 * r['tar_std']:5.3f}" if tar_key in r else ""
        lines.append(f"{name:<{width}}  {100 * r['accuracy_mean']:7.3f} +- {100 * r['accuracy_std']:5.3f}  {tar:>17}")
    if results:
        mean_acc = np.mean([r["accuracy_mean"] for r in results.values()])
        lines.append(f"{'mean':<{width}}  {100 * mean_acc:7.3f}{'':>10}")
    return "\n".join(lines)
