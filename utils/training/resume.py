"""What a training run saves after every epoch and how it resumes from it: `save_epoch` writes epoch_XXX.pt,
backbone.pth, one resume file per rank and last.pt; `resume` restores a run from them, also on another number of
processes (`resplit_resume_state`: the head's class shards and their momentum re-split).

`run` is the loop's `Run` (utils/training/loop.py).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from losses.sharded import resplit_rows
from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, Fingerprint
from utils.models.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.runtime.context import barrier
from utils.training.optimizer import HEAD_GROUP, keep_fused, lr_factor

log = logging.getLogger("diffprob")


def _resume_file(out: Path, rank: int, epoch: int) -> Path:
    return out / f"resume_rank{rank}_epoch{epoch:03d}.pt"


def save_epoch(run, epoch: int):
    """Epoch `epoch` (1-based, complete) -> epoch_XXX.pt (+ backbone.pth), per-rank resume files, last.pt.

    `last.pt` is written after every rank's resume file exists, so its presence marks a complete epoch.
    """
    cfg, ctx, out = run.cfg, run.ctx, run.out
    head_state = run.head.full_state_dict()  # collective: every rank takes part
    save_checkpoint(_resume_file(out, ctx.rank, epoch), {
        "epoch": epoch, "step": run.global_step, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": rng_state(),
        "head_shard": run.head.state_dict(), "best": run.best, "samples_per_epoch": list(run.samples_per_epoch),
        "interclass_filtered": list(run.interclass_filtered),
        **({"dynamic": run.dynamic.state_dict()} if run.dynamic is not None else {})})
    barrier(ctx)
    if ctx.is_main:
        light = {
            "backbone": run.backbone.state_dict(), "model": run.model_spec, "head": head_state, "head_info": run.head_info,
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


def resplit_resume_state(states: list, num_classes: int, world_size: int, rank: int, subcenters: int = 1) -> dict:
    """Rank `rank`'s resume state in a run of `world_size` processes, from the per-rank resume states
    `states` (in rank order) that a run of len(states) processes saved.

    The head's class shards (its weight and that weight's optimizer state, the momentum buffer) are
    joined in the old rank order and cut at the new rank's bounds (`class_split`; `subcenters` weight
    rows per class): bitwise the rows of the gathered head. The rest is the same on every rank and comes
    from old rank 0: DDP keeps the backbone's optimizer state identical on all ranks, the head's buffers
    are global-batch statistics, and the scheduler, scaler and step are global. The RNG state is the old rank's of the same number
    where there is one, else rank 0's. States of old ranks > 0 need only 'head_shard', the head group's
    'optimizer' state and 'rng'.
    """
    base = states[0]
    rows = [int(st["head_shard"]["head.weight"].shape[0]) for st in states]
    head = dict(base["head_shard"])
    head["head.weight"] = resplit_rows([st["head_shard"]["head.weight"] for st in states], num_classes, world_size,
                                       rank, subcenters)
    optimizer = {"state": dict(base["optimizer"]["state"]), "param_groups": base["optimizer"]["param_groups"]}
    for index in base["optimizer"]["param_groups"][HEAD_GROUP]["params"]:
        if index not in optimizer["state"]:
            continue
        entry = dict(optimizer["state"][index])
        for key, value in entry.items():
            parts = [st["optimizer"]["state"][index][key] for st in states]
            if all(torch.is_tensor(p) and p.dim() >= 1 and p.shape[0] == r for p, r in zip(parts, rows)):
                entry[key] = resplit_rows(parts, num_classes, world_size, rank, subcenters)
        optimizer["state"][index] = entry
    rng = states[rank]["rng"] if rank < len(states) else base["rng"]
    return {**base, "head_shard": head, "optimizer": optimizer, "rng": rng}


def _head_part(state: dict, keep_rng: bool) -> dict:
    """What `resplit_resume_state` needs of an old rank > 0 (its backbone optimizer state is rank 0's)."""
    ids = state["optimizer"]["param_groups"][HEAD_GROUP]["params"]
    return {"head_shard": state["head_shard"], "rng": state["rng"] if keep_rng else None,
            "optimizer": {"state": {i: v for i, v in state["optimizer"]["state"].items() if i in ids}}}


def resume(run):
    """`run` (prepared from scratch) as it was at the end of its newest complete epoch (last.pt); unchanged where
    there is none."""
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
        state = resplit_resume_state(states, run.dataset.num_classes, ctx.world_size, ctx.rank,
                                     run.head.head.subcenters)
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
    # images trained on per epoch (recorded since 2026-12-05; before: every epoch's full steps)
    run.samples_per_epoch = list(state.get("samples_per_epoch",
                                           [run.steps_per_epoch * cfg.batch_size * saved_world] * epoch))
    # samples inter-class filtering left out per epoch (runs saved before the key: none, 0 per epoch)
    run.interclass_filtered = list(state.get("interclass_filtered", [0] * epoch))
    saved_method = light.get("config", {}).get("dynamic_method", "none")
    if saved_method != cfg.dynamic_method or (run.dynamic is not None) != ("dynamic" in state):
        raise ArtifactError(f"{marker}: the run was trained with dynamic_method={saved_method}, not "
                            f"{cfg.dynamic_method}; resume it with the same method, or train with another --output")
    saved_filter = float(light.get("config", {}).get("interclass_filter", 0.0))
    if saved_filter != cfg.interclass_filter:
        raise ArtifactError(f"{marker}: the run was trained with interclass_filter={saved_filter:g}, not "
                            f"{cfg.interclass_filter:g}; resume it with the same threshold, or train with another "
                            f"--output")
    if run.dynamic is not None:
        run.dynamic.load_state_dict(state["dynamic"])
    if saved_world != ctx.world_size:
        _continue_schedule(run, epoch, fresh_lrs)
        log.info("resume: epoch %d of a run of %d processes continues on %d (the head's class shards and their "
                 "momentum re-split); global batch %d, lr %.5f; the data order of the remaining epochs is that of "
                 "%d processes", epoch, saved_world, ctx.world_size, cfg.batch_size * ctx.world_size,
                 run.optimizer.param_groups[0]["lr"], ctx.world_size)
    log.info("resumed from epoch %d (step %d) of %s", epoch, run.global_step, out)


def _continue_schedule(run, epoch: int, base_lrs: list):
    """The lr schedule of this run (its global batch, its steps per epoch) at the start of epoch `epoch`."""
    sched = run.scheduler
    sched.base_lrs = list(base_lrs)
    sched.last_epoch = epoch * run.steps_per_epoch
    factor = lr_factor(run.cfg, run.steps_per_epoch)(sched.last_epoch)
    for group, base in zip(run.optimizer.param_groups, base_lrs):
        group["initial_lr"], group["lr"] = base, base * factor
    sched._last_lr = [group["lr"] for group in run.optimizer.param_groups]
