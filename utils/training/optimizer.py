"""The paper's optimizer and learning-rate schedule: SGD over two parameter groups (backbone, head), linear warm-up
then step decay.
"""
from __future__ import annotations

import torch

HEAD_GROUP = 1  # the optimizer's param group of the head (make_sgd: [backbone, head])


def lr_factor(cfg, steps_per_epoch: int):
    """Per-step lr multiplier: linear warm-up, then x lr_decay at each epoch of lr_steps."""
    warmup = cfg.warmup_epoch * steps_per_epoch

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        epoch = step / steps_per_epoch
        return cfg.lr_decay ** sum(epoch >= s for s in cfg.lr_steps)

    return factor


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


def epoch_lr_factor(cfg, epoch: int, step: int, steps: int) -> float:
    """`lr_factor`'s schedule with the position counted in epochs, for epochs of varying length (dynamic pruning):
    step `step` of `steps` in epoch `epoch` (from 0) is at epoch + step / steps. Warm-up rises linearly over the
    first `warmup_epoch` epochs, and lr is multiplied by lr_decay at each epoch of lr_steps, as with equal epochs."""
    steps = max(1, steps)
    position = epoch + step / steps
    if position < cfg.warmup_epoch:
        return (epoch + (step + 1) / steps) / cfg.warmup_epoch
    return cfg.lr_decay ** sum(position >= s for s in cfg.lr_steps)
