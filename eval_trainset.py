"""Score every training sample with the original model (the paper's eval_trainset.py).

For each sample: the labelled-class probability computed with the margin head (DiffProb's input), the
probability and arg-max class without margin. The checkpoint is `--eval_epoch` (1-based; -1: the last),
every saved epoch averaged with `--use_all_epochs true`, or an explicit `--checkpoint` (our epoch_XXX.pt,
or a plain backbone.pth with `--head_checkpoint`). Writes `<output>/scores/<network>_<loss>_<epoch>.npz`.

Cleaning round R >= 2 (`--clean_round R`): scores every sample with the model retrained on round R-1's
kept list (its last epoch, or `--checkpoint`), its classes mapped back to the dataset's identities through
its label map; writes `<output>/clean/<scorer>/round_<R>/scores.npz`. A sample whose identity the model no
longer has gets p(label) = 0 and is counted in the manifest (`label_in_model` is False for it).

Beside the probabilities, where each sample lies among the class centres (margin-free cosines to its identity's
centre and to the nearest other one, and which; with `--loss SubCenterArcFace` to its identity's sub-centers): the
scoring model's (the last one's with `--use_all_epochs`), what the `center_angle` and `subcenter` rules read.

An image that cannot be decoded stops the stage with one line naming its record, unless `--skip_bad_images
true`: then it has no score (NaN in every probability, -1 as `pred`), the manifest lists it (`unscored`: sample
indices, with their `unscored_record_key` or `unscored_file`), and one printed line says how many and which;
cleaning and selection leave such samples out of their kept lists.

    python eval_trainset.py --rec data/synthetic --network smallnet --output output
    torchrun --nproc_per_node=8 eval_trainset.py --dataset webface --rec /data/faces_webface_112x112

Every key of config/config.py can be overridden: `python eval_trainset.py --KEY VALUE`; `--help` lists them.
"""
import logging
from pathlib import Path

import numpy as np

from utils.artifacts import paths
from utils.arrays import first_few
from utils.artifacts.files import ArtifactError, save_array
from utils.artifacts.paths import manifest_path
from utils.data.datasets import open_dataset
from utils.models.build import class_tables, load_scoring_model, resolve_checkpoint
from utils.artifacts.records import (GEOMETRY_KEYS, SUBCENTER_KEY, round_model_dir, round_scores_path, round_train_keys,
                                     sample_names)
from utils.data.redundancy import redundancy_stats
from utils.runtime.stage import run_stage
from utils.evaluation.scoring import score_dataset

log = logging.getLogger("diffprob")


def checkpoints_to_score(cfg) -> list:
    """The checkpoint(s) `eval_epoch` / `use_all_epochs` / `checkpoint` / `clean_round` name."""
    if cfg.checkpoint:
        return [Path(cfg.checkpoint)]
    if cfg.clean_round >= 2:
        model_dir = round_model_dir(cfg, cfg.clean_round - 1)
        if not (model_dir / "last.pt").exists():
            raise ArtifactError(f"no retrained model in {model_dir}: retrain on round {cfg.clean_round - 1}'s kept list "
                                f"first (train_everything.py {' '.join(f'--{k} {v}' for k, v in round_train_keys(cfg, cfg.clean_round - 1).items())})")
        return [resolve_checkpoint(model_dir / "last.pt")]
    model_dir = paths.original_dir(cfg)
    saved = sorted(model_dir.glob("epoch_*.pt"))
    if not saved:
        raise ArtifactError(f"no checkpoint epoch_XXX.pt in {model_dir}: train the original model first "
                            f"(train_everything.py --is_original_train true --loss {cfg.original_net_loss})")
    if cfg.use_all_epochs:
        return saved
    if cfg.eval_epoch < 0:
        return [saved[-1]]
    path = paths.epoch_checkpoint(model_dir, cfg.eval_epoch)
    if not path.exists():
        raise ArtifactError(f"eval_epoch={cfg.eval_epoch}: {path} not found; saved epochs: "
                            f"{', '.join(p.stem for p in saved)}")
    return [path]


