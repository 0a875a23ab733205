"""Inject label noise into a copy of a dataset, with its ground truth in `noise.json`.

`make_noisy_dataset.py --rec SRC --out DST [--flip_rate R] [--open_rate R] [--open_from OTHER] [--seed S]`
writes DST in the layout `utils/data/export.py` writes (InsightFace RecordIO, payloads copied byte for byte,
all or nothing), with

- closed-set flips: `round(flip_rate * N)` images get the label of another identity of SRC, drawn
  uniformly among the other identities; the image moves to that identity's block (images stay
  contiguous per identity) and `origin_index.npy` says where each image came from;
- open-set outliers: `round(open_rate * N)` images keep their label but their image is replaced by
  one of OTHER (a dataset of identities SRC does not contain, with the same image size);
- `noise.json` in the format `utils/synthetic/generator.py` writes (`flipped`: index, label, true_label;
  `open_set`: index, label; flip_rate, open_rate, seed, num_images, num_classes), so cleaning
  reports precision and recall on DST as on the synthetic data;
- `noise_injection.json` (source, OTHER, their fingerprints, counts), the `.bin` files and `ijb/`.

Only samples that are clean in SRC are drawn (SRC's own `noise.json` entries carry over, remapped, so
`noise.json` describes all the noise DST holds), and an identity's first image is never drawn, so no
identity is left without images. The same arguments and seed give byte-identical files. Flips go to
a uniformly drawn identity; a "similar identity" target is not offered, since without a model any
similarity between identities would be a guess.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from utils.artifacts.files import ArtifactError, atomic_save_npy, atomic_write_json
from utils.data.writer import (ORIGIN_INDEX, carry_files, check_destination, link_or_copy,
                                  staged_folder, write_recordio)
from utils.data.recordio import read_layout, read_record_at, unpack, unpack_img
from utils.data.noise_file import NOISE_FILE, load_noise, noise_record, true_identities

INJECTION_FILE = "noise_injection.json"


# ---------------------------------------------------------------------------------- noise.json format
# ---------------------------------------------------------------------------------------- injection
def check_rates(flip_rate: float, open_rate: float, open_from=None):
    """Raise ValueError (worded for the command line) unless the rates make sense together."""
    for flag, rate in (("--flip_rate", flip_rate), ("--open_rate", open_rate)):
        if not 0 <= rate <= 1:  # also refuses NaN
            raise ValueError(f"{flag} {rate} must lie in [0, 1]")
    if flip_rate + open_rate > 1:
        raise ValueError(f"--flip_rate + --open_rate = {flip_rate + open_rate:g} must not exceed 1")
    if open_rate > 0 and not open_from:
        raise ValueError("--open_rate > 0 needs --open_from OTHER_DIR, a RecordIO dataset of other identities")


def _recordio_layout(path, flag: str):
    path = Path(path)
    if not (path / "train.rec").is_file():
        raise ArtifactError(f"{flag} {path}: no train.rec there; noise injection needs a RecordIO dataset folder")
    return read_layout(path)


def _image_size(layout) -> tuple:
    """(height, width) from `property`, else of the first image."""
    if layout.image_size is not None:
        return tuple(layout.image_size)
    with open(layout.rec_path, "rb") as f:
        record, _ = read_record_at(f, int(layout.image_offsets[0]), layout.rec_path.stat().st_size, layout.rec_path,
                                 int(layout.image_keys[0]))
    return unpack_img(record)[1].shape[:2]


def _open_set_source(layout, open_from):
    other = _recordio_layout(open_from, "--open_from")
    if other.fingerprint == layout.fingerprint:
        raise ArtifactError(f"--open_from {open_from} is the training set itself; open-set images must show "
                            f"identities the training set does not contain")
    want, found = _image_size(layout), _image_size(other)
    if want != found:
        raise ArtifactError(f"--open_from {open_from}: images are {found[0]}x{found[1]} but the training set's are "
                            f"{want[0]}x{want[1]} (property); open-set images must have the training set's size")
    return other


def inject_noise(src, dst, flip_rate: float = 0.0, open_rate: float = 0.0, open_from=None, seed: int = 0,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Write the noisy copy of dataset `src` as `dst` (see the module docstring); returns a summary."""
    check_rates(flip_rate, open_rate, open_from)
    t0 = time.time()
    src = Path(src)
    dst = check_destination(src, dst, overwrite, overwrite_flag="--overwrite")
    layout = _recordio_layout(src, "--rec")
    other = _open_set_source(layout, open_from) if open_rate > 0 else None
    labels, num_classes, n = layout.labels, layout.num_classes, layout.num_images
    present = np.unique(labels)
    if present.size != num_classes:
        raise ArtifactError(f"{src}: {num_classes - present.size} of its {num_classes} labels have no image; "
                            f"export it first (export_trainset.py renumbers the labels)")


    truth = true_identities(labels, load_noise(src))
    source_noise_kept = int(np.count_nonzero(truth != labels))
    first_of_identity = np.zeros(n, bool)
    first_of_identity[np.unique(labels, return_index=True)[1]] = True
    pool = np.flatnonzero((truth == labels) & ~first_of_identity)
    n_flip, n_open = int(round(flip_rate * n)), int(round(open_rate * n))
    if n_flip + n_open > pool.size:
        raise ArtifactError(f"--flip_rate and --open_rate ask for {n_flip + n_open} noisy images but only {pool.size} "
                            f"of {n} are clean and not an identity's first image")
    if n_flip and num_classes < 2:
        raise ArtifactError(f"{src} has one identity: there is no other label to flip to")

    rng = np.random.default_rng(seed)
    drawn = rng.permutation(pool)[:n_flip + n_open]
    flipped, opened = np.sort(drawn[:n_flip]), np.sort(drawn[n_flip:])
    assigned = labels.copy()
    assigned[flipped] = (labels[flipped] + rng.integers(1, num_classes, n_flip)) % num_classes  # any other label
    truth[opened] = -1
    origin_index = np.argsort(assigned, kind="stable")
    new_index = np.empty(n, dtype=np.int64)
    new_index[origin_index] = np.arange(n)
    replaced_at = new_index[opened]
    picks = rng.choice(other.num_images, n_open, replace=other.num_images < n_open) if n_open else np.zeros(0, int)
    by_position = np.argsort(replaced_at)
    replaced_at, picks = replaced_at[by_position], picks[by_position]

    try:
        with staged_folder(dst) as tmp:
            with _image_fetcher(other) as fetch_image:
                write_recordio(layout, tmp, origin_index, assigned[origin_index], num_classes,
                               replace=(replaced_at, lambda k: fetch_image(int(picks[k]))), progress=progress,
                               desc="noise")
            if (src / "property").is_file():
                link_or_copy(src / "property", tmp / "property")  # same classes and image size
            carried = carry_files(src, tmp)
            atomic_save_npy(tmp / ORIGIN_INDEX, origin_index)
            atomic_write_json(tmp / NOISE_FILE, noise_record(assigned[origin_index], truth[origin_index],
                                                             float(flip_rate), float(open_rate), int(seed),
                                                             num_classes))
            atomic_write_json(tmp / INJECTION_FILE, {
                "source": os.path.abspath(src), "source_fingerprint": layout.fingerprint,
                "open_from": os.path.abspath(open_from) if other is not None else None,
                "open_from_fingerprint": other.fingerprint if other is not None else None,
                "flip_rate": float(flip_rate), "open_rate": float(open_rate), "seed": int(seed), "flip_to": "uniform",
                "flipped": n_flip, "open_set": n_open, "source_noise_kept": source_noise_kept, "carried": carried})
    except OSError as exc:
        raise ArtifactError(f"writing {dst} failed: {exc.strerror or exc} ({exc.filename})") from None
    return {"out": str(dst), "images": n, "identities": num_classes, "flipped": n_flip, "open_set": n_open,
            "source_noise_kept": source_noise_kept, "carried": carried, "seconds": time.time() - t0}


@contextlib.contextmanager
def _image_fetcher(layout):
    """Yield `fetch(i)`: the image bytes (after the IRHeader) of sample i of `layout`; None for no layout."""
    if layout is None:
        yield None
        return
    with open(layout.rec_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size

        def fetch(i):
            record, _ = read_record_at(f, int(layout.image_offsets[i]), size, layout.rec_path, int(layout.image_keys[i]))
            return unpack(record)[1]
        yield fetch


# ------------------------------------------------------------------------------ make_noisy_dataset.py
