"""The lists a cleaning writes: the mislabeled samples (with their suggested label) and the outliers, as
structured arrays (`flag_lists`) and as `mislabeled` / `outliers` `.npy` and `.csv` files (`write_flag_lists`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.artifacts.files import atomic_write_csv, save_array
from utils.artifacts.records import sample_names
from utils.cleaning.flags import Flags


MISLABELED_DTYPE = np.dtype([("index", "<i8"), ("label", "<i8"), ("suggested_label", "<i8"), ("confidence", "<f8")])
OUTLIER_DTYPE = np.dtype([("index", "<i8"), ("label", "<i8"), ("score", "<f8")])


def flag_lists(flags: Flags, labels) -> tuple:
    """(mislabeled, outliers) as structured arrays: mislabeled [index, label, suggested_label, confidence]
    by descending confidence; outliers [index, label, score] (score: the largest class probability, low = no
    identity claims it) by ascending score. Ties keep index order."""
    labels = np.asarray(labels)
    conf = np.full(flags.index.size, np.nan) if flags.confidence is None else np.asarray(flags.confidence, float)
    suggested = np.full(flags.index.size, -1) if flags.suggested_label is None else flags.suggested_label
    m, o = ~flags.outlier, flags.outlier
    mislabeled = np.empty(int(m.sum()), MISLABELED_DTYPE)
    mislabeled["index"], mislabeled["label"] = flags.index[m], labels[flags.index[m]]
    mislabeled["suggested_label"], mislabeled["confidence"] = suggested[m], conf[m]
    outliers = np.empty(int(o.sum()), OUTLIER_DTYPE)
    outliers["index"], outliers["label"], outliers["score"] = flags.index[o], labels[flags.index[o]], conf[o]
    mislabeled = mislabeled[np.argsort(-np.nan_to_num(mislabeled["confidence"], nan=-1.0), kind="stable")]
    outliers = outliers[np.argsort(np.nan_to_num(outliers["score"], nan=2.0), kind="stable")]
    return mislabeled, outliers


def write_flag_lists(folder, mislabeled, outliers, dataset, stage: str, cfg, inputs) -> list:
    """`mislabeled.npy/.csv` and `outliers.npy/.csv` in `folder` (see `flag_lists`); the CSVs add the file name
    (image folders) or record key (RecordIO) of each sample. Returns the paths written."""
    column, names = sample_names(dataset)
    written = []
    for name, rows in (("mislabeled", mislabeled), ("outliers", outliers)):
        path = Path(folder) / f"{name}.npy"
        save_array(path, rows, stage, dataset.fingerprint, cfg, inputs,
                   {"rule": cfg.clean_rule, "count": int(rows.size), "columns": list(rows.dtype.names)})
        header = list(rows.dtype.names) + ([column] if column else [])
        table = [[int(r[k]) if rows.dtype[k].kind == "i" else f"{r[k]:.6g}" for k in rows.dtype.names]
                 + ([names[int(r["index"])]] if column else []) for r in rows]
        atomic_write_csv(path.with_suffix(".csv"), header, table)
        written += [path, path.with_suffix(".csv")]
    return written
