"""Scoring a dataset with a trained model (eval_trainset.py; utils/artifacts/records.py reads the scores back).

For every sample, aligned to the sample index: the labelled-class probability computed with the
margin head (the paper's DiffProb input), the probability and arg-max class without margin, and the
label. One process or torchrun: samples are split across ranks without shuffling and gathered
exactly (each sample once; padding duplicates dropped). With `--skip_bad_images true` an image that cannot be
decoded is left unscored (NaN, `pred` -1) and listed, instead of stopping the stage.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.artifacts.files import ArtifactError
from utils.errors import UserError
from utils.runtime.context import Context, gather_by_index
from utils.data.datasets import PaddedDistributedSampler, collate_bad_apart
from utils.models.embedding import forward_uint8
from utils.artifacts.records import GEOMETRY_KEYS, SCORE_KEYS, SUBCENTER_KEY

log = logging.getLogger("diffprob")


@torch.no_grad()
def score_dataset(cfg, ctx: Context, backbone, head, dataset, embeddings: bool = False) -> dict:
    """Per sample (sample index order): SCORE_KEYS and GEOMETRY_KEYS (and a sub-center head's SUBCENTER_KEY) of
    `head.score`, and with `embeddings` the backbone's
    embedding (float32, N x D; for the redundancy statistic). Every rank gets the full arrays.

    An image that cannot be decoded stops the scoring with a `BadImageError` naming it, unless the dataset
    skips bad images (`--skip_bad_images true`): such a sample then has no score, NaN in every float array
    (its embedding row too) and -1 as `pred`, and `unscored` (sorted int64, the same on every rank) lists them.
    """
    sampler = PaddedDistributedSampler(len(dataset), ctx.rank, ctx.world_size, shuffle=False)
    loader = DataLoader(dataset, batch_size=cfg.score_batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=ctx.device.type == "cuda",
                        collate_fn=collate_bad_apart if dataset.skip_bad_images else None)
    if cfg.compile:  # default mode: the embeddings of every batch are kept, so no CUDA graphs' reused buffers
        backbone = torch.compile(backbone)
    keys = SCORE_KEYS + GEOMETRY_KEYS + (("embedding",) if embeddings else ())
    parts = {k: [] for k in keys}
    index, bad = [], []
    t0, n = time.time(), 0
    # leave=False: the bar is cleared when the loop ends (the log line below reports), also when a bad image
    # stops it, so the error line stands alone
    for images, labels, sample_index, *bad_index in tqdm(loader, disable=not ctx.is_main, desc="score",
                                                         unit="batch", mininterval=2, leave=False):
        bad += bad_index  # collate_bad_apart: the batch's samples without an image
        if images.shape[0] == 0:
            continue
        emb = forward_uint8(backbone, images, ctx.device, ctx.amp_dtype, cfg.channels_last)
        out = head.score(emb, labels.to(ctx.device, non_blocking=True))
        out["embedding"] = emb
        if SUBCENTER_KEY in out and SUBCENTER_KEY not in parts:  # a sub-center head
            keys += (SUBCENTER_KEY,)
            parts[SUBCENTER_KEY] = []
        for k in keys:
            parts[k].append(out[k])  # stays on the device: a .cpu() per batch would sync every batch
        index.append(sample_index)
        n += images.shape[0]
    if not index:
        where = "the dataset" if ctx.world_size == 1 else f"rank {ctx.rank}'s share of the dataset"
        raise UserError(f"no image of {where} could be decoded (--skip_bad_images true skipped every one): check "
                        f"that --rec names the dataset's folder, or replace its images")
    seconds = time.time() - t0
    log.info("scored %d images in %.1f s (%.0f images/s per rank)", n, seconds, n / max(seconds, 1e-9))
    idx = torch.cat(index)
    result = {}
    for k in keys:
        values = torch.cat(parts[k])
        result[k] = gather_by_index(ctx, idx, values.double() if k in ("pred", "other_class") else values.float(),
                                    dataset.num_images)
    # per sample: 0 scored, 1 no image (skip_bad_images), NaN no rank had it
    bad = torch.cat(bad) if bad else torch.empty(0, dtype=torch.int64)
    status = gather_by_index(ctx, torch.cat([idx, bad]),
                             torch.cat([torch.zeros(idx.numel()), torch.ones(bad.numel())]), dataset.num_images)
    no_image = status == 1
    missing = int((np.isnan(result["gt_prob"]) & ~no_image).sum())
    if missing:
        raise ArtifactError(f"{missing} samples were not scored (internal error in the sharding)")
    for k in ("pred", "other_class"):
        result[k][no_image] = -1  # no class; the float arrays hold NaN there
        result[k] = result[k].astype(np.int64)
    for k in keys:
        if k not in ("pred", "other_class"):
            result[k] = result[k].astype(np.float32)
    result["unscored"] = np.flatnonzero(no_image).astype(np.int64)
    return result
