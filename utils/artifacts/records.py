"""The per-sample files that training and scoring write, read back and checked against the dataset.

    scores/<network>_<loss>_<epoch>.npz   eval_trainset.py: gt_prob_with_margin, gt_prob, pred, pred_prob, label
                                          (NaN probabilities and pred -1 for the samples its manifest lists
                                          as `unscored`: images it could not decode, --skip_bad_images true)
    original_<net>_<loss>/prob_history.npy    training: P[epoch, sample], labelled-class probability with
                                              margin as seen during that epoch (NaN: not seen)
    original_<net>_<loss>/topk_logits.npz     training: margin-free top-k logits per epoch and sample
    clean/kept_index.npy                      clean_trainset.py: the samples cleaning keeps
    clean/<scorer>/round_<R>/                 iterative cleaning: round R's lists; for R >= 2 its scores/
                                              (eval_trainset.py --clean_round R: the full set scored by the model
                                              retrained on round R-1's kept list, under round_<R-1>/retrain/)
    <rec>/noise.json                          synthetic or noise-injected data: the injected noise

Every reader names the stage that writes a missing file and refuses a file of another dataset.
"""
from __future__ import annotations

import dataclasses
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils.artifacts import paths
from utils.artifacts.files import (ArtifactError, Fingerprint, check_fingerprint, check_numpy_magic, load_array, load_kept_index,
                             read_array, read_manifest)
from utils.artifacts.paths import manifest_path

SCORE_KEYS = ("gt_prob_with_margin", "gt_prob", "pred", "pred_prob")
# Where each sample lies among the class centres, from the scored (last) checkpoint: the margin-free cosine to its
# labelled class's centre and to the nearest other one, and that class; with a sub-center head also the cosines to
# the labelled class's sub-centers (N, k). Scores written before these existed lack them: the rules that read them
# ask for a new eval_trainset.py run.
GEOMETRY_KEYS = ("label_cos", "other_cos", "other_class")
SUBCENTER_KEY = "label_subcenter_cos"


