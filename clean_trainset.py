"""Cleaning: flag training samples whose label the scoring model contradicts, remove them, and write the
cleaned kept list with its contiguous label map, the lists to share and a contact sheet to audit them.

`--clean_rule` picks the rule (utils/cleaning/registry.py: `argmax`, the paper's and the default; `trajectory`;
`confident_learning`), `--clean_agree A,B` keeps only what those rules flag too. With `--relabel true` the
suggested labels of the mislabeled samples are written too, for retraining on every image with
`--coreset_method relabel`. Writes `<output>/clean/<scorer>/`:

    kept_index.npy, label_map.json, flagged.npy, summary.json [, relabel.npz]
    mislabeled.npy/.csv   [index, label, suggested_label, confidence], most confident first
    outliers.npy/.csv     [index, label, score] (score: largest class probability), least claimed first
    contact_sheet.png     the most confident flagged images beside their labelled and suggested identity

A sample the scores have no value for (eval_trainset.py --skip_bad_images true: an image it could not decode) is
not judged: it is not flagged, not counted in the quality figures, and left out of the kept list (it cannot be
trained on); the summary lists it as `unscored`.

The CSVs add each sample's image file (image-folder datasets) or record key (RecordIO). With a
`noise.json` in the dataset, the summary measures the cleaning against the injected noise. With
`--clean_round R` (iterative cleaning, run_pipeline.py --clean_rounds) the same files go to
`clean/<scorer>/round_<R>/` as well; round R >= 2 reads the scores of round R-1's retrained model
(eval_trainset.py --clean_round R) and reports how much the flagged set changed.

    python clean_trainset.py --rec data/synthetic --output output --clean_rule trajectory

Every key of config/config.py can be overridden: `python clean_trainset.py --KEY VALUE`; `--help` lists them.
"""
import logging

import numpy as np

from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, load_array, save_array
from utils.arrays import unscored_line
from utils.cleaning.lists import flag_lists, write_flag_lists
from utils.cleaning.quality import cleaning_quality, flag_change
from utils.cleaning.registry import check_clean_config, get_rule, rule_needs, run_rule
from utils.cleaning.contact_sheet import contact_sheet, save_figure
from utils.data.datasets import open_dataset
from utils.artifacts.kept_sets import write_kept_set
from utils.artifacts.records import clean_round_dir, open_cleaning_records
from utils.data.noise_file import load_noise
from utils.runtime.stage import run_stage

log = logging.getLogger("diffprob")


def run_clean(cfg, ctx=None) -> dict:
    check_clean_config(cfg)
    rule = get_rule(cfg.clean_rule)
    dataset = open_dataset(cfg.rec, skip_bad_images=cfg.skip_bad_images)  # the contact sheet decodes images
    rec = open_cleaning_records(cfg, dataset)  # labels from the record headers alone
    flags = run_rule(rule, rec, cfg)
    labels, n = rec.labels, len(rec.labels)
    reads_scores = any("scores" in rule_needs(get_rule(name), cfg) for name in (rule.name, *(cfg.clean_agree or ())))
    unscored = rec.unscored if reads_scores else np.empty(0, dtype=np.int64)
    if unscored.size:  # not judged (a rule may flag its pred -1 as another class): neither flagged nor kept
        flags = flags.subset(np.setdiff1d(flags.index, unscored))
    kept = np.setdiff1d(np.arange(n, dtype=np.int64), np.union1d(flags.index, unscored))
    if kept.size == 0:
        raise ArtifactError("cleaning would remove every sample: the scoring model predicts no label right")
    present = np.unique(labels)
    vanished = np.setdiff1d(present, labels[kept])
    mislabeled, outliers = flag_lists(flags, labels)
    info = {"rule": rule.name, "removed": int(flags.index.size), "kept": int(kept.size), "kept_fraction": kept.size / n,
            "mislabeled": int(mislabeled.size), "outliers": int(outliers.size),
            "identities_vanished": int(vanished.size), "vanished": vanished.tolist()[:1000], **flags.info}
    if unscored.size:
        info["unscored"] = unscored.tolist()  # neither removed (flagged) nor kept
    noise = load_noise(cfg.rec)
    if noise is not None:
        info["quality"] = cleaning_quality(flags.index, noise, flags.suggested_label, flags.outlier)
    folders = [paths.clean_dir(cfg)]
    if cfg.clean_round >= 1:
        info["round"] = cfg.clean_round
        folders.append(clean_round_dir(cfg, cfg.clean_round))
    if cfg.clean_round >= 2:
        previous = clean_round_dir(cfg, cfg.clean_round - 1) / "flagged.npy"
        if not previous.exists():
            raise ArtifactError(f"missing {previous}: run cleaning round {cfg.clean_round - 1} first")
        before = load_array(previous, rec.fingerprint)
        info["change"] = flag_change(before, flags.index)
        info["converged"] = info["change"] < cfg.clean_tolerance
        info["previous_flagged"] = int(before.size)
    sheet = contact_sheet(dataset, mislabeled, outliers, title=f"cleaning ({rule.name}): most confident flags",
                          no_image=unscored)

    # everything is computed: write; the kept list (the stage's completion mark) last
    relabel = ~flags.outlier
    for out in folders:
        write_flag_lists(out, mislabeled, outliers, dataset, "clean_trainset", cfg, rec.inputs)
        save_figure(sheet, out / "contact_sheet.png")
        save_array(out / "flagged.npy", flags.index, "clean_trainset", rec.fingerprint, cfg, rec.inputs, info)
        if cfg.relabel:
            if flags.suggested_label is None:
                raise ArtifactError(f"--relabel true: the {rule.name} rule suggests no labels; it can only remove")
            save_array(out / "relabel.npz", {"index": flags.index[relabel], "label": labels[flags.index[relabel]],
                                             "suggested_label": flags.suggested_label[relabel],
                                             "suggested_prob": flags.confidence[relabel]},
                       "clean_trainset", rec.fingerprint, cfg, rec.inputs,
                       {"count": int(relabel.sum()), "outliers_not_relabelled": int(outliers.size)})
        write_kept_set(out, "clean_trainset", kept, labels, rec.fingerprint, cfg, rec.inputs, info)

    line = (f"cleaning ({rule.name}): removed {flags.index.size} of {n} samples ({flags.index.size / n:.2%}: "
            f"{mislabeled.size} mislabeled, {outliers.size} outliers), kept {kept.size / n:.2%}; "
            f"{vanished.size} of {present.size} identities vanish")
    if noise is not None:
        q = info["quality"]
        line += f"; against noise.json: precision {q['precision']:.3f}, recall {q['recall']:.3f}"
    if "change" in info:
        line += f"; round {cfg.clean_round}: the flagged set changed by {info['change']:.1%}"
    print(line)
    if unscored.size:
        print(unscored_line(unscored))
    if cfg.relabel and outliers.size:
        print(f"relabel.npz holds the {relabel.sum()} mislabeled samples; the {outliers.size} outliers have no "
              f"suggested label (training with --coreset_method relabel keeps them as labelled)")
    log.info("%s -> %s", line, ", ".join(map(str, folders)))
    return info


if __name__ == "__main__":
    run_stage("clean_trainset", run_clean, description=__doc__, lock_dir=paths.clean_dir)
