"""Scoring the training set with a trained model (eval_trainset.py).

For every sample, aligned to the sample index: the labelled-class probability computed with the
margin head (the paper's DiffProb input), the probability and arg-max class without margin, and the
label. One process or torchrun: samples are split across ranks without shuffling and gathered
exactly (each sample once; padding duplicates dropped).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from config.config import Config
from utils import paths
from utils.artifacts import ArtifactError, Fingerprint, save_array
from utils.checkpoint import load_checkpoint, load_head_state
from utils.data import PaddedDistributedSampler, open_dataset
from utils.runtime import Context, gather_by_index
from utils.training import build_head, head_kwargs
from utils.transforms import normalize_batch

log = logging.getLogger("diffprob")

SCORE_KEYS = ("gt_prob_with_margin", "gt_prob", "pred", "pred_prob")


def checkpoints_to_score(cfg: Config) -> list:
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


def _head_state_from_paper(state: dict) -> dict:
    """The paper repository's heads keep `kernel` (in_features, classes); ours keep `weight` (classes, in)."""
    if "kernel" in state and "weight" not in state:
        state = dict(state)
        state["weight"] = state.pop("kernel").t().contiguous()
    return state


def load_scoring_model(cfg: Config, ctx: Context, ckpt_path: Path, fingerprint: Fingerprint, num_classes: int):
    from utils.evaluation import load_model

    ckpt = load_checkpoint(ckpt_path)
    if "fingerprint" in ckpt and Fingerprint.from_dict(ckpt["fingerprint"]) != fingerprint:
        raise ArtifactError(f"{ckpt_path} was trained on another dataset ({Fingerprint.from_dict(ckpt['fingerprint'])}) "
                            f"than {cfg.rec} ({fingerprint})")
    if ckpt.get("label_map"):
        raise ArtifactError(f"{ckpt_path} was trained on a pruned, relabelled subset; score with the original model")
    backbone = load_model(cfg, ctx, ckpt)
    info, head_state = load_head_state(ckpt) if "head" in ckpt else (None, None)
    if head_state is None:
        if not cfg.head_checkpoint:
            raise ArtifactError(f"{ckpt_path} holds no head: give --head_checkpoint (the head/header .pth saved "
                                f"with the backbone)")
        info, head_state = load_head_state(load_checkpoint(cfg.head_checkpoint))
    name = info["name"] if info else cfg.original_net_loss
    kwargs = info["kwargs"] if info else head_kwargs(cfg)
    head = build_head(name, cfg.embedding_size, num_classes, ctx, kwargs).to(ctx.device)
    head_state = _head_state_from_paper(head_state)
    rows = head_state["weight"].shape[0]
    if rows != num_classes:
        raise ArtifactError(f"the head has {rows} classes, the dataset {num_classes}")
    head.load_full_state_dict(head_state)
    head.eval()
    return backbone, head


@torch.no_grad()
def score_dataset(cfg: Config, ctx: Context, backbone, head, dataset) -> dict:
    from tqdm import tqdm

    sampler = PaddedDistributedSampler(len(dataset), ctx.rank, ctx.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=cfg.score_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=ctx.device.type == "cuda")
    parts = {k: [] for k in SCORE_KEYS}
    index = []
    t0, n = time.time(), 0
    amp = ctx.amp_dtype is not None
    for images, labels, sample_index in tqdm(loader, disable=not ctx.is_main, desc="score", unit="batch",
                                             mininterval=2):
        images = normalize_batch(images.to(ctx.device, non_blocking=True))
        labels = labels.to(ctx.device, non_blocking=True)
        if ctx.device.type == "cuda" and cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(ctx.device.type, dtype=ctx.amp_dtype or torch.float32, enabled=amp):
            emb = backbone(images)
        out = head.score(emb.float(), labels)
        for k in SCORE_KEYS:
            parts[k].append(out[k])  # stays on the device: a .cpu() per batch would sync every batch
        index.append(sample_index)
        n += images.shape[0]
    seconds = time.time() - t0
    log.info("scored %d images in %.1f s (%.0f images/s per rank)", n, seconds, n / max(seconds, 1e-9))
    idx = torch.cat(index)
    result = {}
    for k in SCORE_KEYS:
        values = torch.cat(parts[k])
        result[k] = gather_by_index(ctx, idx, values.double() if k == "pred" else values.float(), dataset.num_images)
    missing = int(np.isnan(result["gt_prob"]).sum())
    if missing:
        raise ArtifactError(f"{missing} samples were not scored (internal error in the sharding)")
    result["pred"] = result["pred"].astype(np.int64)
    for k in ("gt_prob_with_margin", "gt_prob", "pred_prob"):
        result[k] = result[k].astype(np.float32)
    return result


def score_trainset(cfg: Config, ctx: Context) -> Path:
    dataset = open_dataset(cfg.rec)
    fp = dataset.fingerprint
    ckpts = checkpoints_to_score(cfg)
    per_epoch = []
    for path in ckpts:
        log.info("scoring %d training images with %s", len(dataset), path)
        backbone, head = load_scoring_model(cfg, ctx, path, fp, dataset.num_classes)
        per_epoch.append(score_dataset(cfg, ctx, backbone, head, dataset))
    # Averaging over epochs (use_all_epochs): probabilities are averaged; the arg-max class and its
    # probability are those of the last epoch (the full margin-free softmax is not kept per epoch).
    result = {k: np.mean([r[k] for r in per_epoch], axis=0).astype(np.float32)
              for k in ("gt_prob_with_margin", "gt_prob")}
    result["pred"] = per_epoch[-1]["pred"]
    result["pred_prob"] = per_epoch[-1]["pred_prob"]
    result["label"] = dataset.all_labels
    out = paths.scores_path(cfg)
    if ctx.is_main:
        save_array(out, result, "eval_trainset", fp, cfg, inputs=ckpts,
                   info={"checkpoints": [str(p) for p in ckpts],
                         "mislabeled_by_argmax": int((result["pred"] != result["label"]).sum())})
        log.info("wrote %s: mean gt_prob_with_margin %.4f, mean gt_prob %.4f, arg-max != label for %d samples",
                 out, result["gt_prob_with_margin"].mean(), result["gt_prob"].mean(),
                 int((result["pred"] != result["label"]).sum()))
    return out


def load_scores(cfg: Config, fingerprint: Fingerprint) -> dict:
    from utils.artifacts import load_array

    path = paths.scores_path(cfg)
    if not path.exists():
        raise ArtifactError(f"missing scores {path}: run eval_trainset.py with the same --output, --network, "
                            f"--original_net_loss, --eval_epoch/--use_all_epochs first")
    data = load_array(path, fingerprint, length=fingerprint.num_images)
    missing = [k for k in SCORE_KEYS + ("label",) if k not in data]
    if missing:
        raise ArtifactError(f"{path}: missing arrays {missing}")
    return data
