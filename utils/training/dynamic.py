"""Dynamic pruning inside training: which samples an epoch trains on, and with which loss weight, decided from the
losses training has seen so far. A method is one registry entry (`--dynamic_method NAME`); `none` trains every
sample with weight 1, bitwise as a run without this module.

The methods (epochs counted from 0; a *pruning epoch* is one with 1 <= epoch < dynamic_anneal * num_epoch: the
first has no loss to go by, and the last (1 - dynamic_anneal) of the epochs train on every sample, weight 1):

  infobatch  InfoBatch (Qin et al., ICLR 2024). A sample whose last loss is below the mean of the stored losses is
             dropped for the epoch with probability r = dynamic_ratio; the below-mean samples kept get weight
             1 / (1 - r), so the expected gradient is the full data's.
  ucb        Loss upper-confidence-bound selection (after Raju, Daruwalla and Lipasti, "Accelerating deep learning
             with dynamic data pruning", 2021). Each sample keeps an exponential moving mean and variance of its
             losses (decay dynamic_ema); an epoch trains on the ceil((1 - r) * n) samples with the highest
             mean + dynamic_ucb_c * std (ties: the lower index), weight 1. A sample never seen comes first.

Every decision reads the store (identical on every rank: losses are gathered exactly, as the recorder gathers its
probabilities) and a generator seeded by (seed, epoch): every rank takes the same kept set, and a resumed run takes
the kept sets an uninterrupted one would. Nothing here touches the global RNG. The store lives in the checkpoint.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from utils.runtime.context import Context, gather_by_index


@dataclass
class EpochPlan:
    """What one epoch trains on: `kept` (sorted int64 positions in the training set of `n` samples) and per-sample
    loss weights (float32, (n,); None: weight 1 for every sample)."""
    kept: np.ndarray
    weights: Optional[np.ndarray] = None
    n: int = 0

    @property
    def full(self) -> bool:
        return self.weights is None and self.kept.size == self.n


@dataclass(frozen=True)
class DynamicMethod:
    name: str
    title: str  # for tables and plots
    plan: Callable  # (state, epoch, cfg) -> EpochPlan, called on pruning epochs only
    reads: tuple = ()  # config keys it reads besides dynamic_method
    summary: str = ""


DYNAMIC_METHODS: dict = {}


def register_dynamic(name, *, title, reads=(), summary=""):
    def wrap(fn):
        DYNAMIC_METHODS[name] = DynamicMethod(name, title, fn, tuple(reads), summary)
        return fn
    return wrap


def dynamic_choices() -> tuple:
    """The values `--dynamic_method` accepts (config asks this)."""
    return ("none", *DYNAMIC_METHODS)


def dynamic_labels() -> dict:
    """{method: title} for the pipeline's tables, in the registry's order."""
    return {name: m.title for name, m in DYNAMIC_METHODS.items()}


def pruning_epochs(cfg) -> int:
    """How many epochs of `cfg` prune (as if a dynamic method were set)."""
    return sum(1 <= e < cfg.dynamic_anneal * cfg.num_epoch for e in range(cfg.num_epoch))


def ratio_for_cost(cfg, cost: float) -> float:
    """The dynamic_ratio at which a method that prunes that share of the samples in every pruning epoch (ucb)
    trains on `cost` of the full run's sample passes: num_epoch * (1 - cost) / pruning epochs. InfoBatch prunes
    only the samples below the mean loss, so at the same ratio it trains on more (its cost is measured, not
    assumed). ValueError when no ratio below 1 reaches `cost`."""
    epochs, pruning = cfg.num_epoch, pruning_epochs(cfg)
    ratio = epochs * (1.0 - cost) / pruning if pruning else float("inf")
    if not 0 <= ratio < 1:
        floor = 1 - pruning / epochs
        raise ValueError(f"a cost of {cost:.0%} is out of reach with {pruning} pruning epochs of {epochs} "
                         f"(dynamic_anneal={cfg.dynamic_anneal}): the lowest is {floor:.0%}")
    return ratio


class LossStore:
    """Per sample of the training set: the last loss seen (NaN: never seen), and the exponential moving mean and
    variance of its losses (ucb). All float64, identical on every rank; `state_dict()` is what the checkpoint
    holds."""

    def __init__(self, n: int):
        self.last = np.full(n, np.nan)
        self.mean = np.full(n, np.nan)
        self.var = np.zeros(n)

    @property
    def n(self) -> int:
        return self.last.size

    def update(self, losses: np.ndarray, decay: float):
        """Fold one epoch's losses in (n,), NaN where the sample was not trained on this epoch."""
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != self.last.shape:
            raise ValueError(f"LossStore: {losses.shape} losses for {self.n} samples")
        seen = np.isfinite(losses)
        first = seen & np.isnan(self.mean)
        again = seen & ~first
        self.last[seen] = losses[seen]
        self.mean[first] = losses[first]
        d = losses[again] - self.mean[again]
        self.mean[again] += (1 - decay) * d
        self.var[again] = decay * (self.var[again] + (1 - decay) * d * d)

    def state_dict(self) -> dict:
        return {"last": self.last.copy(), "mean": self.mean.copy(), "var": self.var.copy()}

    def load_state_dict(self, state: dict):
        for key in ("last", "mean", "var"):
            value = np.asarray(state[key], dtype=np.float64)
            if value.shape != (self.n,):
                raise ValueError(f"the checkpoint's dynamic-pruning store has {value.shape[0]} samples, this training "
                                 f"set {self.n}")
            setattr(self, key, value.copy())


