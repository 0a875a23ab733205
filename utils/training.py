"""Training of a backbone + margin head: one process (CPU or one GPU) or torchrun with DDP.

The loop itself is short; what it needs is prepared by `prepare_run` (dataset, model, optimizer,
schedule, resume state) and reported through small callbacks (log line, verification, checkpoint).
With `is_original_train=True` every epoch also records, per sample, the labelled-class probability
with margin as seen during that epoch (the DynUnc input) and the margin-free top-k logits (the
soft-label entropy input), gathered exactly across ranks into `probs/epoch_XXX.npy`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from config.config import check_against_dataset
from utils import paths
from utils.artifacts import (ArtifactError, Fingerprint, is_complete, load_kept_index, load_label_map, read_array,
                             save_array)
from utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.context import Context, barrier, gather_by_index, seed_everything
from utils.data import PaddedDistributedSampler, collate_skip_bad, open_dataset
from utils.embedding import forward_uint8
from utils.errors import UserError
from utils.models import build_head, head_kwargs, model_kwargs, new_backbone
from utils.selection import RETRAIN_ONLY, get_method
from utils.transforms import random_hflip

log = logging.getLogger("diffprob")


# ------------------------------------------------------------------------------------------ building
def lr_factor(cfg, steps_per_epoch: int):
    """Per-step lr multiplier: linear warm-up, then x lr_decay at each epoch of lr_steps."""
    warmup = cfg.warmup_epoch * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        epoch = step / steps_per_epoch
        return cfg.lr_decay ** sum(epoch >= s for s in cfg.lr_steps)

    return factor


def load_selection(cfg, fingerprint: Fingerprint, labels: np.ndarray):
    """(kept_index, label_map, inputs) for retraining; (None, None, []) for the original training."""
    from utils.pruning import label_map_for

    if cfg.is_original_train or (cfg.coreset_method == "full" and not cfg.kept_index):
        return None, None, []
    if not cfg.kept_index and cfg.coreset_method not in RETRAIN_ONLY:
        get_method(cfg.coreset_method)  # an unknown method is refused here, naming the valid ones
    kept_path = paths.kept_index_path(cfg)
    legacy = paths.legacy_coreset_dir(cfg) / "kept_index.npy"
    if not cfg.kept_index and not kept_path.exists() and legacy.exists():
        raise ArtifactError(f"{legacy} is where earlier versions wrote kept lists; they now live under the model "
                            f"that scored them: {kept_path}. Move the folder there, or give --kept_index {legacy}")
    kept = load_kept_index(kept_path, fingerprint)
    map_path = paths.label_map_path(cfg)
    if map_path.exists():
        label_map = load_label_map(map_path, fingerprint)
        return kept, label_map, [kept_path, map_path]
    # A released kept list comes without a label map: derive it from the identities the list keeps.
    return kept, label_map_for(kept, labels), [kept_path]


def relabelled(cfg, dataset):
    """The full dataset with cleaning's flagged samples moved to their suggested label."""
    from utils.artifacts import load_array

    path = paths.clean_dir(cfg) / "relabel.npz"
    if not path.exists():
        raise ArtifactError(f"missing {path}: run clean_trainset.py --relabel true first")
    rel = load_array(path, dataset.fingerprint)
    log.info("relabel: %d flagged samples take their suggested label", len(rel["index"]))
    return dataset.with_labels(rel["index"], rel["suggested_label"])


@dataclass
class Run:
    cfg: object  # config.config.Config
    ctx: Context
    out: Path
    dataset: object
    loader: DataLoader
    sampler: PaddedDistributedSampler
    backbone: torch.nn.Module
    train_backbone: torch.nn.Module  # DDP / compiled wrapper of `backbone`
    head: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    start_epoch: int = 0
    global_step: int = 0
    inputs: list = field(default_factory=list)
    label_map: dict = None
    best: dict = field(default_factory=dict)
    skipped_images: int = 0  # undecodable images dropped in the last epoch (skip_bad_images)