def score_with_label_map(cfg, ctx, model, dataset, embeddings: bool) -> dict:
    """Scores of every sample by a model trained on a relabelled subset, in the dataset's classes: the model
    sees each label as its own class; `pred` is mapped back; where the model has no class for a sample's
    identity, p(label) is 0 (it gives that identity nothing) and `label_in_model` is False. An unscored sample
    (no image) stays NaN, `pred` -1."""
    to_model, to_dataset = class_tables(model.label_map, dataset.source_num_classes, model.path)
    mapped = to_model[dataset.all_labels]
    in_model = mapped >= 0
    view = dataset.with_labels(np.arange(dataset.num_images), np.where(in_model, mapped, 0))
    result = score_dataset(cfg, ctx, model.backbone, model.head, view, embeddings=embeddings)
    scored = result["pred"] >= 0
    for key in ("pred", "other_class"):
        result[key] = np.where(result[key] >= 0, to_dataset[np.maximum(result[key], 0)], -1)
    for key in ("gt_prob_with_margin", "gt_prob"):
        result[key][~in_model & scored] = 0.0
    for key in ("label_cos", SUBCENTER_KEY):  # no centre of its identity to measure against
        if key in result:
            result[key][~in_model] = np.nan
    result["label_in_model"] = in_model
    return result


