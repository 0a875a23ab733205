"""Score every training sample with the original model (the paper's eval_trainset.py).

For each sample: the labelled-class probability computed with the margin head (DiffProb's input), the
probability and arg-max class without margin. The checkpoint is `--eval_epoch` (1-based; -1: the last),
every saved epoch averaged with `--use_all_epochs true`, or an explicit `--checkpoint` (our epoch_XXX.pt,
or a plain backbone.pth with `--head_checkpoint`). Writes `<output>/scores/<network>_<loss>_<epoch>.npz`.

    python eval_trainset.py --rec data/synthetic --network smallnet --output output
    torchrun --nproc_per_node=8 eval_trainset.py --dataset webface --rec /data/faces_webface_112x112

Every key of config/config.py can be overridden: `python eval_trainset.py --KEY VALUE`; `--help` lists them.
"""
import logging
from pathlib import Path

import numpy as np

from utils import paths
from utils.artifacts import ArtifactError, save_array
from utils.data import open_dataset
from utils.models import load_scoring_model
from utils.redundancy import redundancy_stats
from utils.runtime import run_stage
from utils.scoring import score_dataset

log = logging.getLogger("diffprob")


def checkpoints_to_score(cfg) -> list:
    """The checkpoint(s) `eval_epoch` / `use_all_epochs` / `checkpoint` name."""
    if cfg.checkpoint:
        return [Path(cfg.checkpoint)]
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


def score_trainset(cfg, ctx) -> Path:
    dataset = open_dataset(cfg.rec)
    fp = dataset.fingerprint
    ckpts = checkpoints_to_score(cfg)
    per_epoch = []
    for i, path in enumerate(ckpts):
        log.info("scoring %d training images with %s", len(dataset), path)
        model = load_scoring_model(cfg, ctx, path, fp, dataset.num_classes)
        last = i == len(ckpts) - 1  # the last model's embeddings measure the dataset's redundancy
        per_epoch.append(score_dataset(cfg, ctx, model.backbone, model.head, dataset, embeddings=last))
    embedding = per_epoch[-1].pop("embedding")
    redundancy = redundancy_stats(embedding, dataset.all_labels) if ctx.is_main else None

    # use_all_epochs: the probabilities are averaged and kept in float64, as the paper's code does (a
    # float32 mean moved 0-3 kept samples in 4 of 12 tested configurations); the arg-max class and its
    # probability are the last epoch's (the full margin-free softmax is not kept per epoch).
    result = {k: per_epoch[0][k] if len(per_epoch) == 1 else np.mean([r[k] for r in per_epoch], axis=0,
                                                                      dtype=np.float64)
              for k in ("gt_prob_with_margin", "gt_prob")}
    result["pred"] = per_epoch[-1]["pred"]
    result["pred_prob"] = per_epoch[-1]["pred_prob"]
    result["label"] = dataset.all_labels
    mislabeled = int((result["pred"] != result["label"]).sum())

    out = paths.scores_path(cfg)
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
                         "redundancy": summary})
        print(f"redundancy: {summary['share']:.1%} of the images have a near-identical image of their identity "
              f"(cosine >= {summary['threshold']:g} in the scoring model's embedding space; "
              f"{summary['identities_with_redundancy']} of {len(per_id['label'])} identities)")
        log.info("wrote %s: mean gt_prob_with_margin %.4f, mean gt_prob %.4f, arg-max != label for %d samples",
                 out, result["gt_prob_with_margin"].mean(), result["gt_prob"].mean(), mislabeled)
    return out


if __name__ == "__main__":
    run_stage("eval_trainset", score_trainset, description=__doc__, distributed=True,
              lock_dir=lambda cfg: paths.scores_path(cfg).parent)
