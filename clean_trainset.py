"""Cleaning (the paper's auxiliary step): flag training samples whose label the original model
contradicts, remove them, and write the cleaned kept list with its contiguous label map.

`--clean_rule` picks the rule (utils/cleaning.py; `argmax`, the paper's: the margin-free arg-max class
is not the label). With `--relabel true` the flagged samples' suggested labels are written too, for
retraining on every image with `--coreset_method relabel`. Writes `<output>/clean/`: kept_index.npy,
label_map.json, flagged.npy, summary.json [, relabel.npz]. With a `noise.json` in the dataset (synthetic
or noise-injected data), the summary measures the flagged set against the injected noise.

    python clean_trainset.py --rec data/synthetic --output output

Every key of config/config.py can be overridden: `python clean_trainset.py --KEY VALUE`; `--help` lists them.
"""
import logging

import numpy as np

from utils import paths
from utils.artifacts import ArtifactError, save_array
from utils.cleaning import cleaning_quality, get_rule, run_rule
from utils.kept_sets import write_kept_set
from utils.data import open_dataset
from utils.records import load_noise, open_records
from utils.runtime import run_stage

log = logging.getLogger("diffprob")


def run_clean(cfg, ctx=None) -> dict:
    rule = get_rule(cfg.clean_rule)
    rec = open_records(cfg, open_dataset(cfg.rec))  # labels from the record headers alone
    flags = run_rule(rule, rec, cfg)
    labels, n = rec.labels, len(rec.labels)
    kept = np.setdiff1d(np.arange(n, dtype=np.int64), flags.index)
    if kept.size == 0:
        raise ArtifactError("cleaning would remove every sample: the scoring model predicts no label right")
    present = np.unique(labels)
    vanished = np.setdiff1d(present, labels[kept])
    info = {"rule": rule.name, "removed": int(flags.index.size), "kept": int(kept.size), "kept_fraction": kept.size / n,
            "identities_vanished": int(vanished.size), "vanished": vanished.tolist()[:1000], **flags.info}
    noise = load_noise(cfg.rec)
    if noise is not None:
        info["quality"] = cleaning_quality(flags.index, noise)

    out = paths.clean_dir(cfg)
    save_array(out / "flagged.npy", flags.index, "clean_trainset", rec.fingerprint, cfg, rec.inputs, info)
    if cfg.relabel:
        if flags.suggested_label is None:
            raise ArtifactError(f"--relabel true: the {rule.name} rule suggests no labels; it can only remove")
        save_array(out / "relabel.npz", {"index": flags.index, "label": labels[flags.index],
                                         "suggested_label": flags.suggested_label, "suggested_prob": flags.confidence},
                   "clean_trainset", rec.fingerprint, cfg, rec.inputs, {"count": int(flags.index.size)})
    write_kept_set(out, "clean_trainset", kept, labels, rec.fingerprint, cfg, rec.inputs, info)

    line = (f"cleaning ({rule.name}): removed {flags.index.size} of {n} samples ({flags.index.size / n:.2%}), "
            f"kept {kept.size / n:.2%}; {vanished.size} of {present.size} identities vanish")
    if noise is not None:
        q = info["quality"]
        line += f"; against noise.json: precision {q['precision']:.3f}, recall {q['recall']:.3f}"
    print(line)
    log.info("%s -> %s", line, out)
    return info


if __name__ == "__main__":
    run_stage("clean_trainset", run_clean, description=__doc__, lock_dir=paths.clean_dir)
