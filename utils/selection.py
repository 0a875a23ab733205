"""The pruning and cleaning stages: read scores, select, write the kept list, label map, plot and summary.

Every method ends in `write_selection`, so every kept list has the same files beside it:
    coresets/<method>_<fraction>/kept_index.npy (+ manifest), label_map.json, plot.png, summary.json
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from config.config import Config
from utils import paths, pruning
from utils.artifacts import (ArtifactError, Fingerprint, atomic_write_json, load_array, load_kept_index,
                             save_array, save_kept_index, save_label_map)
from utils.scoring import load_scores

log = logging.getLogger("diffprob")


def dataset_labels(cfg: Config):
    """(labels per sample, fingerprint, num_classes) from the record headers alone (no decoding)."""
    from utils.data import open_dataset

    ds = open_dataset(cfg.rec)
    return ds.all_labels, ds.fingerprint, ds.source_num_classes


def write_selection(cfg: Config, method: str, kept, labels, fingerprint: Fingerprint, inputs, scores=None,
                    score_name="score", info=None) -> dict:
    """kept list + label map + summary + plot of one selection; returns the summary."""
    from utils.plots import plot_selection

    out = paths.coreset_dir(cfg, method)
    label_map = pruning.label_map_for(kept, labels)
    summary = pruning.selection_summary(kept, labels, len(labels))
    summary.update(info or {})
    summary["method"] = method
    summary["identities_vanished"] = int(len(np.unique(labels)) - len(label_map))
    kept = save_kept_index(out / "kept_index.npy", kept, method, fingerprint, cfg, inputs, summary,
                           text=cfg.write_text_kept_index)
    save_label_map(out / "label_map.json", label_map, method, fingerprint, cfg, [out / "kept_index.npy"])
    atomic_write_json(out / "summary.json", summary)
    plot_selection(out / "plot.png", scores, labels, kept, title=f"{method} ({paths.coreset_tag(cfg, method)})",
                   score_name=score_name)
    log.info("%s: %s -> %s", method, pruning.format_summary(summary), out)
    print(f"{method}: {pruning.format_summary(summary)}")
    return summary


def _excluded_by_cleaning(cfg: Config, fingerprint: Fingerprint, num_images: int):
    path = paths.clean_dir(cfg) / "kept_index.npy"
    if not path.exists():
        raise ArtifactError(f"missing {path}: run clean_trainset.py first (diffprob_clean prunes the cleaned set)")
    kept = load_kept_index(path, fingerprint)
    excluded = np.ones(num_images, dtype=bool)
    excluded[kept] = False
    return excluded, path


# ------------------------------------------------------------------------------------------- stages
def run_diffprob(cfg: Config, ctx=None) -> dict:
    method = "diffprob_clean" if cfg.coreset_method == "diffprob_clean" else "diffprob"
    labels, fp, _ = dataset_labels(cfg)
    scores = load_scores(cfg, fp)
    prob = scores["gt_prob_with_margin"]
    inputs = [paths.scores_path(cfg)]
    excluded = None
    if method == "diffprob_clean":
        excluded, clean_path = _excluded_by_cleaning(cfg, fp, len(labels))
        inputs.append(clean_path)
    t0 = time.time()
    if cfg.threshold is not None:
        threshold = float(cfg.threshold)
    else:
        threshold = pruning.diffprob_threshold_for_fraction(prob, labels, cfg.fraction, cfg.min_samples_per_id,
                                                            excluded=excluded)
    kept = pruning.diffprob(prob, labels, threshold, cfg.min_samples_per_id, excluded=excluded)
    info = {"threshold": threshold, "requested_fraction": None if cfg.threshold is not None else cfg.fraction,
            "seconds": time.time() - t0}
    achieved = len(kept) / len(labels)
    if cfg.threshold is None and abs(achieved - cfg.fraction) > 0.02:
        # DiffProb's relaxation keeps at least min_samples_per_id per identity and, when an identity's
        # probabilities are bunched (a model that has not fitted its training data), nearly all of them.
        log.warning("DiffProb cannot keep %.3f of these images: the closest is %.3f. The scores leave no room "
                    "(under-fitted original model, or min_samples_per_id=%d is large for these identities)",
                    cfg.fraction, achieved, cfg.min_samples_per_id)
        print(f"warning: asked for {cfg.fraction:.3f}, the closest DiffProb selection keeps {achieved:.3f}")
    print(f"{method}: threshold {threshold:.6g} keeps {len(kept) / len(labels):.4f} of the images"
          + ("" if cfg.threshold is not None else f" (asked {cfg.fraction:.4f})"))
    return write_selection(cfg, method, kept, labels, fp, inputs, prob, "p(label) with margin", info)


def run_dynunc(cfg: Config, ctx=None) -> dict:
    labels, fp, _ = dataset_labels(cfg)
    path = paths.prob_history_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing {path}: train the original model with --is_original_train true")
    history = load_array(path, fp)
    if history.ndim != 2 or history.shape[1] != len(labels):
        raise ArtifactError(f"{path}: expected shape (epochs, {len(labels)}), found {history.shape}")
    t0 = time.time()
    scores = pruning.dynunc_scores(history, cfg.window)
    ranked = scores if cfg.coreset_order == "descending" else -scores
    kept = pruning.keep_top_per_identity(ranked, labels, cfg.fraction, cfg.min_samples_per_id)
    return write_selection(cfg, "dynunc", kept, labels, fp, [path], scores, "DynUnc uncertainty",
                           {"window": cfg.window, "epochs": int(history.shape[0]), "seconds": time.time() - t0})


def run_rand(cfg: Config, ctx=None) -> dict:
    labels, fp, _ = dataset_labels(cfg)
    t0 = time.time()
    kept = pruning.random_keep(labels, cfg.fraction, cfg.min_samples_per_id, seed=cfg.seed)
    return write_selection(cfg, "rand", kept, labels, fp, [cfg.rec], None, info={"seed": cfg.seed,
                                                                                  "seconds": time.time() - t0})


def run_entropy(cfg: Config, ctx=None) -> dict:
    labels, fp, num_classes = dataset_labels(cfg)
    path = paths.topk_history_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing {path}: train the original model with --is_original_train true "
                            f"--record_topk K (K > 0)")
    rec = load_array(path, fp)
    t0 = time.time()
    entropy = pruning.soft_label_entropy(rec["topk_logits"].astype(np.float32), rec["topk_index"],
                                         rec["rest_mean_logit"].astype(np.float32), num_classes)
    ranked = entropy if cfg.coreset_order == "descending" else -entropy
    kept = pruning.keep_top_per_identity(ranked, labels, cfg.fraction, cfg.min_samples_per_id)
    return write_selection(cfg, "entropy", kept, labels, fp, [path], entropy, "soft-label entropy",
                           {"topk": int(rec["topk_logits"].shape[-1]), "seconds": time.time() - t0})


def load_noise(rec) -> dict:
    path = Path(rec) / "noise.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def cleaning_quality(flagged: np.ndarray, noise: dict) -> dict:
    """Precision / recall of the flagged sample indices against the injected noise."""
    flips = {int(e["index"]) for e in noise.get("flipped", [])}
    opens = {int(e["index"]) for e in noise.get("open_set", [])}
    noisy = flips | opens
    flagged_set = set(map(int, flagged))
    hit = len(flagged_set & noisy)
    return {"removed": len(flagged_set), "noisy": len(noisy), "true_positives": hit,
            "precision": hit / len(flagged_set) if flagged_set else 0.0,
            "recall": hit / len(noisy) if noisy else 1.0,
            "recall_flipped": len(flagged_set & flips) / len(flips) if flips else None,
            "recall_open_set": len(flagged_set & opens) / len(opens) if opens else None}


def run_clean(cfg: Config, ctx=None) -> dict:
    """Remove samples whose margin-free arg-max class differs from their label."""
    labels, fp, num_classes = dataset_labels(cfg)
    scores = load_scores(cfg, fp)
    pred = scores["pred"]
    flagged_mask = pred != labels
    flagged = np.flatnonzero(flagged_mask).astype(np.int64)
    kept = np.flatnonzero(~flagged_mask).astype(np.int64)
    if kept.size == 0:
        raise ArtifactError("cleaning would remove every sample: the scoring model predicts no label right")
    label_map = pruning.label_map_for(kept, labels)
    present = np.unique(labels)
    vanished = np.setdiff1d(present, np.array(sorted(label_map), dtype=np.int64))
    out = paths.clean_dir(cfg)
    inputs = [paths.scores_path(cfg)]
    info = {"removed": int(flagged.size), "kept": int(kept.size), "kept_fraction": kept.size / len(labels),
            "identities_vanished": int(vanished.size), "vanished": vanished.tolist()[:1000]}
    noise = load_noise(cfg.rec)
    if noise is not None:
        info["quality"] = cleaning_quality(flagged, noise)
    save_array(out / "flagged.npy", flagged, "clean_trainset", fp, cfg, inputs, info)
    if cfg.relabel:
        # Relabel instead of remove: the suggested label is the model's margin-free arg-max class.
        save_array(out / "relabel.npz", {"index": flagged, "label": labels[flagged], "suggested_label": pred[flagged],
                                         "suggested_prob": scores["pred_prob"][flagged]},
                   "clean_trainset", fp, cfg, inputs, {"count": int(flagged.size)})
    save_kept_index(out / "kept_index.npy", kept, "clean_trainset", fp, cfg, inputs, info,
                    text=cfg.write_text_kept_index)
    save_label_map(out / "label_map.json", label_map, "clean_trainset", fp, cfg, [out / "kept_index.npy"])
    atomic_write_json(out / "summary.json", info)
    line = (f"cleaning: removed {flagged.size} of {len(labels)} samples ({flagged.size / len(labels):.2%}), "
            f"kept {kept.size / len(labels):.2%}; {vanished.size} of {present.size} identities vanish")
    if noise is not None:
        q = info["quality"]
        line += f"; against noise.json: precision {q['precision']:.3f}, recall {q['recall']:.3f}"
    print(line)
    log.info("%s -> %s", line, out)
    return info


def run_label_dict(cfg: Config, ctx=None) -> dict:
    """identity -> sample indices (CSR: identities, starts, order), from the record headers alone."""
    t0 = time.time()
    labels, fp, _ = dataset_labels(cfg)
    identities, starts, order = pruning.identity_index(labels)
    out = paths.label_dict_path(cfg)
    save_array(out, {"identities": identities, "starts": starts, "order": order}, "generate_label_dict", fp, cfg,
               [cfg.rec], {"num_identities": int(len(identities))})
    counts = np.diff(np.append(starts, len(order)))
    seconds = time.time() - t0
    print(f"label dict: {len(labels)} images, {len(identities)} identities (images per identity min {counts.min()}, "
          f"median {int(np.median(counts))}, max {counts.max()}) in {seconds:.2f} s -> {out}")
    return {"identities": int(len(identities)), "seconds": seconds}


def run_label_mapping(cfg: Config, ctx=None) -> dict:
    """Report how many identities a kept list keeps and write its contiguous label map."""
    labels, fp, _ = dataset_labels(cfg)
    kept_path = paths.kept_index_path(cfg)
    kept = load_kept_index(kept_path, fp)
    label_map = pruning.label_map_for(kept, labels)
    out = Path(cfg.label_map) if cfg.label_map else kept_path.with_name("label_map.json")
    save_label_map(out, label_map, "label_mapping", fp, cfg, [kept_path])
    total = len(np.unique(labels))
    print(f"label map: {len(kept)} kept images keep {len(label_map)} of {total} identities "
          f"({total - len(label_map)} vanish) -> {out}")
    return {"identities": len(label_map), "vanished": total - len(label_map)}
