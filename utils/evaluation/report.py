"""The pipeline's results: one row per trained model, as a table (markdown, CSV), JSON and a plot.

`results.json`: {"dataset": {...}, "runs": [{"method", "kept_fraction", "num_images", "num_classes",
"verification": {target: accuracy}, "ijb": {"TAR@FAR=1e-4": ...}, "train_seconds", ...}], "cleaning": {...}}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.artifacts.files import atomic_write_csv, atomic_write_json, atomic_write_text
from utils.evaluation.plots import plot_results
# Row labels and row order (`labels`, {method: title}): the caller's, from the selection registry
# (`utils.selection.registry.method_labels()`): the full-data model first, then the methods in their order.


def accuracy_standard_error(run) -> float:
    """Sampling standard error of `mean_accuracy` from the pairs of each set: sqrt(sum p(1-p)/n) / targets.

    A set of n pairs measured at accuracy p carries about sqrt(p(1-p)/n) of error from which pairs it
    holds (LFW's 6,000 pairs at 99%: 0.13 points; 1,200 pairs at 80%: 1.2 points). NaN when the counts
    are unknown (results of earlier versions)."""
    pairs = run.get("verification_pairs") or {}
    acc = run["verification"]
    if not acc or any(t not in pairs for t in acc):
        return float("nan")
    return float(np.sqrt(sum(p * (1 - p) / pairs[t] for t, p in acc.items())) / len(acc))


def mean_accuracy(run) -> float:
    """Mean verification accuracy of a run over its targets (NaN without any)."""
    v = list(run["verification"].values())
    return float(np.mean(v)) if v else float("nan")


TAR_KEY = "TAR@FAR=1e-4"
COST_NOTE = ("cost: the images a run trained on over the full-data run's; + scoring: with the run that scored the "
             "data (the original model: paid once, shared by every static method, fraction and seed; Rand and the "
             "dynamic methods need none).")


def results_table(results: dict, labels: dict) -> tuple:
    """(header, rows) shaped like the paper's table: method x kept fraction."""
    original = next((r.get("trainee", "") for r in results["runs"] if r["method"] == "full"), "")
    runs = sorted(results["runs"], key=lambda r: (r.get("trainee", "") != original, r.get("trainee", ""),
                                                   -r["requested_fraction"], list(labels).index(r["method"]),
                                                   r.get("score_epochs", 0), r["seed_offset"]))
    targets = sorted({t for r in runs for t in r["verification"]})
    header = ["method", "kept", *targets, "mean", "± SE", TAR_KEY, "images", "classes", "cost", "+ scoring",
              "train s"]
    rows = []
    for r in runs:
        name = labels[r["method"]] + _early(r) + (f" (seed +{r['seed_offset']})" if r["seed_offset"] else "") \
            + (f" [{r['trainee']}]" if r.get("trainee", "") != original else "")
        tar = r["ijb"].get(TAR_KEY)
        rows.append([name, f"{r['kept_fraction']:.1%}", *[f"{100 * r['verification'].get(t, float('nan')):.2f}"
                                                           for t in targets],
                     f"{100 * mean_accuracy(r):.2f}", f"{100 * accuracy_standard_error(r):.2f}",
                     "-" if tar is None else f"{100 * tar:.2f}", str(r["num_images"]),
                     str(r["num_classes"]), _cost(r.get("cost")), _cost(r.get("cost_with_scoring")),
                     f"{r['train_seconds']:.0f}"])
    return header, rows


def _early(run_or_cell) -> str:
    """' (epochs 1-K)' for a method selected from the original run's first K epochs (early scoring)."""
    k = run_or_cell.get("score_epochs")
    return f" (epochs 1-{k})" if k else ""


def _cost(value) -> str:
    """A cost in full-data runs (sample passes over the full-data run's): '0.75', or '-' where unknown."""
    return "-" if value is None else f"{value:.2f}"


# Two-sided 5% critical values of Student's t by degrees of freedom (the paired test over seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_difference(a: dict, b: dict) -> dict:
    """Mean and std of a - b over the seeds both have (seed -> value), and whether it is significant.

    The rule: a two-sided paired t-test over seeds at 5% (|mean| > t_{n-1} * std / sqrt(n)); with fewer
    than two common seeds nothing is significant.
    """
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds])
    if d.size < 2:
        return {"n": int(d.size), "mean": float(d.mean()) if d.size else float("nan"), "std": float("nan"),
                "significant": False}
    std = float(d.std(ddof=1))
    t = _T95.get(d.size - 1, 1.96)
    return {"n": int(d.size), "mean": float(d.mean()), "std": std,
            "significant": bool(abs(d.mean()) > t * std / np.sqrt(d.size))}


