"""Training of a backbone + margin head: one process (CPU or one GPU) or torchrun with DDP.

The loop itself is short; what it needs is prepared by `prepare_run` (dataset, model, optimizer,
schedule, resume state) and reported through small callbacks (log line, verification, checkpoint).
With `is_original_train=True` every epoch also records, per sample, the labelled-class probability
with margin as seen during that epoch (the DynUnc input) and the margin-free top-k logits (the
soft-label entropy input), gathered exactly across ranks into `probs/epoch_XXX.npz`.

Just over 600 lines: the loop, its resume (re-splitting the head's shards for another world size) and the
per-sample recording share the `Run` state and its checkpoint layout; they are sections of this module.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from config.config import check_against_dataset
from losses.sharded import resplit_rows
from utils.arrays import label_map_for
from utils.artifacts import paths
from utils.artifacts.files import (check_bins, ArtifactError, Fingerprint, atomic_path, is_complete, load_kept_index, load_label_map,
                             manifest_path, read_manifest, save_array, write_manifest)
from utils.models.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.runtime.context import Context, barrier, gather_by_index, seed_everything
from utils.data.datasets import PaddedDistributedSampler, collate_skip_bad, open_dataset
from utils.models.embedding import forward_uint8
from utils.errors import UserError
from utils.models.build import build_head, head_kwargs, model_kwargs, new_backbone
from utils.artifacts.records import load_relabel, npz_headers
from utils.selection.registry import RETRAIN_ONLY, get_method
from utils.data.transforms import random_hflip

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
    if cfg.is_original_train or (cfg.coreset_method == "full" and not cfg.kept_index):
        return None, None, []
    if not cfg.kept_index and cfg.coreset_method not in RETRAIN_ONLY:
        get_method(cfg.coreset_method)  # an unknown method is refused here, naming the valid ones
    kept_path = paths.kept_index_path(cfg)
    legacy = paths.legacy_coreset_dir(cfg) / "kept_index.npy"
    if not cfg.kept_index and not kept_path.exists() and legacy.exists():
        raise ArtifactError(f"{legacy} is where earlier versions wrote kept lists; they now live under the model "
                            f"that scored them: {kept_path}. Move the folder there, or give --kept_index {legacy}")
    kept = load_kept_index(kept_path, fingerprint, plain=bool(cfg.kept_index))  # --kept_index: a plain .npy too
    # --kept_index without --label_map: not the map of the --coreset_method folder, which goes with another list
    map_path = paths.label_map_path(cfg) if cfg.label_map or not cfg.kept_index else None
    if map_path is not None and map_path.exists():
        label_map = load_label_map(map_path, fingerprint)
        return kept, label_map, [kept_path, map_path]
    # A released kept list comes without a label map: derive it from the identities the list keeps.
    return kept, label_map_for(kept, labels), [kept_path]


def relabelled(cfg, dataset):
    """The full dataset with cleaning's flagged samples moved to their suggested label."""
    path = paths.clean_dir(cfg) / "relabel.npz"
    if not path.exists():
        raise ArtifactError(f"missing {path}: run clean_trainset.py --relabel true first")
    index, suggested = load_relabel(path, dataset)
    log.info("relabel: %d flagged samples take their suggested label", index.size)
    return dataset.with_labels(index, suggested)


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
    selection: str = ""  # selection_digest: the samples and labels trained on
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
    head = build_head(cfg.loss, cfg.embedding_size, dataset.num_classes, ctx,
                      {**head_kwargs(cfg), "sample_rate": cfg.sample_rate, "sample_seed": cfg.seed}).to(ctx.device)
    if cfg.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    train_backbone = backbone
    if cfg.compile:
        train_backbone = torch.compile(train_backbone, mode=cfg.compile_mode)
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
    optimizer = make_sgd(backbone, head, ctx.device, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp_dtype == torch.float16)
    run = Run(cfg, ctx, out, dataset, loader, sampler, backbone, train_backbone, head, optimizer, scheduler,
              scaler, steps_per_epoch, inputs=inputs, label_map=label_map, selection=selection_digest(dataset))
    if cfg.resume:
        _resume(run)
    return run