def pruning_epoch(cfg, epoch: int) -> bool:
    """Epoch `epoch` (from 0) prunes: not the first (no loss seen yet), not the annealing tail."""
    return cfg.dynamic_method != "none" and 1 <= epoch < cfg.dynamic_anneal * cfg.num_epoch


def epoch_rng(cfg, epoch: int) -> np.random.Generator:
    """The one generator an epoch's decision draws from: seeded by (seed, epoch), the same on every rank."""
    return np.random.default_rng([int(cfg.seed), int(epoch), 0x1FB])


def plan_epoch(cfg, store: LossStore, epoch: int) -> EpochPlan:
    """The samples epoch `epoch` trains on and their weights."""
    n = store.n
    if not pruning_epoch(cfg, epoch):
        return EpochPlan(np.arange(n, dtype=np.int64), None, n)
    plan = DYNAMIC_METHODS[cfg.dynamic_method].plan(store, epoch, cfg)
    plan.n = n
    return plan


@register_dynamic("infobatch", title="InfoBatch", reads=("dynamic_ratio", "dynamic_anneal"),
                  summary="drop a below-mean-loss sample with probability r, weight the kept ones 1/(1-r)")
def infobatch(store: LossStore, epoch: int, cfg) -> EpochPlan:
    r = cfg.dynamic_ratio
    loss = store.last
    seen = np.isfinite(loss)
    mean = loss[seen].mean() if seen.any() else np.nan
    well_learned = seen & (loss < mean)
    draw = epoch_rng(cfg, epoch).random(store.n)
    dropped = well_learned & (draw < r)
    weights = np.ones(store.n, dtype=np.float32)
    weights[well_learned & ~dropped] = 1.0 / (1.0 - r)
    return EpochPlan(np.flatnonzero(~dropped).astype(np.int64), weights)


@register_dynamic("ucb", title="UCB", reads=("dynamic_ratio", "dynamic_anneal", "dynamic_ema", "dynamic_ucb_c"),
                  summary="train on the (1-r) share with the highest loss mean + c * std (moving averages)")
def ucb(store: LossStore, epoch: int, cfg) -> EpochPlan:
    keep = math.ceil((1.0 - cfg.dynamic_ratio) * store.n)
    score = store.mean + cfg.dynamic_ucb_c * np.sqrt(store.var)
    score = np.where(np.isnan(score), np.inf, score)  # never seen: first
    order = np.argsort(-score, kind="stable")  # highest first, ties by index
    return EpochPlan(np.sort(order[:keep]).astype(np.int64), None)


def dynamic_config_errors(cfg) -> list:
    """What is wrong with the dynamic-pruning keys of `cfg` (config asks this when it checks a config)."""
    if cfg.dynamic_method == "none":
        return []
    errors = []
    if not 0 <= cfg.dynamic_ratio < 1:
        errors.append(f"dynamic_ratio={cfg.dynamic_ratio} must be in [0, 1) (the share pruned)")
    if not 0 < cfg.dynamic_anneal <= 1:
        errors.append(f"dynamic_anneal={cfg.dynamic_anneal} must be in (0, 1] (the share of the epochs that prune)")
    reads = DYNAMIC_METHODS[cfg.dynamic_method].reads if cfg.dynamic_method in DYNAMIC_METHODS else ()
    if "dynamic_ema" in reads and not 0 <= cfg.dynamic_ema < 1:
        errors.append(f"dynamic_ema={cfg.dynamic_ema} must be in [0, 1)")
    if "dynamic_ucb_c" in reads and cfg.dynamic_ucb_c < 0:
        errors.append(f"dynamic_ucb_c={cfg.dynamic_ucb_c} must be >= 0")
    return errors