def cells(results: dict) -> list:
    """The runs grouped by configuration (method, requested fraction, trainee): per cell the seeds' values."""
    groups = {}
    for r in results["runs"]:
        key = (r["method"], r["requested_fraction"], r.get("trainee", ""), r.get("score_epochs", 0))
        groups.setdefault(key, []).append(r)
    out = []
    for (method, fraction, trainee, early), rs in groups.items():
        acc = {r.get("seed", r["seed_offset"]): mean_accuracy(r) for r in rs}
        tar = {r.get("seed", r["seed_offset"]): r["ijb"][TAR_KEY] for r in rs if TAR_KEY in r["ijb"]}
        costs = {k: [r[k] for r in rs if r.get(k) is not None] for k in ("cost", "cost_with_scoring")}
        out.append({"method": method, "requested_fraction": fraction, "trainee": trainee, "score_epochs": early,
                    "runs": rs,
                    "accuracy": acc, "tar": tar, "kept_fraction": float(np.mean([r["kept_fraction"] for r in rs])),
                    **{k: float(np.mean(v)) if v else None for k, v in costs.items()}})
    return out


def _pm(values: dict) -> str:
    v = np.array(list(values.values()), dtype=float) * 100
    if v.size == 0:
        return "-"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if v.size > 1 else f"{v[0]:.2f}"


def _diff(d: dict) -> str:
    if not d["n"] or np.isnan(d["mean"]):
        return "-"
    return f"{100 * d['mean']:+.2f}" + ("*" if d["significant"] else "")


def seeds_table(results: dict, labels: dict) -> tuple:
    """(header, rows): one row per configuration, mean ± std over seeds, paired differences to full data
    and to Rand at the same fraction (`*`: significant by `paired_difference`'s rule)."""
    cs = cells(results)
    original = next((c["trainee"] for c in cs if c["method"] == "full"), "")
    full = {c["trainee"]: c for c in cs if c["method"] == "full"}
    rand = {(c["requested_fraction"], c["trainee"]): c for c in cs if c["method"] == "rand"}
    cs.sort(key=lambda c: (c["trainee"] != original, c["trainee"], -c["requested_fraction"],
                           list(labels).index(c["method"]), c["score_epochs"]))
    header = ["method", "trained", "kept", "cost", "+ scoring", "seeds", "mean acc", "vs full", "vs Rand", TAR_KEY,
              "TAR vs full"]
    rows = []
    for c in cs:
        f = full.get(c["trainee"])
        rd = rand.get((c["requested_fraction"], c["trainee"]))
        vs_full = paired_difference(c["accuracy"], f["accuracy"]) if f and c is not f else None
        vs_rand = paired_difference(c["accuracy"], rd["accuracy"]) if rd and c is not rd else None
        tar_full = paired_difference(c["tar"], f["tar"]) if f and c is not f and c["tar"] else None
        c["vs_full"], c["vs_rand"], c["tar_vs_full"] = vs_full, vs_rand, tar_full
        rows.append([labels[c["method"]] + _early(c), c["trainee"], f"{c['kept_fraction']:.1%}", _cost(c["cost"]),
                     _cost(c["cost_with_scoring"]), str(len(c["runs"])),
                     _pm(c["accuracy"]), _diff(vs_full) if vs_full else "", _diff(vs_rand) if vs_rand else "",
                     _pm(c["tar"]), _diff(tar_full) if tar_full else ""])
    return header, rows


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(results: dict, labels: dict) -> str:
    if results.get("seeds", 1) > 1 or any(c["trainee"] != results["runs"][0].get("trainee", "")
                                           for c in cells(results)):
        return _markdown_seeds(results, labels)
    header, rows = results_table(results, labels)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    ds = results["dataset"]
    text = (f"Dataset: {ds['rec']} ({ds['num_images']} images, {ds['num_classes']} identities; "
            f"{ds['profile']}). Accuracy in %, verification 10-fold; ± SE: the sampling standard error of the mean "
            f"accuracy from the number of pairs per set; IJB-C TAR at FAR 1e-4 in %. {COST_NOTE}\n\n") + text
    text += _dataset_notes(results)
    if "seed_spread" in results:
        s = results["seed_spread"]
        text += (f"\nSeed spread of the full-data model (mean accuracy over targets): {100 * s['spread']:.2f} points "
                 f"({', '.join(f'{100 * m:.2f}' for m in s['full_mean_accuracy'])}).\n")
    return text