def load_scores(cfg, fingerprint: Fingerprint) -> dict:
    """The scores file of this config (`paths.scores_path`), checked against the dataset."""
    path = paths.scores_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing scores {path}: run eval_trainset.py with the same --output, --network, "
                            f"--original_net_loss, --eval_epoch/--use_all_epochs first")
    data = load_array(path, fingerprint, length=fingerprint.num_images)
    missing = [k for k in SCORE_KEYS + ("label",) if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing arrays {missing}")
    _check_scores(path, data, fingerprint, _unscored_mask(path, read_manifest(path), fingerprint.num_images))
    return data


def _unscored_mask(path, manifest: dict, n: int) -> np.ndarray:
    """(n,) bool: the samples the scores' manifest lists as `unscored` (eval_trainset.py --skip_bad_images true)."""
    listed = (manifest.get("info") or {}).get("unscored", [])
    index = np.asarray(listed)
    if index.ndim != 1 or (index.size and (index.dtype.kind not in "iu" or index.min() < 0 or index.max() >= n)):
        raise ArtifactError(f"{manifest_path(path)}: 'unscored' must list sample indices in [0, {n}), found "
                            f"{str(listed)[:80]}")
    mask = np.zeros(n, dtype=bool)
    mask[index.astype(np.int64)] = True
    return mask


def _check_scores(path, data: dict, fingerprint: Fingerprint, unscored: np.ndarray):
    """Per image: finite probabilities (floats) and classes of the dataset (integers), as eval_trainset.py writes;
    for the `unscored` images (bool mask: no image to score), NaN probabilities and `pred` -1."""
    n = fingerprint.num_images
    for key in SCORE_KEYS + ("label",):
        a = data[key]
        if a.shape != (n,):
            raise ArtifactError(f"{path}: '{key}' has shape {a.shape}, expected ({n},): one value per image")
        if key in ("pred", "label"):
            scored = a[~unscored] if key == "pred" else a
            if a.dtype.kind not in "iu" or (scored.size and (scored.min() < 0
                                                             or scored.max() >= fingerprint.num_classes)):
                found = f"values {a.min()}..{a.max()}" if a.dtype.kind in "iuf" else "values"
                raise ArtifactError(f"{path}: '{key}' holds {a.dtype} {found}; expected integer classes in "
                                    f"[0, {fingerprint.num_classes})")
            if key == "pred" and (a[unscored] != -1).any():
                raise ArtifactError(f"{path}: 'pred' of a sample its manifest lists as unscored is not -1 (sample "
                                    f"{np.flatnonzero(unscored & (a != -1))[0]}); re-run eval_trainset.py")
        elif a.dtype.kind != "f":
            raise ArtifactError(f"{path}: '{key}' holds {a.dtype}; expected probabilities (floats)")
        elif not np.isfinite(a[~unscored]).all():
            bad = np.flatnonzero(~np.isfinite(a) & ~unscored)
            raise ArtifactError(f"{path}: '{key}' is NaN or infinite for {bad.size} images (e.g. sample {bad[0]}); "
                                f"eval_trainset.py writes finite probabilities: re-run it")
        elif not np.isnan(a[unscored]).all():
            raise ArtifactError(f"{path}: '{key}' holds a value for a sample its manifest lists as unscored (sample "
                                f"{np.flatnonzero(unscored & ~np.isnan(a))[0]}); re-run eval_trainset.py")


    _check_geometry(path, data, fingerprint, unscored)


def _check_geometry(path, data: dict, fingerprint: Fingerprint, unscored: np.ndarray):
    """GEOMETRY_KEYS and SUBCENTER_KEY where present: cosines in [-1, 1] (NaN for the unscored samples, and for
    `label_cos` where a retrained model lacks the identity), `other_class` a class of the dataset or -1."""
    n = fingerprint.num_images
    for key in GEOMETRY_KEYS + (SUBCENTER_KEY,):
        if key not in data:
            continue
        a = data[key]
        if a.shape[:1] != (n,) or a.ndim != (2 if key == SUBCENTER_KEY else 1):
            expected = f"({n}, k)" if key == SUBCENTER_KEY else f"({n},)"
            raise ArtifactError(f"{path}: '{key}' has shape {a.shape}, expected {expected}")
        if key == "other_class":
            if a.dtype.kind not in "iu" or (a.size and (a.min() < -1 or a.max() >= fingerprint.num_classes)):
                raise ArtifactError(f"{path}: 'other_class' must hold classes in [-1, {fingerprint.num_classes})")
        elif a.dtype.kind != "f" or (np.abs(a[np.isfinite(a)]) > 1 + 1e-5).any():
            raise ArtifactError(f"{path}: '{key}' must hold cosines in [-1, 1] (floats)")


def load_prob_history(cfg, fingerprint: Fingerprint) -> np.ndarray:
    """P[epoch, sample] (float32, NaN where the sample was not seen that epoch) of the original training.

    Memory-mapped read-only: at Glint360K scale (20 epochs x 17.1M samples) the file is 1.4 GB and a
    selection reads it in blocks."""
    path = paths.prob_history_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing {path}: train the original model with --is_original_train true")
    manifest = check_fingerprint(path, fingerprint)
    history = open_npy(path)
    if history.ndim != 2 or history.shape[1] != fingerprint.num_images:
        raise ArtifactError(f"{path}: expected shape (epochs, {fingerprint.num_images}), found {history.shape}")
    _check_manifest_shape(path, manifest, history.shape)
    return history[:cfg.score_epochs] if cfg.score_epochs else history  # early scoring: the first K epochs


TOPK_KEYS = ("topk_logits", "topk_index", "rest_mean_logit")


def load_topk(cfg, fingerprint: Fingerprint) -> dict:
    """Per epoch and sample: the margin-free top-k logits, their classes (-1: not seen) and the mean of the rest.

    The arrays are memory-mapped read-only (the .npz members are stored uncompressed)."""
    path = paths.topk_history_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing {path}: train the original model with --is_original_train true "
                            f"--record_topk K (K > 0)")
    manifest = check_fingerprint(path, fingerprint)
    rec = open_npz(path)
    missing = [k for k in TOPK_KEYS if k not in rec]
    if missing:
        raise ArtifactError(f"{path}: missing arrays {missing}")
    logits, index, rest = (rec[k] for k in TOPK_KEYS)
    if logits.ndim != 3 or logits.shape[1] != fingerprint.num_images or index.shape != logits.shape \
            or rest.shape != logits.shape[:2]:
        raise ArtifactError(f"{path}: expected topk_logits and topk_index of shape (epochs, "
                            f"{fingerprint.num_images}, k) and rest_mean_logit (epochs, {fingerprint.num_images}); "
                            f"found {logits.shape}, {index.shape}, {rest.shape}")
    if "label_logit" in rec and rec["label_logit"].shape != logits.shape[:2]:
        raise ArtifactError(f"{path}: label_logit has shape {rec['label_logit'].shape}, expected {logits.shape[:2]}")
    _check_manifest_shape(path, manifest, logits.shape)
    if logits.shape[2] > fingerprint.num_classes:
        raise ArtifactError(f"{path}: top-{logits.shape[2]} logits recorded, but the dataset has "
                            f"{fingerprint.num_classes} classes")
    if cfg.score_epochs:  # early scoring: the first K epochs
        return {k: rec[k][:cfg.score_epochs] for k in rec}
    return rec


