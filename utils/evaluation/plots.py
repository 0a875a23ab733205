"""Figures: what a pruning method kept (per identity and along its score), and the pipeline's results.

The figures are headless. They use matplotlib's object API with the Agg canvas and never pyplot, so
importing this module changes no global backend. The files are written atomically: a temporary file in
the same folder, then ``os.replace``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.artifacts.files import atomic_path

__all__ = ["plot_selection", "plot_results"]


def plot_selection(path, scores, labels, kept, title: str = "", score_name: str = "score") -> Path:
    """Writes a two-panel PNG of one selection and returns its path.

    Left: the histogram of images per identity, before (all samples) and after (kept samples). The
    identities that lost every sample are counted in the title. Right: the distribution of ``scores``
    over all samples, with the kept samples overlaid. NaN scores are left out and counted in the
    legend. ``scores`` may be None (Rand has none), and the right panel then says so. ``kept`` holds
    sample indices into ``labels`` and ``scores``.
    """
    path = Path(path)
    labels = np.asarray(labels).astype(np.int64, copy=False)
    kept = np.unique(np.asarray(kept, dtype=np.int64))
    if kept.size and (kept[0] < 0 or kept[-1] >= labels.size):
        raise ValueError(f"kept holds sample indices outside [0, {labels.size})")

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax_id, ax_sc = fig.subplots(1, 2)

    ids, n_all = np.unique(labels, return_counts=True)
    n_kept = np.zeros(ids.size, dtype=np.int64)
    if kept.size:
        kid, kc = np.unique(labels[kept], return_counts=True)
        n_kept[np.searchsorted(ids, kid)] = kc
    top = max(int(n_all.max()), 1)
    bins = np.unique(np.round(np.geomspace(1, top + 1, 40))) - 0.5 if top > 40 else np.arange(0, top + 2) - 0.5
    ax_id.hist(n_all, bins=bins, alpha=0.5, label=f"all ({labels.size:,} images)", color="tab:gray")
    ax_id.hist(n_kept[n_kept > 0], bins=bins, alpha=0.7, label=f"kept ({kept.size:,} images)", color="tab:blue")
    if top > 40:
        ax_id.set_xscale("log")
    ax_id.set_xlabel("images per identity")
    ax_id.set_ylabel("identities")
    vanished = int((n_kept == 0).sum())
    ax_id.set_title(f"{ids.size - vanished:,} of {ids.size:,} identities kept ({vanished:,} vanish)")
    ax_id.legend(fontsize=8)

    if scores is None:
        ax_sc.text(0.5, 0.5, "no score (random selection)", ha="center", va="center", transform=ax_sc.transAxes)
        ax_sc.set_axis_off()
    else:
        sc = np.asarray(scores, dtype=np.float64)
        if sc.shape != labels.shape:
            raise ValueError(f"scores has shape {sc.shape}, labels {labels.shape}: one score per sample expected")
        finite = np.isfinite(sc)
        mask = np.zeros(sc.size, dtype=bool)
        mask[kept] = True
        all_v, kept_v = sc[finite], sc[finite & mask]
        if all_v.size:
            lo, hi = float(all_v.min()), float(all_v.max())
            edges = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
            n_nan = int((~finite).sum())
            ax_sc.hist(all_v, bins=edges, alpha=0.5, color="tab:gray",
                       label="all" + (f" ({n_nan:,} NaN left out)" if n_nan else ""))
            ax_sc.hist(kept_v, bins=edges, alpha=0.7, color="tab:blue", label="kept")
            ax_sc.legend(fontsize=8)
        ax_sc.set_xlabel(score_name)
        ax_sc.set_ylabel("samples")
        ax_sc.set_title(f"{score_name}: kept vs all")
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_results(results: dict, path: Path, method_titles: dict, tar_key: str, mean_accuracy):
    """run_pipeline.py's figure: accuracy (and IJB TAR) against the kept fraction, one line per method,
    the full-data model as a dashed line with its seed spread shaded."""
    has_tar = any(tar_key in r["ijb"] for r in results["runs"])
    fig = Figure(figsize=(11 if has_tar else 6, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_tar else 1, squeeze=False)
    panels = [("mean verification accuracy (%)", lambda r: 100 * mean_accuracy(r))]
    if has_tar:
        panels.append((f"IJB-C {tar_key} (%)", lambda r: 100 * r["ijb"].get(tar_key, float("nan"))))
    runs = [r for r in results["runs"] if not r.get("trainee") or r.get("trainee") == _original(results)]
    full = [r for r in runs if r["method"] == "full"]
    for ax, (label, value) in zip(axes[0], panels):
        for method in method_titles:
            if method == "full":
                continue
            cells = {}  # requested fraction -> the runs of its seeds
            for r in runs:
                if r["method"] == method:
                    cells.setdefault(r["requested_fraction"], []).append(r)
            if not cells:
                continue
            pts = sorted((np.mean([r["kept_fraction"] for r in rs]), np.mean([value(r) for r in rs]),
                          np.std([value(r) for r in rs], ddof=1) if len(rs) > 1 else 0.0) for rs in cells.values())
            x, y, err = (np.array(v) for v in zip(*pts))
            if err.any():  # several seeds: the mean with +- one standard deviation
                ax.errorbar(100 * x, y, yerr=err, fmt="o-", capsize=3, label=method_titles[method])
            else:
                ax.plot(100 * x, y, "o-", label=method_titles[method])
        if full:
            vals = [value(r) for r in full]
            ax.axhline(np.mean(vals), color="k", ls="--", lw=1, label="full data")
            if len(vals) > 1:
                ax.axhspan(min(vals), max(vals), color="k", alpha=0.08, label="full data, seed spread")
        ax.set_xlabel("kept fraction of the training images (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ds = results["dataset"]
    fig.suptitle(f"Pruning {ds.get('name', Path(ds['rec']).name)} ({ds['num_images']} images, "
                 f"{ds['num_classes']} identities): accuracy against kept fraction")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _original(results: dict) -> str:
    """`<network>_<loss>` the full-data model was trained with (the trainee of the plain rows)."""
    return next((r.get("trainee") for r in results["runs"] if r["method"] == "full" and not r.get("seed_offset")), "")
