"""A contact sheet of a cleaning: the most confident flagged samples, each beside an image of its labelled
identity and one of the identity the rule suggests, so a person can audit the cleaning at a glance.

Headless: matplotlib's object API on the Agg canvas, never pyplot; written atomically.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.artifacts.files import atomic_path
from utils.data.datasets import BadImageError

__all__ = ["identity_examples", "contact_sheet", "save_figure"]


def identity_examples(labels, avoid, no_image=()) -> dict:
    """identity -> one sample index to show it by: its first sample not in `avoid` (the flagged ones), else its
    first sample; never one of `no_image` (samples known to have no decodable image: an identity that has only
    those has no example). One pass over the labels, no loop over identities."""
    labels = np.asarray(labels, dtype=np.int64)
    avoid_mask = np.zeros(labels.size, bool)
    avoid_mask[np.asarray(avoid, dtype=np.int64)] = True
    order = np.lexsort((np.arange(labels.size), avoid_mask, labels))  # per identity: unflagged first, index order
    shown = np.ones(labels.size, bool)
    shown[np.asarray(no_image, dtype=np.int64)] = False
    order = order[shown[order]]
    if order.size == 0:
        return {}
    first = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1]])
    return dict(zip(labels[order][first].tolist(), order[first].tolist()))


def contact_sheet(dataset, mislabeled, outliers, rows: int = 10, title: str = "", no_image=()) -> Figure:
    """A Figure of up to `rows` mislabeled samples (most confident first; left) and `rows` outliers (least
    claimed first; right), from `utils.cleaning.lists.flag_lists`' arrays. Per flagged sample three images: the
    sample; an image of its labelled identity; one of the suggested identity (outliers: none). `dataset` gives
    `all_labels` and `load_image(sample_index)` (uint8 H x W x 3 RGB). No identity is shown by a sample of
    `no_image` (the scores' unscored ones); another image that cannot be decoded is an empty cell when the
    dataset skips bad images (`--skip_bad_images true`), else the BadImageError that names it."""
    labels = dataset.all_labels
    example = identity_examples(labels, np.concatenate([mislabeled["index"], outliers["index"]]), no_image)
    blocks = [[(int(r["index"]), int(r["label"]), int(r["suggested_label"]), f"p={r['confidence']:.2f}")
               for r in mislabeled[:rows]],
              [(int(r["index"]), int(r["label"]), -1, f"max p={r['score']:.2f}") for r in outliers[:rows]]]
    height = max(len(b) for b in blocks)
    fig = Figure(figsize=(11.0, 1.5 * max(height, 1) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    fig.suptitle(title or "most confident flagged samples", fontsize=10)
    if height == 0:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no sample flagged", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    axes = fig.subplots(height, 6, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for b, block in enumerate(blocks):
        for (index, label, suggested, conf), row in zip(block, axes[:, 3 * b:3 * b + 3]):
            cells = [(index, f"#{index} {'mislabeled' if b == 0 else 'outlier'} {conf}"),
                     (example.get(label), f"labelled: id {label}"),
                     (example.get(suggested) if suggested >= 0 else None,
                      f"suggested: id {suggested}" if suggested >= 0 else "no identity claims it")]
            for ax, (sample, caption) in zip(row, cells):
                ax.set_axis_on()
                if sample is not None:
                    try:
                        ax.imshow(dataset.load_image(int(sample)))
                    except BadImageError:
                        if not dataset.skip_bad_images:
                            raise
                        caption += " (no image)"
                ax.set_title(caption, fontsize=7)
                ax.set_xticks([])
                ax.set_yticks([])
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return fig


def save_figure(fig: Figure, path) -> Path:
    """PNG, written atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