def _check_manifest_shape(path, manifest: dict, shape):
    """The training writes (epochs, samples[, k]) into the manifest: a file replaced or cut since disagrees."""
    recorded = (manifest.get("info") or {}).get("shape")
    if recorded is not None and tuple(recorded) != tuple(shape):
        raise ArtifactError(f"{path}: holds shape {tuple(shape)}, its manifest says {tuple(recorded)} "
                            f"(epochs, samples[, k]); assemble it again (train_everything.py --resume true)")


# ------------------------------------------------------------------------ memory-mapped array files
def _refuse(path, e) -> ArtifactError:
    return ArtifactError(f"{path}: truncated or not a NumPy array file of numbers ({type(e).__name__}: {e})")


def open_npy(path) -> np.ndarray:
    """A `.npy` file memory-mapped read-only; object arrays (pickles) are refused."""
    with open(path, "rb") as f:
        check_numpy_magic(path, f.read(6))
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _refuse(path, e) from None


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def npz_headers(path) -> dict:
    """{name: (shape, dtype, data offset or None)} of the arrays of an `.npz`, without reading them.

    The offset is where the raw array data starts in the file when the member is stored uncompressed
    (as np.savez and the training's streamed writer store them); None for a compressed member."""
    out = {}
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    with zf.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        shape, fortran, dtype = _HEADER_READERS[version](member)
                    out[info.filename[:-4]] = (shape, dtype, None)
                    continue
                f.seek(info.header_offset)
                local = struct.unpack("<4s5H3L2H", f.read(30))  # ZIP local file header
                if local[0] != b"PK\x03\x04":
                    raise zipfile.BadZipFile(f"no local header for {info.filename}")
                f.seek(info.header_offset + 30 + local[-2] + local[-1])
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = _HEADER_READERS[version](f)
                if fortran:
                    raise ValueError(f"{info.filename}: Fortran-ordered array")
                out[info.filename[:-4]] = (shape, dtype, f.tell())
    except (OSError, EOFError, ValueError, KeyError, struct.error, zipfile.BadZipFile) as e:
        raise _refuse(path, e) from None
    for name, (shape, dtype, _) in out.items():
        if dtype.hasobject:
            raise ArtifactError(f"{path}: refused: array {name!r} holds Python objects")
    return out