def selection_digest(dataset) -> str:
    """sha256 of what a run trains on: which samples (the kept list) under which labels (label map, relabelling)."""
    digest = hashlib.sha256(np.ascontiguousarray(dataset.sample_index, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def make_sgd(backbone, head, device: torch.device, *, lr: float, momentum: float, weight_decay: float):
    """SGD over two parameter groups (backbone, head): the paper's optimizer, as one fused kernel on CUDA.

    The fused step is the same update as the loop over tensors, up to the order of float operations. On CPU
    the loop over tensors is kept: the tests' bitwise resume checks hold for it.
    """
    return torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=lr,
                           momentum=momentum, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


def keep_fused(optimizer):
    """After `load_state_dict`, which copies the saving run's `fused` / `foreach` into the groups (a checkpoint
    written on CPU resumed on a GPU, or the reverse): back to this optimizer's own choice."""
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = optimizer.defaults["fused"], optimizer.defaults["foreach"]


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
                                          "fingerprint": run.dataset.fingerprint.to_dict(), "selection": run.selection})
        if not cfg.is_original_train and epoch > 1:  # retrained models keep only the newest epoch
            paths.epoch_checkpoint(out, epoch - 1).unlink(missing_ok=True)
    barrier(ctx)
    if epoch > 1:
        _resume_file(out, ctx.rank, epoch - 1).unlink(missing_ok=True)
    if ctx.is_main:  # resume files of ranks this run does not have (an earlier run of more processes)
        for f in out.glob("resume_rank*_epoch*.pt"):
            if int(f.name[len("resume_rank"):].split("_")[0]) >= ctx.world_size:
                f.unlink(missing_ok=True)


HEAD_GROUP = 1  # the optimizer's param group of the head (prepare_run: [backbone, head])


def resplit_resume_state(states: list, num_classes: int, world_size: int, rank: int) -> dict:
    """Rank `rank`'s resume state in a run of `world_size` processes, from the per-rank resume states
    `states` (in rank order) that a run of len(states) processes saved.

    The head's class shards (its weight and that weight's optimizer state, the momentum buffer) are
    joined in the old rank order and cut at the new rank's bounds (`class_split`): bitwise the rows of
    the gathered head. The rest is the same on every rank and comes from old rank 0: DDP keeps the
    backbone's optimizer state identical on all ranks, the head's buffers are global-batch statistics,
    and the scheduler, scaler and step are global. The RNG state is the old rank's of the same number
    where there is one, else rank 0's. States of old ranks > 0 need only 'head_shard', the head group's
    'optimizer' state and 'rng'.
    """
    base = states[0]
    rows = [int(st["head_shard"]["head.weight"].shape[0]) for st in states]
    head = dict(base["head_shard"])
    head["head.weight"] = resplit_rows([st["head_shard"]["head.weight"] for st in states], num_classes, world_size, rank)
    optimizer = {"state": dict(base["optimizer"]["state"]), "param_groups": base["optimizer"]["param_groups"]}
    for index in base["optimizer"]["param_groups"][HEAD_GROUP]["params"]:
        if index not in optimizer["state"]:
            continue
        entry = dict(optimizer["state"][index])
        for key, value in entry.items():
            parts = [st["optimizer"]["state"][index][key] for st in states]
            if all(torch.is_tensor(p) and p.dim() >= 1 and p.shape[0] == r for p, r in zip(parts, rows)):
                entry[key] = resplit_rows(parts, num_classes, world_size, rank)
        optimizer["state"][index] = entry
    rng = states[rank]["rng"] if rank < len(states) else base["rng"]
    return {**base, "head_shard": head, "optimizer": optimizer, "rng": rng}


def _head_part(state: dict, keep_rng: bool) -> dict:
    """What `resplit_resume_state` needs of an old rank > 0 (its backbone optimizer state is rank 0's)."""
    ids = state["optimizer"]["param_groups"][HEAD_GROUP]["params"]
    return {"head_shard": state["head_shard"], "rng": state["rng"] if keep_rng else None,
            "optimizer": {"state": {i: v for i, v in state["optimizer"]["state"].items() if i in ids}}}


def _resume(run: Run):
    out, ctx, cfg = run.out, run.ctx, run.cfg
    marker = out / "last.pt"
    if not marker.exists():
        log.info("resume: no complete epoch in %s, starting from scratch", out)
        return
    last = load_checkpoint(marker)
    if Fingerprint.from_dict(last["fingerprint"]) != run.dataset.fingerprint:
        raise ArtifactError(f"{marker} belongs to another dataset or kept list; use another --output")
    if last.get("selection", run.selection) != run.selection:  # (runs before 2026-12-05 recorded none)
        raise ArtifactError(f"{marker} was trained on another kept list or label map than the one given now; resume it "
                            f"with the list it was trained on, or train this one with another --output")
    epoch, saved_world = int(last["epoch"]), int(last["world_size"])
    light = load_checkpoint(paths.epoch_checkpoint(out, epoch))
    if saved_world == ctx.world_size:
        state = load_checkpoint(_resume_file(out, ctx.rank, epoch))
    else:
        files = [_resume_file(out, r, epoch) for r in range(saved_world)]
        lost = [str(f) for f in files if not f.exists()]
        if lost:
            raise ArtifactError(f"{marker} names a run of {saved_world} processes, but its resume files {lost} are "
                                f"missing; they hold the head's class shards and their optimizer state")
        states = [load_checkpoint(files[0])]
        states += [_head_part(load_checkpoint(f), r == ctx.rank) for r, f in enumerate(files[1:], start=1)]
        state = resplit_resume_state(states, run.dataset.num_classes, ctx.world_size, ctx.rank)
        del states
    fresh_lrs = [group["initial_lr"] for group in run.optimizer.param_groups]  # for this run's global batch
    run.backbone.load_state_dict(light["backbone"])
    run.head.load_state_dict(state["head_shard"])
    run.optimizer.load_state_dict(state["optimizer"])
    keep_fused(run.optimizer)
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    run.start_epoch, run.global_step, run.best = epoch, state["step"], state.get("best", {})
    if saved_world != ctx.world_size:
        _continue_schedule(run, epoch, fresh_lrs)
        log.info("resume: epoch %d of a run of %d processes continues on %d (the head's class shards and their "
                 "momentum re-split); global batch %d, lr %.5f; the data order of the remaining epochs is that of "
                 "%d processes", epoch, saved_world, ctx.world_size, cfg.batch_size * ctx.world_size,
                 run.optimizer.param_groups[0]["lr"], ctx.world_size)
    log.info("resumed from epoch %d (step %d) of %s", epoch, run.global_step, out)


