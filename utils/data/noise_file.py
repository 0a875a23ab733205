"""The `noise.json` format, in one place: reading it, building it, and the true identity it gives each sample.

A dataset with injected noise (the synthetic generator's, or make_noisy_dataset.py's) holds `noise.json`:
`flipped` (index, label, true_label), `open_set` (index, label: an image of no identity of the set),
`flip_rate`, `open_rate`, `seed`, `num_images`, `num_classes`. Cleaning is measured against it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from utils.artifacts.files import ArtifactError

NOISE_FILE = "noise.json"


def load_noise(rec) -> dict:
    """The dataset's `noise.json` (injected label flips and open-set outliers), or None without one."""
    path = Path(rec) / NOISE_FILE
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
    """`noise.json` as `utils/synthetic/generator.py` writes it: a sample is flipped where its true identity is
    another class, open-set where it has none (true label -1)."""
    labels, truth = np.asarray(labels), np.asarray(true_labels)
    flipped = np.flatnonzero((truth >= 0) & (truth != labels))
    return {
        "flipped": [{"index": int(i), "label": int(labels[i]), "true_label": int(truth[i])} for i in flipped],
        "open_set": [{"index": int(i), "label": int(labels[i])} for i in np.flatnonzero(truth < 0)],
        "flip_rate": flip_rate, "open_rate": open_rate, "seed": seed,
        "num_images": int(labels.size), "num_classes": int(num_classes),
    }


def noisy_mask(noise: dict, n: int) -> np.ndarray:
    """(n,) bool: the samples noise.json lists as flipped or open-set."""
    index = [int(e["index"]) for e in noise.get("flipped", []) + noise.get("open_set", [])]
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(index, dtype=np.int64)] = True
    return mask