def prepare_run(cfg, ctx: Context) -> Run:
    out = paths.train_dir(cfg)
    # the full dataset: labels and fingerprint from the record headers, no image decoded
    probe = open_dataset(cfg.rec, skip_bad_images=cfg.skip_bad_images)
    if not cfg.is_original_train and cfg.coreset_method == "relabel":
        dataset, inputs, label_map = relabelled(cfg, probe), [paths.clean_dir(cfg) / "relabel.npz"], None
    else:
        kept, label_map, inputs = load_selection(cfg, probe.fingerprint, probe.all_labels)
        dataset = probe.select(kept, label_map) if kept is not None else probe
    if dataset.labels.size and int(dataset.labels.max()) >= dataset.num_classes:
        raise ArtifactError(f"label {int(dataset.labels.max())} is outside the head's {dataset.num_classes} classes")
    global_batch = cfg.batch_size * ctx.world_size
    if len(dataset) < global_batch:
        raise UserError(f"{len(dataset)} training images are fewer than one global batch ({global_batch}); "
                        f"lower --batch_size")
    image_size = _image_size(dataset)
    check_against_dataset(cfg, len(dataset), dataset.num_classes, image_size, world_size=ctx.world_size)
    seed_everything(cfg.seed)  # same initial weights on every rank and on a resumed run
    backbone = new_backbone(cfg, image_size).to(ctx.device)
    head = build_head(cfg.loss, cfg.embedding_size, dataset.num_classes, ctx, head_kwargs(cfg)).to(ctx.device)
    if ctx.device.type == "cuda" and cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    train_backbone = backbone
    if cfg.compile:
        train_backbone = torch.compile(train_backbone)
    if ctx.distributed:
        train_backbone = DistributedDataParallel(
            train_backbone, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
            broadcast_buffers=False)

    sampler = PaddedDistributedSampler(len(dataset), ctx.rank, ctx.world_size, shuffle=True, seed=cfg.seed)
    workers = cfg.num_workers
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=ctx.device.type == "cuda", drop_last=True,
                        collate_fn=collate_skip_bad if cfg.skip_bad_images else None,
                        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
    steps_per_epoch = len(loader)
    if cfg.max_steps_per_epoch > 0:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    lr = cfg.lr * global_batch / 512
    optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}],
                                lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(enabled=ctx.amp_dtype == torch.float16)
    run = Run(cfg, ctx, out, dataset, loader, sampler, backbone, train_backbone, head, optimizer, scheduler,
              scaler, steps_per_epoch, inputs=inputs, label_map=label_map)
    if cfg.resume:
        _resume(run)
    return run


def _image_size(dataset) -> int:
    size = getattr(getattr(dataset, "layout", None), "image_size", None)
    if size:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    img, _, _ = dataset[0]
    return int(img.shape[-1])


# ----------------------------------------------------------------------------------------- checkpoints
def _resume_file(out: Path, rank: int, epoch: int) -> Path:
    return out / f"resume_rank{rank}_epoch{epoch:03d}.pt"


def _model_spec(run: Run):
    return {"name": run.cfg.network, "args": model_kwargs(run.cfg, _image_size(run.dataset))}


