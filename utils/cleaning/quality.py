"""How good a cleaning is: precision / recall of the flagged samples against the injected noise (`noise.json`),
and how much a cleaning round changed the flagged set.
"""
from __future__ import annotations

import numpy as np


def cleaning_quality(flagged: np.ndarray, noise: dict, suggested_label=None, outlier=None) -> dict:
    """Precision / recall of the flagged sample indices against the injected noise (noise.json).

    With the rule's `suggested_label` and `outlier` (per flagged sample), also separately: `mislabeled`
    (the flagged samples with a suggestion, against the flips: precision, recall, and relabel accuracy, the
    share of the flips caught whose suggestion is their true identity) and `outliers` (the flagged samples
    without one, against the open-set images)."""
    flips = {int(e["index"]): int(e["true_label"]) for e in noise.get("flipped", [])}
    opens = {int(e["index"]) for e in noise.get("open_set", [])}
    noisy = set(flips) | opens
    flagged = np.asarray(flagged, dtype=np.int64)
    flagged_set = set(flagged.tolist())
    hit = len(flagged_set & noisy)
    out = {"removed": len(flagged_set), "noisy": len(noisy), "true_positives": hit,
           "precision": hit / len(flagged_set) if flagged_set else 0.0,
           "recall": hit / len(noisy) if noisy else 1.0,
           "recall_flipped": len(flagged_set & set(flips)) / len(flips) if flips else None,
           "recall_open_set": len(flagged_set & opens) / len(opens) if opens else None}
    if suggested_label is None and outlier is None:
        return out
    is_outlier = np.zeros(flagged.size, bool) if outlier is None else np.asarray(outlier, bool)
    suggested = np.full(flagged.size, -1) if suggested_label is None else np.asarray(suggested_label)
    mis = {int(i): int(s) for i, s in zip(flagged[~is_outlier], suggested[~is_outlier])}
    caught = [i for i in mis if i in flips]
    right = sum(mis[i] == flips[i] for i in caught)
    out["mislabeled"] = {"flagged": len(mis), "flipped": len(flips), "true_positives": len(caught),
                         "precision": len(caught) / len(mis) if mis else None,
                         "recall": len(caught) / len(flips) if flips else None,
                         "relabel_correct": right, "relabel_accuracy": right / len(caught) if caught else None}
    outs = set(flagged[is_outlier].tolist())
    out["outliers"] = {"flagged": len(outs), "open_set": len(opens), "true_positives": len(outs & opens),
                       "precision": len(outs & opens) / len(outs) if outs else None,
                       "recall": len(outs & opens) / len(opens) if opens else None}
    return out


def flag_change(previous, current) -> float:
    """How much a round changed the flagged set: |previous xor current| / |previous| (|current| if none before)."""
    previous, current = np.asarray(previous), np.asarray(current)
    changed = np.setxor1d(previous, current).size
    return changed / max(previous.size, 1) if previous.size else float(current.size > 0)
