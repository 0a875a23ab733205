"""The training loop of a backbone + margin head: `prepare_run` (dataset, model, optimizer, schedule, and the
resumed state with --resume true), `train_one_epoch` over `train_step`, and the callbacks that report on it
(`ProgressLog`, `VerificationCallback`).

One process (CPU or one GPU) or torchrun with DDP; train_everything.py runs it epoch by epoch. What a run saves
after each epoch and how it resumes: utils/training/resume.py; what it records per sample: utils/training/recording.py;
the optimizer and its schedule: utils/training/optimizer.py.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from config.config import check_against_dataset
from utils.arrays import label_map_for
from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, Fingerprint, check_bins, load_kept_index, load_label_map
from utils.artifacts.records import load_relabel
from utils.data.datasets import PaddedDistributedSampler, collate_skip_bad, open_dataset
from utils.data.transforms import random_hflip
from utils.errors import UserError
from utils.evaluation.verification import VerificationSet, format_table
from utils.models.build import build_head, head_kwargs, model_kwargs, new_backbone
from utils.models.embedding import forward_uint8
from utils.runtime.context import Context, all_ranks_sum, seed_everything
from utils.selection.registry import RETRAIN_ONLY, get_method
from utils.training.dynamic import DynamicPruning
from utils.training.optimizer import epoch_lr_factor, lr_factor, make_sgd
from utils.training.recording import Recorder
from utils.training.resume import resume

log = logging.getLogger("diffprob")


# ----------------------------------------------------------------------------------- preparing a run
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
    model_spec: dict = None  # the checkpoints' "model": the backbone's name and constructor arguments
    head_info: dict = None  # the checkpoints' "head_info": the head's name, size and constructor arguments
    best: dict = field(default_factory=dict)
    skipped_images: int = 0  # undecodable images dropped in the last epoch (skip_bad_images)
    dynamic: DynamicPruning = None  # --dynamic_method other than none: the loss store and each epoch's plan
    samples_per_epoch: list = field(default_factory=list)  # images trained on in each epoch, all ranks
    interclass_filtered: list = field(default_factory=list)  # of those, left out of the loss (interclass_filter)


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
    if cfg.interclass_filter:
        head.set_interclass_filter(cfg.interclass_filter)
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
              scaler, steps_per_epoch, inputs=inputs, label_map=label_map, selection=selection_digest(dataset),
              dynamic=DynamicPruning(cfg, ctx, dataset.sample_index, dataset.num_images)
              if cfg.dynamic_method != "none" else None,
              model_spec={"name": cfg.network, "args": model_kwargs(cfg, image_size)},
              head_info={"name": cfg.loss, "in_features": cfg.embedding_size, "num_classes": dataset.num_classes,
                         "kwargs": head_kwargs(cfg)})
    if cfg.resume:
        resume(run)
    return run


def selection_digest(dataset) -> str:
    """sha256 of what a run trains on: which samples (the kept list) under which labels (label map, relabelling)."""
    digest = hashlib.sha256(np.ascontiguousarray(dataset.sample_index, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _image_size(dataset) -> int:
    size = getattr(getattr(dataset, "layout", None), "image_size", None)
    if size:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    img, _, _ = dataset[0]
    return int(img.shape[-1])


# ------------------------------------------------------------------------------------------ the loop
def train_step(backbone, head, optimizer, scaler, images, labels, *, device, amp_dtype=None,
               channels_last=False, grad_clip=0.0, clip_params=None, flip_gen=None, weights=None, per_sample=False):
    """One optimisation step on a uint8 batch: flip + scale on the device, autocast forward, margin
    head in fp32, (scaled) backward, gradient-norm clip of the backbone, SGD step. `weights` (b,) multiply the
    samples' losses before the mean (dynamic pruning).

    Returns (loss, gt_prob, embeddings), with `per_sample` also the samples' losses (b,), all still on the device
    (no host sync here).
    """
    embeddings = forward_uint8(backbone, images, device, amp_dtype, channels_last,
                               transform=lambda x: random_hflip(x, flip_gen))
    labels = labels.to(device, non_blocking=True)
    if per_sample:
        loss, gt_prob, sample_loss = head(embeddings, labels, weights, per_sample=True)
    else:
        loss, gt_prob = head(embeddings, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(clip_params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return (loss, gt_prob, embeddings, sample_loss) if per_sample else (loss, gt_prob, embeddings)


def train_one_epoch(run: Run, epoch: int, record: Recorder = None, on_step=None, on_epoch=None):
    """One epoch; `on_step(run, epoch, step, loss)` after every step, `on_epoch(steps)` once its length is known
    (dynamic pruning shortens an epoch to its plan)."""
    cfg, ctx = run.cfg, run.ctx
    run.train_backbone.train()
    run.head.train()
    run.sampler.set_epoch(epoch)
    dynamic, steps = run.dynamic, run.steps_per_epoch
    if dynamic is not None:  # this epoch's samples: the sampler walks them only, and the epoch is as long as they are
        plan = dynamic.begin(epoch)
        run.sampler.set_subset(None if plan.full else plan.kept)
        steps = len(run.loader) if cfg.max_steps_per_epoch <= 0 else min(len(run.loader), cfg.max_steps_per_epoch)
    if on_epoch is not None:
        on_epoch(steps)
    trained = 0
    filtering = cfg.interclass_filter > 0
    filtered = torch.zeros((), dtype=torch.long, device=ctx.device)  # summed on the device: no sync per step
    flip_gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 131 + ctx.rank)
    loss_sum = torch.zeros((), device=ctx.device)
    channels_last = cfg.channels_last
    clip_params = list(run.backbone.parameters())
    step = 0
    run.skipped_images = 0
    # CUDA graphs replay into the same output buffers: a new step frees the last one's outputs (read by then)
    graphs = cfg.compile and cfg.compile_mode == "reduce-overhead" and ctx.device.type == "cuda"
    for step, (images, labels, sample_index) in enumerate(run.loader):
        if step >= steps:
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
        trained += int((sample_index >= 0).sum())  # padding duplicates carry -1
        if dynamic is None:
            loss, gt_prob, embeddings = train_step(
                run.train_backbone, run.head, run.optimizer, run.scaler, images, labels, device=ctx.device,
                amp_dtype=ctx.amp_dtype, channels_last=channels_last, grad_clip=cfg.grad_clip, clip_params=clip_params,
                flip_gen=flip_gen)
        else:
            factor = epoch_lr_factor(cfg, epoch, step, steps)  # the schedule follows epochs, whatever their length
            for group in run.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            loss, gt_prob, embeddings, sample_loss = train_step(
                run.train_backbone, run.head, run.optimizer, run.scaler, images, labels, device=ctx.device,
                amp_dtype=ctx.amp_dtype, channels_last=channels_last, grad_clip=cfg.grad_clip, clip_params=clip_params,
                flip_gen=flip_gen, weights=dynamic.batch_weights(sample_index), per_sample=True)
            dynamic.add(sample_index, sample_loss)
        if filtering:  # the head's mask of this rank's rows; padding duplicates (index -1) are not counted
            filtered += (run.head.last_filtered & (sample_index.to(ctx.device, non_blocking=True) >= 0)).sum()
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
    if dynamic is not None:
        dynamic.end()  # the epoch's losses, gathered exactly, into the store the next epoch plans from
    run.samples_per_epoch.append(all_ranks_sum(ctx, trained))
    run.interclass_filtered.append(all_ranks_sum(ctx, int(filtered)) if filtering else 0)
    if filtering:
        log.info("epoch %d: interclass_filter %g left %d of the %d samples trained on out of the loss", epoch + 1,
                 cfg.interclass_filter, run.interclass_filtered[-1], run.samples_per_epoch[-1])
    return float(loss_sum) / max(1, min(steps, step + 1))


# ----------------------------------------------------------------------------------------- callbacks
class ProgressLog:
    """Throughput / loss / lr / ETA every `frequent` steps, a tqdm bar on rank 0, metrics.jsonl."""

    def __init__(self, run: Run):
        self.run = run
        # every epoch at full length, less what the epochs done so far fell short by (dynamic pruning); an epoch's
        # shortfall is taken off when it starts (`epoch_steps`)
        self.total = run.cfg.num_epoch * run.steps_per_epoch - (run.start_epoch * run.steps_per_epoch - run.global_step)
        self.t0 = time.time()
        self.step0 = run.global_step
        self.tick, self.tick_step = self.t0, run.global_step
        self.loss_avg = None
        self.bar = tqdm(total=self.total, initial=run.global_step, disable=not run.ctx.is_main,
                        desc="train", unit="step", mininterval=2, dynamic_ncols=True)
        self.metrics = run.out / "metrics.jsonl"
        self.tb = None
        if run.ctx.is_main:
            try:  # TensorBoard when it is installed (optional: imported only here); the JSONL file always
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

    def epoch_steps(self, steps: int):
        """An epoch of `steps` steps starts: the bar's total and the ETA count it at its length."""
        self.total -= self.run.steps_per_epoch - steps
        self.bar.total = self.total
        self.bar.refresh()

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
        for vs in self.sets:
            res = vs.run(run.backbone, batch_size=run.cfg.eval_batch_size, device=run.ctx.device,
                         dtype=run.ctx.amp_dtype)
            results[vs.name] = res
            best = run.best.get(vs.name, 0.0)
            run.best[vs.name] = max(best, res["accuracy_mean"])
        log.info("verification at step %d:\n%s\nbest so far: %s", run.global_step, format_table(results),
                 ", ".join(f"{k} {100 * v:.3f}" for k, v in run.best.items()))
        return results