def save_epoch(run: Run, epoch: int):
    """Epoch `epoch` (1-based, complete) -> epoch_XXX.pt (+ backbone.pth), per-rank resume files, last.pt.

    `last.pt` is written after every rank's resume file exists, so its presence marks a complete epoch.
    """
    cfg, ctx, out = run.cfg, run.ctx, run.out
    head_state = run.head.full_state_dict()  # collective: every rank takes part
    save_checkpoint(_resume_file(out, ctx.rank, epoch), {
        "epoch": epoch, "step": run.global_step, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
        "head_shard": run.head.state_dict(), "best": run.best})
    barrier(ctx)
    if ctx.is_main:
        light = {
            "backbone": run.backbone.state_dict(), "model": _model_spec(run),
            "head": head_state, "head_info": {"name": cfg.loss, "in_features": cfg.embedding_size,
                                              "num_classes": run.dataset.num_classes, "kwargs": head_kwargs(cfg)},
            "epoch": epoch, "step": run.global_step, "fingerprint": run.dataset.fingerprint.to_dict(),
            "label_map": run.label_map, "config": dataclasses.asdict(cfg)}
        save_checkpoint(paths.epoch_checkpoint(out, epoch), light)
        save_checkpoint(out / "backbone.pth", run.backbone.state_dict())
        save_checkpoint(out / "last.pt", {"epoch": epoch, "world_size": ctx.world_size,
                                          "fingerprint": run.dataset.fingerprint.to_dict()})
        if not cfg.is_original_train and epoch > 1:  # retrained models keep only the newest epoch
            paths.epoch_checkpoint(out, epoch - 1).unlink(missing_ok=True)
    barrier(ctx)
    if epoch > 1:
        _resume_file(out, ctx.rank, epoch - 1).unlink(missing_ok=True)