def score_trainset(cfg, ctx) -> Path:
    dataset = open_dataset(cfg.rec, skip_bad_images=cfg.skip_bad_images)
    fp = dataset.fingerprint
    ckpts = checkpoints_to_score(cfg)
    per_epoch = []
    for i, path in enumerate(ckpts):
        log.info("scoring %d training images with %s", len(dataset), path)
        model = load_scoring_model(cfg, ctx, path, fp, dataset.num_classes, allow_label_map=cfg.clean_round >= 2)
        last = i == len(ckpts) - 1  # the last model's embeddings measure the dataset's redundancy
        if model.label_map:
            per_epoch.append(score_with_label_map(cfg, ctx, model, dataset, embeddings=last))
        else:
            per_epoch.append(score_dataset(cfg, ctx, model.backbone, model.head, dataset, embeddings=last))
    embedding = per_epoch[-1].pop("embedding")
    # the same images fail to decode for every checkpoint; the union, should a file change between them
    unscored = np.unique(np.concatenate([r.pop("unscored") for r in per_epoch]))
    scored = np.ones(dataset.num_images, dtype=bool)
    scored[unscored] = False
    # measured on the images that have an embedding
    redundancy = redundancy_stats(embedding[scored], dataset.all_labels[scored]) if ctx.is_main else None

    # use_all_epochs: the probabilities are averaged and kept in float64, as the paper's code does (a
    # float32 mean moved 0-3 kept samples in 4 of 12 tested configurations); the arg-max class and its
    # probability are the last epoch's (the full margin-free softmax is not kept per epoch).
    result = {k: per_epoch[0][k] if len(per_epoch) == 1 else np.mean([r[k] for r in per_epoch], axis=0,
                                                                      dtype=np.float64)
              for k in ("gt_prob_with_margin", "gt_prob")}
    result["pred"] = per_epoch[-1]["pred"]
    result["pred_prob"] = per_epoch[-1]["pred_prob"]
    for key in GEOMETRY_KEYS + (SUBCENTER_KEY,):  # where the samples lie: the last (the scored) model's
        if key in per_epoch[-1]:
            result[key] = per_epoch[-1][key]
    result["label"] = dataset.all_labels
    if len(per_epoch) > 1:
        # The paper's cleaning over all epochs: per epoch p(label), or -1 where the margin-free arg-max is another
        # identity, averaged; clean_trainset's argmax rule removes a sample whose average is below 0.
        votes = [np.where(r["pred"] == result["label"], r["gt_prob_with_margin"], -1.0) for r in per_epoch]
        result["argmax_vote"] = np.mean(votes, axis=0, dtype=np.float64)
    for key in ("gt_prob_with_margin", "gt_prob", "pred_prob", "argmax_vote", "label_cos", "other_cos",
                SUBCENTER_KEY):
        if key in result:  # no score, and no vote: pred -1 is no class, not another identity
            result[key][unscored] = np.nan
    result["pred"][unscored] = -1
    result["other_class"][unscored] = -1
    mislabeled = int((result["pred"] != result["label"])[scored].sum())
    info = {}
    if "label_in_model" in per_epoch[-1]:
        result["label_in_model"] = per_epoch[-1]["label_in_model"]
        missing = ~result["label_in_model"] & scored
        info = {"label_map": True, "samples_without_class": int(missing.sum()),
                "identities_without_class": np.unique(result["label"][missing]).tolist()}
        if missing.any():
            print(f"{int(missing.sum())} samples of {len(info['identities_without_class'])} identities the retrained "
                  f"model no longer has: scored with p(label) = 0 (label_in_model = false)")

    out = scores_output(cfg)
    if ctx.is_main:
        per_id = redundancy["identity"]
        summary = {"share": redundancy["share"], "threshold": redundancy["threshold"],
                   "num_images": redundancy["num_images"], "checkpoint": str(ckpts[-1]),
                   "identities_with_redundancy": int((per_id["num_redundant"] > 0).sum()),
                   "median_identity_share": float(np.median(per_id["share"])),
                   "meaning": "share of images whose nearest image of the same identity in the scoring model's "
                              "embedding space has cosine similarity >= threshold"}
        save_array(out, result, "eval_trainset", fp, cfg, inputs=ckpts,
                   info={"checkpoints": [str(p) for p in ckpts], "mislabeled_by_argmax": mislabeled,
                         "redundancy": summary, **info, **unscored_info(dataset, unscored)})
        if unscored.size:
            column, names = sample_names(dataset)
            which = first_few(f"sample {i}" + (f" ({column.replace('_', ' ')} {names[i]})" if column else "")
                              for i in unscored.tolist())
            print(f"skip_bad_images: {unscored.size} of {dataset.num_images} images could not be decoded and have "
                  f"no score (NaN, pred -1): {which}; every one is listed as 'unscored' in {manifest_path(out)}")
        print(f"redundancy: {summary['share']:.1%} of the images have a near-identical image of their identity "
              f"(cosine >= {summary['threshold']:g} in the scoring model's embedding space; "
              f"{summary['identities_with_redundancy']} of {len(per_id['label'])} identities)")
        log.info("wrote %s: mean gt_prob_with_margin %.4f, mean gt_prob %.4f, arg-max != label for %d samples",
                 out, result["gt_prob_with_margin"][scored].mean(), result["gt_prob"][scored].mean(), mislabeled)
    return out


def unscored_info(dataset, unscored) -> dict:
    """The manifest's fields for the samples without a score: `unscored` (sorted sample indices) and, where
    the dataset names its samples, their record keys (`unscored_record_key`) or files (`unscored_file`)."""
    column, names = sample_names(dataset)
    info = {"unscored": unscored.tolist()}
    if column:
        info[f"unscored_{column}"] = [names[i].item() if hasattr(names[i], "item") else names[i]
                                      for i in unscored.tolist()]
    return info


def scores_output(cfg) -> Path:
    """The scores file this config writes: the original model's, or a cleaning round's."""
    return round_scores_path(cfg, cfg.clean_round) if cfg.clean_round >= 2 else paths.scores_path(cfg)


if __name__ == "__main__":
    run_stage("eval_trainset", score_trainset, description=__doc__, distributed=True,
              lock_dir=lambda cfg: scores_output(cfg).parent)
