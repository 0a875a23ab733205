"""The pipeline's results: one row per trained model, as a table (markdown, CSV), JSON and a plot.

`results.json`: {"dataset": {...}, "runs": [{"method", "kept_fraction", "num_images", "num_classes",
"verification": {target: accuracy}, "ijb": {"TAR@FAR=1e-4": ...}, "train_seconds", ...}], "cleaning": {...}}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.artifacts import atomic_write_csv, atomic_write_json, atomic_write_text
from utils.plots import plot_results
from utils.selection import METHODS

# Row labels and row order: the full-data model first, then the registry's methods in their order.
METHOD_LABELS = {"full": "full data", **{name: m.title for name, m in METHODS.items()},
                 "relabel": "relabelled (cleaning's suggestions)"}


def mean_accuracy(run) -> float:
    """Mean verification accuracy of a run over its targets (NaN without any)."""
    v = list(run["verification"].values())
    return float(np.mean(v)) if v else float("nan")


TAR_KEY = "TAR@FAR=1e-4"


def results_table(results: dict) -> tuple:
    """(header, rows) shaped like the paper's table: method x kept fraction."""
    runs = sorted(results["runs"], key=lambda r: (-r["requested_fraction"], list(METHOD_LABELS).index(r["method"]),
                                                   r["seed_offset"]))
    targets = sorted({t for r in runs for t in r["verification"]})
    header = ["method", "kept", *targets, "mean", TAR_KEY, "images", "classes", "train s"]
    rows = []
    for r in runs:
        name = METHOD_LABELS[r["method"]] + (f" (seed +{r['seed_offset']})" if r["seed_offset"] else "")
        tar = r["ijb"].get(TAR_KEY)
        rows.append([name, f"{r['kept_fraction']:.1%}", *[f"{100 * r['verification'].get(t, float('nan')):.2f}"
                                                           for t in targets],
                     f"{100 * mean_accuracy(r):.2f}", "-" if tar is None else f"{100 * tar:.2f}", str(r["num_images"]),
                     str(r["num_classes"]), f"{r['train_seconds']:.0f}"])
    return header, rows


def markdown(results: dict) -> str:
    header, rows = results_table(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    ds = results["dataset"]
    text = (f"Dataset: {ds['rec']} ({ds['num_images']} images, {ds['num_classes']} identities; "
            f"{ds['profile']}). Accuracy in %, verification 10-fold; IJB-C TAR at FAR 1e-4 in %.\n\n") + text
    if "cleaning" in results:
        c = results["cleaning"]
        text += (f"\nCleaning removed {c['removed']} samples; against the injected noise ({c['noisy']} samples): "
                 f"precision {c['precision']:.3f}, recall {c['recall']:.3f}.\n")
    if "seed_spread" in results:
        s = results["seed_spread"]
        text += (f"\nSeed spread of the full-data model (mean accuracy over targets): {100 * s['spread']:.2f} points "
                 f"({', '.join(f'{100 * m:.2f}' for m in s['fullmean_accuracyuracy'])}).\n")
    return text


def write_results(out: Path, results: dict):
    """results.json, results.csv, results.md and results.png in `out`; prints the markdown table."""
    atomic_write_json(out / "results.json", results)
    atomic_write_csv(out / "results.csv", *results_table(results))
    text = markdown(results)
    atomic_write_text(out / "results.md", text)
    plot_results(results, out / "results.png", METHOD_LABELS, TAR_KEY, mean_accuracy)
    print(text)