def open_npz(path) -> dict:
    """The arrays of an `.npz`, memory-mapped read-only where stored uncompressed (else read)."""
    with open(path, "rb") as f:
        check_numpy_magic(path, f.read(6))
    out = {}
    compressed = False
    for name, (shape, dtype, offset) in npz_headers(path).items():
        if offset is None:
            compressed = True
        elif int(np.prod(shape)) == 0:
            out[name] = np.empty(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    if compressed:
        data = read_array(path)
        out.update({k: v for k, v in data.items() if k not in out})
    return out


def cleaned_kept(cfg, fingerprint: Fingerprint) -> tuple:
    """(kept sample indices of the cleaning stage, their file)."""
    path = paths.clean_dir(cfg) / "kept_index.npy"
    if not path.exists():
        raise ArtifactError(f"missing {path}: run clean_trainset.py first (diffprob_clean prunes the cleaned set)")
    return load_kept_index(path, fingerprint), path


def load_relabel(path, dataset):
    """(sample indices, suggested labels) of cleaning's relabel.npz, checked against `dataset`: the indices in range
    and distinct, its labels this dataset's, the suggested labels classes of it (export and retraining read it)."""
    fp = dataset.fingerprint
    rel = load_array(path, fp)
    missing = {"index", "label", "suggested_label"} - set(rel if isinstance(rel, dict) else ())
    if missing:
        raise ArtifactError(f"{path}: expected a relabel.npz with arrays index, label, suggested_label "
                            f"(clean_trainset.py --relabel true); missing {sorted(missing)}")
    order = np.argsort(rel["index"], kind="stable")
    index = rel["index"][order].astype(np.int64)
    if index.size and (index[0] < 0 or index[-1] >= fp.num_images or np.any(np.diff(index) == 0)):
        raise ArtifactError(f"{path}: 'index' must hold distinct sample indices in [0, {fp.num_images})")
    if not np.array_equal(dataset.all_labels[index], rel["label"][order]):
        raise ArtifactError(f"{path}: its 'label' array does not hold this dataset's labels of its samples")
    suggested = rel["suggested_label"][order].astype(np.int64)
    if suggested.size and (suggested.min() < 0 or suggested.max() >= dataset.source_num_classes):
        raise ArtifactError(f"{path}: suggested labels must be in [0, {dataset.source_num_classes})")
    return index, suggested


def labels_from_label_dict(path, fingerprint: Fingerprint) -> np.ndarray:
    """Per-sample labels rebuilt from generate_label_dict.py's `label_dict.npz` (CSR: identities, starts, order)."""
    d = load_array(path, fingerprint)
    try:
        identities, starts, order = d["identities"], d["starts"], d["order"]
    except (KeyError, IndexError, TypeError):
        raise ArtifactError(f"{path}: expected the arrays identities, starts, order of generate_label_dict.py") from None
    if order.shape != (fingerprint.num_images,) or starts.shape != identities.shape:
        raise ArtifactError(f"{path}: arrays of shapes {identities.shape}, {starts.shape}, {order.shape} do not "
                            f"describe {fingerprint.num_images} images")
    labels = np.empty(order.size, dtype=np.int64)
    labels[order] = np.repeat(identities, np.diff(np.append(starts, order.size)))
    return labels


@dataclass
class Records:
    """What a selection reads: the labels from the record headers, and the stage files it `needs`.

    The files load on first use and are checked against the dataset's fingerprint; `inputs` lists the
    files read, for the manifest of what the selection writes.
    """
    cfg: object
    labels: np.ndarray
    fingerprint: Fingerprint
    num_classes: int
    inputs: list = field(default_factory=list)
    _cache: dict = field(default_factory=dict, repr=False)
    dataset: object = field(default=None, repr=False)  # the FaceDataset: its record keys or files, for the ranking

    def _load(self, key, loader, path):
        if key not in self._cache:
            self._cache[key] = loader(self.cfg, self.fingerprint)
            self.inputs.append(path)
        return self._cache[key]

    @property
    def scores(self) -> dict:
        return self._load("scores", load_scores, paths.scores_path(self.cfg))

    @property
    def unscored(self) -> np.ndarray:
        """Sorted int64 sample indices the scores have no value for (eval_trainset.py --skip_bad_images true: images
        it could not decode; NaN there, listed in its manifest). Reads the scores."""
        return np.flatnonzero(np.isnan(self.scores["gt_prob_with_margin"])).astype(np.int64)

    def subset(self, index) -> "Records":
        """These records restricted to the samples `index` (sorted sample indices; sample `index[i]` is the
        result's sample i), as if the dataset held only them: every per-sample array read so far, cut. Read what a
        method needs first (`load`): a file read later would have every sample. `inputs` stays shared."""
        index = np.asarray(index, dtype=np.int64)
        cut = {"scores": lambda d: {k: v[index] for k, v in d.items()}, "clean": lambda m: m[index],
               "prob_history": lambda h: h[:, index], "topk": lambda d: {k: v[:, index] for k, v in d.items()}}
        return dataclasses.replace(self, labels=self.labels[index],
                                   _cache={k: cut[k](v) for k, v in self._cache.items()})

    @property
    def prob_history(self) -> np.ndarray:
        return self._load("prob_history", load_prob_history, paths.prob_history_path(self.cfg))

    @property
    def topk(self) -> dict:
        return self._load("topk", load_topk, paths.topk_history_path(self.cfg))

    @property
    def excluded_by_cleaning(self) -> np.ndarray:
        """Boolean mask of the samples cleaning removed."""
        if "clean" not in self._cache:
            kept, path = cleaned_kept(self.cfg, self.fingerprint)
            excluded = np.ones(self.fingerprint.num_images, dtype=bool)
            excluded[kept] = False
            self._cache["clean"] = excluded
            self.inputs.append(path)
        return self._cache["clean"]

    def load(self, needs):
        """Read every file of `needs` now, so a missing one stops the stage before any work."""
        for need in needs:
            getattr(self, NEEDS[need])
        return self


# need -> the Records attribute that loads it
NEEDS = {"scores": "scores", "prob_history": "prob_history", "topk": "topk", "clean": "excluded_by_cleaning"}


def sample_names(dataset) -> tuple:
    """(column name, per-sample values) that find a sample outside this toolkit: the image file of an
    image-folder dataset, the record key (train.idx) of a RecordIO one; (None, None) otherwise."""
    if getattr(dataset, "files", None) is not None:
        return "file", dataset.files
    if getattr(dataset, "image_keys", None) is not None:
        return "record_key", dataset.image_keys
    return None, None


def open_records(cfg, dataset) -> Records:
    """Records of `dataset` (utils.data.datasets.open_dataset(cfg.rec): labels from the record headers alone)."""
    return Records(cfg, dataset.all_labels, dataset.fingerprint, dataset.source_num_classes, inputs=[],
                   dataset=dataset)


def clean_round_dir(cfg, clean_round: int) -> Path:
    """`clean/<scorer>/round_<R>/`: the lists and counts of cleaning round R (and its scores and model)."""
    return paths.clean_dir(cfg) / f"round_{int(clean_round)}"


def _round_scoring_config(cfg, clean_round: int):
    return dataclasses.replace(cfg, output=str(clean_round_dir(cfg, clean_round)), eval_epoch=-1, use_all_epochs=False)


def round_scores_path(cfg, clean_round: int) -> Path:
    """Round R's scores (R >= 2): every sample scored by the model retrained on round R-1's kept list
    (`round_<R>/scores/<scorer>_last.npz`)."""
    return paths.scores_path(_round_scoring_config(cfg, clean_round))


def round_train_keys(cfg, clean_round: int) -> dict:
    """The config keys that retrain on round R's kept list (train_everything.py): the model lands in
    `round_model_dir(cfg, R)`, inside the round's folder."""
    folder = clean_round_dir(cfg, clean_round)
    return {"output": str(folder), "is_original_train": False, "coreset_method": "full",
            "kept_index": str(folder / "kept_index.npy"), "label_map": str(folder / "label_map.json")}


def round_model_dir(cfg, clean_round: int) -> Path:
    """Where train_everything.py writes the model retrained on round R's kept list."""
    return paths.train_dir(dataclasses.replace(cfg, **round_train_keys(cfg, clean_round)))


def load_round_scores(cfg, fingerprint: Fingerprint) -> dict:
    """The scores cleaning round `cfg.clean_round` (>= 2) reads, checked against the dataset."""
    path = round_scores_path(cfg, cfg.clean_round)
    if not path.exists():
        raise ArtifactError(f"missing {path}: score the full set with round {cfg.clean_round - 1}'s retrained model "
                            f"first (eval_trainset.py --clean_round {cfg.clean_round})")
    return load_scores(_round_scoring_config(cfg, cfg.clean_round), fingerprint)


def open_cleaning_records(cfg, dataset) -> Records:
    """Records for cleaning: as `open_records`, but in round R >= 2 (`cfg.clean_round`) the scores are the
    round's (the retrained model's); the trajectory records stay the original training's."""
    rec = open_records(cfg, dataset)
    if cfg.clean_round >= 2:
        rec._load("scores", load_round_scores, round_scores_path(cfg, cfg.clean_round))
    return rec