def _continue_schedule(run: Run, epoch: int, base_lrs: list):
    """The lr schedule of this run (its global batch, its steps per epoch) at the start of epoch `epoch`."""
    sched = run.scheduler
    sched.base_lrs = list(base_lrs)
    sched.last_epoch = epoch * run.steps_per_epoch
    factor = lr_factor(run.cfg, run.steps_per_epoch)(sched.last_epoch)
    for group, base in zip(run.optimizer.param_groups, base_lrs):
        group["initial_lr"], group["lr"] = base, base * factor
    sched._last_lr = [group["lr"] for group in run.optimizer.param_groups]


# --------------------------------------------------------------------------------------- the loop
def record_kind(cfg) -> dict:
    """What the recorded labelled-class probability is (manifest info of the records)."""
    if cfg.sample_rate < 1:
        prob = ("full softmax over every class, from a no-grad scoring pass at each step (eval-mode margin, "
                "frozen statistics); the loss used the Partial FC sampled softmax")
    else:
        prob = "full softmax over every class, from the training forward"
    return {"sample_rate": cfg.sample_rate, "recorded_prob": prob}


class Recorder:
    """Per-sample values seen during one epoch, gathered exactly at its end.

    `full_prob`: record the full-softmax probability of a scoring pass instead of the training forward's
    (Partial FC sampling: the forward's is the sampled softmax's, see `record_kind`)."""

    def __init__(self, topk: int, full_prob: bool = False):
        self.topk = topk
        self.full_prob = full_prob
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
                       run.dataset.fingerprint, run.cfg,
                       info={"epoch": epoch, "seen": int(np.isfinite(prob).sum()), **record_kind(run.cfg)})


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
    channels_last = cfg.channels_last
    clip_params = list(run.backbone.parameters())
    step = 0
    run.skipped_images = 0
    # CUDA graphs replay into the same output buffers: a new step frees the last one's outputs (read by then)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead" and ctx.device.type == "cuda"
    for step, (images, labels, sample_index) in enumerate(run.loader):
        if step >= run.steps_per_epoch:
            break
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
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
            if record.topk > 0 or record.full_prob:
                with torch.no_grad():
                    scores = run.head.score(embeddings.detach().float(), labels.to(ctx.device), topk=record.topk)
            record.add(sample_index, scores["gt_prob_with_margin"] if record.full_prob else gt_prob,
                       scores if record.topk > 0 else None)
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
        from utils.evaluation.verification import VerificationSet

        self.sets = []
        image_size = _image_size(run.dataset)
        check_bins(run.cfg)
        for name, path in paths.bin_paths(run.cfg).items():
            if path.exists():
                self.sets.append(VerificationSet(name, path, image_size=(image_size, image_size)))
            else:
                log.warning("verification target %s: %s not found, skipped", name, path)

    def __call__(self, run: Run) -> dict:
        results = {}
        if not run.ctx.is_main or not self.sets:
            return results
        from utils.evaluation.verification import format_table

        for vs in self.sets:
            res = vs.run(run.backbone, batch_size=run.cfg.eval_batch_size, device=run.ctx.device,
                         dtype=run.ctx.amp_dtype)
            results[vs.name] = res
            best = run.best.get(vs.name, 0.0)
            run.best[vs.name] = max(best, res["accuracy_mean"])
        log.info("verification at step %d:\n%s\nbest so far: %s", run.global_step, format_table(results),
                 ", ".join(f"{k} {100 * v:.3f}" for k, v in run.best.items()))
        return results


RECORD_ARRAYS = ("gt_prob_with_margin", "topk_logits", "topk_index", "rest_mean_logit", "label_logit")