def _markdown_seeds(results: dict, labels: dict) -> str:
    ds = results["dataset"]
    text = (f"Dataset: {ds['rec']} ({ds['num_images']} images, {ds['num_classes']} identities; {ds['profile']}). "
            f"Mean verification accuracy over the targets and IJB-C TAR at FAR 1e-4, in %, mean ± std over "
            f"{results.get('seeds', 1)} seed(s). 'vs full' and 'vs Rand': the mean paired difference over seeds "
            f"(same seed, same fraction); * marks a difference a two-sided paired t-test over seeds finds at 5% "
            f"(|mean| > t(n-1) x std / sqrt(n)); without * the difference is within the seed spread. {COST_NOTE}\n\n")
    text += _md_table(*seeds_table(results, labels))
    return text + _dataset_notes(results)


def _dataset_notes(results: dict) -> str:
    """Cleaning against the injected noise, and the dataset's measured redundancy."""
    text = ""
    if "cleaning" in results:
        c = results["cleaning"]
        text += (f"\nCleaning removed {c['removed']} samples; against the injected noise ({c['noisy']} samples): "
                 f"precision {c['precision']:.3f}, recall {c['recall']:.3f}.\n")
    exp = results.get("export")
    if exp:
        over = f" over {exp['seeds']} seeds" if exp.get("seeds", 1) > 1 else ""
        text += (f"\nExported {exp['kept_set']} ({100 * exp['mean_accuracy']:.2f} mean accuracy{over}) as a dataset: "
                 f"{exp['images']} images of {exp['identities']} identities, {exp['bytes_after'] / 2**20:.1f} MiB "
                 f"instead of {exp['bytes_before'] / 2**20:.1f} MiB ({exp['saving_percent']:.1f}% saved) -> "
                 f"{exp['folder']}\n")
    red = results["dataset"].get("redundancy")
    if red:
        text += (f"\nRedundancy: {red['share']:.1%} of the training images have a near-identical image of their "
                 f"identity (cosine >= {red['threshold']:g} in the original model's embedding space).\n")
    return text


def write_results(out: Path, results: dict, labels: dict):
    """results.json, results.csv, results.md and results.png in `out`; prints the markdown table."""
    atomic_write_json(out / "results.json", results)
    atomic_write_csv(out / "results.csv", *results_table(results, labels))  # every run, one row each
    text = markdown(results, labels)
    atomic_write_text(out / "results.md", text)
    plot_results(results, out / "results.png", labels, TAR_KEY, mean_accuracy)
    print(text)