def _resume(run: Run):
    out, ctx = run.out, run.ctx
    marker = out / "last.pt"
    if not marker.exists():
        log.info("resume: no complete epoch in %s, starting from scratch", out)
        return
    last = load_checkpoint(marker)
    if Fingerprint.from_dict(last["fingerprint"]) != run.dataset.fingerprint:
        raise ArtifactError(f"{marker} belongs to another dataset or kept list; use another --output")
    if last["world_size"] != ctx.world_size:
        raise UserError(f"{marker} was written by {last['world_size']} processes; resume with the same number "
                        f"(the head's class shards and optimizer state are per rank)")
    epoch = last["epoch"]
    light = load_checkpoint(paths.epoch_checkpoint(out, epoch))
    state = load_checkpoint(_resume_file(out, ctx.rank, epoch))
    run.backbone.load_state_dict(light["backbone"])
    run.head.load_state_dict(state["head_shard"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.start_epoch, run.global_step, run.best = epoch, state["step"], state.get("best", {})
    log.info("resumed from epoch %d (step %d) of %s", epoch, run.global_step, out)


# --------------------------------------------------------------------------------------- the loop
class Recorder:
    """Per-sample values seen during one epoch, gathered exactly at its end."""

    def __init__(self, topk: int):
        self.topk = topk
        self.index, self.prob, self.tk_logit, self.tk_index, self.rest, self.label = [], [], [], [], [], []

    def add(self, sample_index, gt_prob, scores=None):
        # Values stay on the device until the epoch ends: a .cpu() per step would sync the GPU every step.
        self.index.append(sample_index)
        self.prob.append(gt_prob.detach().float())
        if scores is not None:
            self.tk_logit.append(scores["topk_logits"].float())
            self.tk_index.append(scores["topk_index"])
            self.rest.append(scores["rest_mean_logit"].float())
            self.label.append(scores["label_logit"].float())

    def write(self, run: Run, epoch: int):
        n = run.dataset.num_images
        idx = torch.cat(self.index)
        prob = gather_by_index(run.ctx, idx, torch.cat(self.prob), n).astype(np.float32)
        arrays = {"gt_prob_with_margin": prob}
        if self.tk_logit:
            arrays["topk_logits"] = gather_by_index(run.ctx, idx, torch.cat(self.tk_logit), n).astype(np.float16)
            tk = gather_by_index(run.ctx, idx, torch.cat(self.tk_index).double(), n)
            arrays["topk_index"] = np.where(np.isnan(tk), -1, tk).astype(np.int32)
            arrays["rest_mean_logit"] = gather_by_index(run.ctx, idx, torch.cat(self.rest), n).astype(np.float16)
            # the margin-free logit of the labelled class (AUM, and EL2N when the label is outside the top k)
            arrays["label_logit"] = gather_by_index(run.ctx, idx, torch.cat(self.label), n).astype(np.float16)
        if run.ctx.is_main:
            save_array(run.out / "probs" / f"epoch_{epoch:03d}.npz", arrays, "train_everything.record",
                       run.dataset.fingerprint, run.cfg, info={"epoch": epoch, "seen": int(np.isfinite(prob).sum())})


def train_step(backbone, head, optimizer, scaler, images, labels, *, device, amp_dtype=None,
               channels_last=False, grad_clip=0.0, clip_params=None, flip_gen=None):
    """One optimisation step on a uint8 batch: flip + scale on the device, autocast forward, margin
    head in fp32, (scaled) backward, gradient-norm clip of the backbone, SGD step.

    Returns (loss, gt_prob, embeddings), all still on the device (no host sync here).
    """
    embeddings = forward_uint8(backbone, images, device, amp_dtype, channels_last,
                               transform=lambda x: random_hflip(x, flip_gen))
    loss, gt_prob = head(embeddings, labels.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, gt_prob, embeddings


def train_one_epoch(run: Run, epoch: int, record: Recorder = None, on_step=None):
    cfg, ctx = run.cfg, run.ctx
    run.train_backbone.train()
    run.head.train()
    run.sampler.set_epoch(epoch)
    flip_gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 131 + ctx.rank)
    loss_sum = torch.zeros((), device=ctx.device)
    channels_last = ctx.device.type == "cuda" and cfg.channels_last
    clip_params = list(run.backbone.parameters())
    step = 0
    run.skipped_images = 0
    for step, (images, labels, sample_index) in enumerate(run.loader):
        if step >= run.steps_per_epoch:
            break
        if cfg.skip_bad_images and images.shape[0] < cfg.batch_size:
            run.skipped_images += cfg.batch_size - images.shape[0]  # collate_skip_bad dropped (and logged) them
            if images.shape[0] < 2:  # batch norm needs two samples
                if ctx.distributed:
                    raise UserError(f"a batch of rank {ctx.rank} holds {images.shape[0]} decodable images; "
                                    f"replace the bad images of the .rec (the log names them)")
                continue
        loss, gt_prob, embeddings = train_step(
            run.train_backbone, run.head, run.optimizer, run.scaler, images, labels, device=ctx.device,
            amp_dtype=ctx.amp_dtype, channels_last=channels_last, grad_clip=cfg.grad_clip, clip_params=clip_params,
            flip_gen=flip_gen)
        run.scheduler.step()
        run.global_step += 1
        if record is not None:
            scores = None
            if record.topk > 0:
                with torch.no_grad():
                    scores = run.head.score(embeddings.detach().float(), labels.to(ctx.device), topk=record.topk)
            record.add(sample_index, gt_prob, scores)
        loss_sum += loss.detach()
        if on_step is not None:
            on_step(run, epoch, step, loss)
    return float(loss_sum) / max(1, min(run.steps_per_epoch, step + 1))


class ProgressLog:
    """Throughput / loss / lr / ETA every `frequent` steps, a tqdm bar on rank 0, metrics.jsonl."""

    def __init__(self, run: Run):
        from tqdm import tqdm

        self.run = run
        self.total = run.cfg.num_epoch * run.steps_per_epoch
        self.t0 = time.time()
        self.step0 = run.global_step
        self.tick, self.tick_step = self.t0, run.global_step
        self.loss_avg = None
        self.bar = tqdm(total=self.total, initial=run.global_step, disable=not run.ctx.is_main,
                        desc="train", unit="step", mininterval=2, dynamic_ncols=True)
        self.metrics = run.out / "metrics.jsonl"
        self.tb = None
        if run.ctx.is_main:
            try:  # TensorBoard when it is installed; the JSONL file always
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run.out / "tensorboard"))
            except ImportError:
                pass

    def write(self, record: dict):
        if self.run.ctx.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tb is not None:
                step = record.get("step", 0)
                for k, v in record.items():
                    if isinstance(v, float) and k not in ("step", "epoch"):
                        self.tb.add_scalar(f"{record['type']}/{k}", v, step)
                self.tb.flush()

    def __call__(self, run: Run, epoch: int, step: int, loss):
        self.bar.update(1)
        freq = run.cfg.frequent
        if freq <= 0 or run.global_step % freq:
            return
        value = float(loss.detach())
        self.loss_avg = value if self.loss_avg is None else 0.9 * self.loss_avg + 0.1 * value
        now = time.time()
        ips = (run.global_step - self.tick_step) * run.cfg.batch_size * run.ctx.world_size / max(now - self.tick, 1e-9)
        done = run.global_step - self.step0
        eta = (now - self.t0) / max(done, 1) * (self.total - run.global_step)
        lr = run.optimizer.param_groups[0]["lr"]
        log.info("epoch %d step %d/%d loss %.4f lr %.5f %.0f img/s eta %s", epoch + 1, run.global_step, self.total,
                 self.loss_avg, lr, ips, _hms(eta))
        self.write({"type": "step", "epoch": epoch + 1, "step": run.global_step, "loss": value,
                    "loss_avg": self.loss_avg, "lr": lr, "images_per_s": ips})
        self.tick, self.tick_step = now, run.global_step


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class VerificationCallback:
    """Accuracy on the dataset's .bin targets (rank 0), with the best so far."""

    def __init__(self, run: Run):
        from utils.verification import VerificationSet

        self.sets = []
        image_size = _image_size(run.dataset)
        for name, path in paths.bin_paths(run.cfg).items():
            if path.exists():
                self.sets.append(VerificationSet(name, path, image_size=(image_size, image_size)))
            else:
                log.warning("verification target %s: %s not found, skipped", name, path)

    def __call__(self, run: Run) -> dict:
        results = {}
        if not run.ctx.is_main or not self.sets:
            return results
        from utils.verification import format_table

        for vs in self.sets:
            res = vs.run(run.backbone, batch_size=run.cfg.eval_batch_size, device=run.ctx.device,
                         dtype=run.ctx.amp_dtype)
            results[vs.name] = res
            best = run.best.get(vs.name, 0.0)
            run.best[vs.name] = max(best, res["accuracy_mean"])
        log.info("verification at step %d:\n%s\nbest so far: %s", run.global_step, format_table(results),
                 ", ".join(f"{k} {100 * v:.3f}" for k, v in run.best.items()))
        return results