def _check_epoch_records(files, fingerprint: Fingerprint, num_classes: int) -> dict:
    """{name: (per-epoch shape, dtype)} the epoch files agree on; an ArtifactError names the first file that
    does not hold one epoch of this dataset (wrong epoch in its manifest, wrong sample count, a top-k
    wider than the classes, arrays missing). Only headers are read."""
    n = fingerprint.num_images
    expected = None
    for epoch, f in enumerate(files, start=1):
        found = read_manifest(f).get("info", {}).get("epoch")
        if found is not None and int(found) != epoch:
            raise ArtifactError(f"{f}: its manifest says epoch {found}, expected {epoch}")
        heads = {k: v for k, v in npz_headers(f).items() if k in RECORD_ARRAYS}
        prob = heads.get("gt_prob_with_margin")
        if prob is None or prob[0] != (n,):
            raise ArtifactError(f"{f}: expected gt_prob_with_margin of shape ({n},) (one value per sample of the "
                                f"dataset), found {None if prob is None else prob[0]}")
        if "topk_logits" in heads:
            k = heads["topk_logits"][0][-1]
            want = {"topk_logits": (n, k), "topk_index": (n, k), "rest_mean_logit": (n,),
                    **({"label_logit": (n,)} if "label_logit" in heads else {})}  # recorded since 2026-12
            bad = {name: heads.get(name, (None,))[0] for name, shape in want.items()
                   if heads.get(name, (None,))[0] != shape}
            if bad:
                raise ArtifactError(f"{f}: expected top-k arrays of shapes {want}, found {bad}")
            if k > num_classes:
                raise ArtifactError(f"{f}: top-{k} logits recorded, but the dataset has {num_classes} classes")
        layout = {name: (shape, dtype) for name, (shape, dtype, _) in heads.items()}
        if expected is None:
            expected = layout
        elif {k: v[0] for k, v in layout.items()} != {k: v[0] for k, v in expected.items()}:
            raise ArtifactError(f"{f}: holds arrays {layout}, epoch 1 holds {expected}")
    return expected


def _stream_npy_member(zf, name: str, shape, dtype, parts):
    """Write one .npy member of an uncompressed .npz from `parts`, C-ordered slices along the first axis."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(shape)})
        for part in parts:
            member.write(np.ascontiguousarray(part, dtype=dtype).data)


def assemble_history(cfg, fingerprint: Fingerprint):
    """probs/epoch_XXX.npz -> prob_history.npy (E, N) and topk_logits.npz (E, N, k), with manifests.

    Streamed: one epoch file is read at a time and written into its row of the outputs, so memory does
    not grow with the number of epochs (Glint360K, 20 epochs: 1.4 GB and 21 GB of outputs). Every epoch
    file is checked first (headers only); each output is written under a temporary name and renamed,
    and its manifest is written last, so a failure leaves no output that looks complete.
    """
    out = paths.original_dir(cfg, cfg.network, cfg.loss)
    files = [out / "probs" / f"epoch_{e:03d}.npz" for e in range(1, cfg.num_epoch + 1)]
    missing = [str(f) for f in files if not is_complete(f, fingerprint)]
    if missing:
        raise ArtifactError(f"probability records missing for {len(missing)} epochs, e.g. {missing[0]}")
    layout = _check_epoch_records(files, fingerprint, fingerprint.num_classes)
    epochs, n = len(files), fingerprint.num_images
    hist_path, topk_path = out / "prob_history.npy", out / "topk_logits.npz"
    for path in (hist_path, topk_path):  # an old manifest must not vouch for a half-replaced file
        manifest_path(path).unlink(missing_ok=True)

    with atomic_path(hist_path) as tmp:
        history = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(epochs, n))
        for e, f in enumerate(files):
            with np.load(f) as z:
                history[e] = z["gt_prob_with_margin"]
        history.flush()
        del history
    write_manifest(hist_path, "train_everything", fingerprint, cfg, inputs=files,
                   info={"shape": [epochs, n], "meaning": "P[epoch, sample]: labelled-class probability with margin "
                         "during training; NaN = not seen that epoch", **record_kind(cfg)})
    if "topk_logits" not in layout:
        return

    def per_epoch(name):
        for f in files:
            with np.load(f) as z:
                yield z[name]

    with atomic_path(topk_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in ("topk_logits", "topk_index", "rest_mean_logit", "label_logit"):
            if name not in layout:  # label_logit: absent from records of earlier versions
                continue
            shape, dtype = layout[name]
            _stream_npy_member(zf, name, (epochs, *shape), dtype, per_epoch(name))
    write_manifest(topk_path, "train_everything", fingerprint, cfg, inputs=files,
                   info={"k": int(layout["topk_logits"][0][-1]), "shape": [epochs, n, int(layout["topk_logits"][0][-1])],
                         **record_kind(cfg)})
