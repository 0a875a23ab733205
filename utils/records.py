"""The per-sample files that training and scoring write, read back and checked against the dataset.

    scores/<network>_<loss>_<epoch>.npz   eval_trainset.py: gt_prob_with_margin, gt_prob, pred, pred_prob, label
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
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import paths
from utils.artifacts import ArtifactError, Fingerprint, load_array, load_kept_index

SCORE_KEYS = ("gt_prob_with_margin", "gt_prob", "pred", "pred_prob")


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
    return data


def load_prob_history(cfg, fingerprint: Fingerprint) -> np.ndarray:
    """P[epoch, sample] (float32, NaN where the sample was not seen that epoch) of the original training."""
    path = paths.prob_history_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing {path}: train the original model with --is_original_train true")
    history = load_array(path, fingerprint)
    if history.ndim != 2 or history.shape[1] != fingerprint.num_images:
        raise ArtifactError(f"{path}: expected shape (epochs, {fingerprint.num_images}), found {history.shape}")
    return history


TOPK_KEYS = ("topk_logits", "topk_index", "rest_mean_logit")


def load_topk(cfg, fingerprint: Fingerprint) -> dict:
    """Per epoch and sample: the margin-free top-k logits, their classes (-1: not seen) and the mean of the rest."""
    path = paths.topk_history_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing {path}: train the original model with --is_original_train true "
                            f"--record_topk K (K > 0)")
    rec = load_array(path, fingerprint)
    missing = [k for k in TOPK_KEYS if k not in rec]
    if missing:
        raise ArtifactError(f"{path}: missing arrays {missing}")
    return rec


def cleaned_kept(cfg, fingerprint: Fingerprint) -> tuple:
    """(kept sample indices of the cleaning stage, their file)."""
    path = paths.clean_dir(cfg) / "kept_index.npy"
    if not path.exists():
        raise ArtifactError(f"missing {path}: run clean_trainset.py first (diffprob_clean prunes the cleaned set)")
    return load_kept_index(path, fingerprint), path


def load_noise(rec) -> dict:
    """The dataset's `noise.json` (injected label flips and open-set outliers), or None without one."""
    path = Path(rec) / "noise.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: not a readable noise.json ({e})") from None


def true_identities(labels, noise: dict = None) -> np.ndarray:
    """Each sample's true identity by a `noise.json` (int64; -1 for open-set outliers); `labels` where clean."""
    truth = np.array(labels, dtype=np.int64)
    if not noise:
        return truth
    flipped, open_set = noise.get("flipped", []), noise.get("open_set", [])
    index = np.array([e["index"] for e in flipped] + [e["index"] for e in open_set], dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= truth.size):
        raise ArtifactError(f"noise.json: sample index outside [0, {truth.size}); it belongs to another dataset")
    truth[index[:len(flipped)]] = [e["true_label"] for e in flipped]
    truth[index[len(flipped):]] = -1
    return truth


def noise_record(labels, true_labels, flip_rate, open_rate, seed, num_classes: int) -> dict:
    """`noise.json` as `utils/synthetic.py` writes it: a sample is flipped where its true identity is
    another class, open-set where it has none (true label -1)."""
    labels, truth = np.asarray(labels), np.asarray(true_labels)
    flipped = np.flatnonzero((truth >= 0) & (truth != labels))
    return {
        "flipped": [{"index": int(i), "label": int(labels[i]), "true_label": int(truth[i])} for i in flipped],
        "open_set": [{"index": int(i), "label": int(labels[i])} for i in np.flatnonzero(truth < 0)],
        "flip_rate": flip_rate, "open_rate": open_rate, "seed": seed,
        "num_images": int(labels.size), "num_classes": int(num_classes),
    }


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

    def _load(self, key, loader, path):
        if key not in self._cache:
            self._cache[key] = loader(self.cfg, self.fingerprint)
            self.inputs.append(path)
        return self._cache[key]

    @property
    def scores(self) -> dict:
        return self._load("scores", load_scores, paths.scores_path(self.cfg))

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


def open_records(cfg, dataset) -> Records:
    """Records of `dataset` (utils.data.open_dataset(cfg.rec): labels from the record headers alone)."""
    return Records(cfg, dataset.all_labels, dataset.fingerprint, dataset.source_num_classes, inputs=[])


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