class DynamicPruning:
    """The training loop's side of dynamic pruning: `begin(epoch)` plans the epoch (the sampler's subset, the
    weights on the device), `add` keeps each batch's per-sample losses, `end` gathers them exactly across ranks
    into the store. `state_dict` / `load_state_dict`: what a resume file holds."""

    def __init__(self, cfg, ctx: Context, sample_index: np.ndarray, num_images: int):
        """`sample_index`: the dataset sample of each position of the training set (a kept list's samples); the
        store, the plans and the sampler work in positions, batches carry dataset sample indices."""
        self.cfg, self.ctx = cfg, ctx
        self.store = LossStore(len(sample_index))
        position = torch.full((num_images,), -1, dtype=torch.long)
        position[torch.as_tensor(np.asarray(sample_index, dtype=np.int64))] = torch.arange(len(sample_index))
        self.position = position.to(ctx.device)
        self._last = None  # (sample_index, its positions) of the last batch
        self.weights = None
        self.index, self.loss = [], []
        self.kept_masks = []  # per epoch begun: np.packbits of the kept mask (n bits), for dynamic_kept.npz
        self.epoch_losses = []  # per epoch ended: the losses gathered (float32, NaN: not trained on)

    def begin(self, epoch: int) -> EpochPlan:
        plan = plan_epoch(self.cfg, self.store, epoch)
        mask = np.zeros(self.store.n, dtype=bool)
        mask[plan.kept] = True
        del self.kept_masks[epoch:]  # a resumed run plans its epoch again
        self.kept_masks.append(np.packbits(mask))
        if self.ctx.distributed:  # every rank must walk the same subset: a disagreement is a bug, not a run to finish
            digest = int.from_bytes(hashlib.sha256(self.kept_masks[-1].tobytes()).digest()[:7], "little")
            both = torch.tensor([digest, -digest], dtype=torch.long, device=self.ctx.device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            if int(both[0]) != digest or int(both[1]) != -digest:
                raise RuntimeError(f"dynamic pruning: the ranks planned different samples for epoch {epoch + 1}")
        self.weights = None if plan.weights is None else torch.from_numpy(plan.weights).to(self.ctx.device)
        self.index, self.loss = [], []
        return plan

    def positions(self, sample_index: torch.Tensor) -> torch.Tensor:
        """Positions in the training set of a batch's dataset sample indices (-1, a padding duplicate: -1); the
        last batch's are kept, as `batch_weights` and `add` both ask for the same batch."""
        if self._last is not None and self._last[0] is sample_index:
            return self._last[1]
        index = sample_index.to(self.ctx.device, non_blocking=True)
        where = torch.where(index >= 0, self.position[index.clamp_min(0)], index)
        self._last = (sample_index, where)
        return where

    def batch_weights(self, sample_index: torch.Tensor):
        """(b,) loss weights of a batch (padding duplicates: weight 1), or None for weight 1 throughout."""
        if self.weights is None:
            return None
        where = self.positions(sample_index)
        return torch.where(where >= 0, self.weights[where.clamp_min(0)], torch.ones_like(self.weights[:1]))

    def add(self, sample_index: torch.Tensor, sample_loss: torch.Tensor):
        self.index.append(self.positions(sample_index))
        self.loss.append(sample_loss.detach())

    def end(self):
        n = self.store.n
        if self.index:
            losses = gather_by_index(self.ctx, torch.cat(self.index), torch.cat(self.loss).double(), n)
        else:
            losses = np.full(n, np.nan)
        self.store.update(losses, self.cfg.dynamic_ema)
        self.index, self.loss = [], []
        del self.epoch_losses[len(self.kept_masks) - 1:]
        self.epoch_losses.append(losses.astype(np.float32))

    def record(self) -> dict:
        """What dynamic_kept.npz holds: `kept` (epochs, n) bool, which samples each epoch planned to train on, and
        `loss` (epochs, n) float32, the losses each epoch gathered (NaN: not trained on), in training-set
        positions."""
        return {"kept": np.unpackbits(np.stack(self.kept_masks), axis=1, count=self.store.n).astype(bool),
                "loss": np.stack(self.epoch_losses)}

    def state_dict(self) -> dict:
        state = {k: torch.from_numpy(v) for k, v in self.store.state_dict().items()}
        state["kept_masks"] = torch.from_numpy(np.stack(self.kept_masks)) if self.kept_masks else torch.zeros(0)
        state["epoch_losses"] = torch.from_numpy(np.stack(self.epoch_losses)) if self.epoch_losses else torch.zeros(0)
        return state

    def load_state_dict(self, state: dict):
        state = {k: v.numpy() if torch.is_tensor(v) else v for k, v in state.items()}
        masks, losses = state.pop("kept_masks"), state.pop("epoch_losses")
        self.store.load_state_dict(state)
        self.kept_masks = [np.asarray(m, dtype=np.uint8) for m in masks] if masks.size else []
        self.epoch_losses = [np.asarray(x, dtype=np.float32) for x in losses] if losses.size else []
