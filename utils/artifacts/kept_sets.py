"""The files every kept set is written as, by cleaning and by every selection method.

    <folder>/kept_index.npy (+ manifest)   sorted unique int64 sample indices (text form on request)
    <folder>/label_map.json                old identity label -> contiguous new label, for retraining
    <folder>/summary.json                  counts, per-identity figures and the method's facts
    <folder>/plot.png                      selections only: the score by identity, kept vs dropped
    <folder>/ranking.npy (+ manifest), ranking.csv   selections only: every sample's score and rank, kept
                                           first (utils/selection/ranking.py), written before the kept list
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from utils.arrays import format_summary, label_map_for, selection_summary, unscored_line
from utils.artifacts.files import Fingerprint, atomic_write_json, save_kept_index, save_label_map
from utils.evaluation.plots import plot_selection
from utils.selection.ranking import ranking_table, write_ranking
from utils.artifacts.records import sample_names

log = logging.getLogger("diffprob")


def write_kept_set(folder: Path, stage: str, kept, labels, fingerprint: Fingerprint, cfg, inputs, summary: dict):
    """kept_index.npy + label_map.json + summary.json in `folder`; returns the label map."""
    label_map = label_map_for(kept, labels)
    save_kept_index(folder / "kept_index.npy", kept, stage, fingerprint, cfg, inputs, summary,
                    text=cfg.write_text_kept_index)
    save_label_map(folder / "label_map.json", label_map, stage, fingerprint, cfg, [folder / "kept_index.npy"])
    atomic_write_json(folder / "summary.json", summary)
    return label_map


def write_selection(cfg, folder: Path, method, selection, rec) -> dict:
    """A selection's ranking, kept set, summary and plot (see the module docstring), its warnings and summary
    line printed; returns the summary. The ranking comes first: the kept list's manifest, written last of
    the kept set, is what marks the folder complete."""
    for warning in selection.warnings:
        log.warning("%s", warning)
        print(f"warning: {warning}")
    if selection.info.get("unscored"):
        print(unscored_line(selection.info["unscored"]))
    labels = rec.labels
    summary = selection_summary(selection.kept, labels, len(labels))
    summary.update(selection.info)
    summary["method"] = method.name
    summary["identities_vanished"] = int(len(np.unique(labels)) - len(np.unique(labels[selection.kept])))
    score = selection.scores if selection.scores is not None else selection.sort_key
    table = ranking_table(labels, selection.kept, selection.rank, score)
    write_ranking(folder, table, method.name, rec.fingerprint, cfg, rec.inputs, keys=sample_names(rec.dataset),
                  info={"method": method.name, "kept": int(selection.kept.size), "nested": selection.nested,
                        "score": method.score_name or ("random sort key" if selection.sort_key is not None else None),
                        "coreset_order": cfg.coreset_order, "min_samples_per_id": cfg.min_samples_per_id})
    write_kept_set(folder, method.name, selection.kept, labels, rec.fingerprint, cfg, rec.inputs, summary)
    plot_selection(folder / "plot.png", selection.scores, labels, selection.kept,
                   title=f"{method.title} ({folder.name})", score_name=method.score_name or "score")
    log.info("%s: %s -> %s", method.name, format_summary(summary), folder)
    print(f"{method.name}: {format_summary(summary)}")
    return summary
