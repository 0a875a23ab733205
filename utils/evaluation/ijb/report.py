"""IJB reports: TAR tables (CSV and text), the 1:N table and the ROC plot."""
import logging

import numpy as np

from utils.artifacts.files import atomic_path, atomic_write_csv
from utils.evaluation.verification import far_label
from utils.evaluation.ijb.meta import FAR_TARGETS

logger = logging.getLogger("utils.evaluation.ijb")

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
    # matplotlib (0.5 s to import) for this figure only: evaluating IJB does not load it
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