def assemble_history(cfg, fingerprint: Fingerprint):
    """probs/epoch_XXX.npz -> prob_history.npy (E, N) and topk_logits.npz (E, N, k), with manifests."""
    out = paths.original_dir(cfg, cfg.network, cfg.loss)
    files = [out / "probs" / f"epoch_{e:03d}.npz" for e in range(1, cfg.num_epoch + 1)]
    missing = [str(f) for f in files if not is_complete(f, fingerprint)]
    if missing:
        raise ArtifactError(f"probability records missing for {len(missing)} epochs, e.g. {missing[0]}")
    epochs = [read_array(f) for f in files]
    history = np.stack([e["gt_prob_with_margin"] for e in epochs])
    save_array(out / "prob_history.npy", history, "train_everything", fingerprint, cfg, inputs=files,
               info={"shape": list(history.shape), "meaning": "P[epoch, sample]: labelled-class probability "
                     "with margin during training; NaN = not seen that epoch"})
    if "topk_logits" in epochs[0]:
        keys = [k for k in ("topk_logits", "topk_index", "rest_mean_logit", "label_logit") if k in epochs[0]]
        save_array(out / "topk_logits.npz", {k: np.stack([e[k] for e in epochs]) for k in keys}, "train_everything",
                   fingerprint, cfg, inputs=files, info={"k": cfg.record_topk})
