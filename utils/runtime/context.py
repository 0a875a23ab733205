"""The process a stage runs in: device, autocast dtype, torch.distributed group, logging and seeds.

Every stage and library function that runs on a device takes a `Context`; one process (CPU or one
GPU) and torchrun (one process per GPU, NCCL; gloo on CPU) differ only in its fields.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from utils.models.embedding import amp_dtype
from utils.errors import UserError

log = logging.getLogger("diffprob")


# ------------------------------------------------------------------------------------------- logging
def init_logging(rank: int, output=None, filename: str = "training.log"):
    """Rank 0 logs to stdout (and `output/filename`); other ranks only warnings."""
    root = logging.getLogger("diffprob")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname).1s " + (f"[rank {rank}] " if rank else "") + "%(message)s",
                            datefmt="%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if rank == 0 and output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(output) / filename)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    return root


# ------------------------------------------------------------------------------------- distribution
@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    amp_dtype: torch.dtype = None  # None: fp32

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def pick_device(cfg, local_rank: int = 0) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA GPU is visible (use --device cpu or auto)")
        torch.cuda.set_device(local_rank)
        # Batches have one shape for a whole run: cuDNN times its algorithms once per shape and keeps the fastest.
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_amp_dtype(cfg, device: torch.device):
    """The autocast dtype (None = fp32) of `cfg.dtype` on `device` (see `utils.models.embedding.amp_dtype`)."""
    if device.type != "cuda" and cfg.dtype in ("fp16", "bf16"):
        log.warning("dtype=%s asked for on CPU: running fp32 (CPU autocast is slower than fp32 here)", cfg.dtype)
    return amp_dtype(cfg.dtype, device)


def cpu_threads(cfg, local_world_size: int = 1) -> int:
    """torch's intra-op threads for one CPU process: `cfg.threads`, or (0) the cores per local rank less one per
    DataLoader worker: workers and threads share the cores, and oversubscribing them made CPU training 3x slower
    on 2 cores."""
    if cfg.threads > 0:
        return cfg.threads
    per_rank = max(1, (os.cpu_count() or 1) // max(1, local_world_size))
    return max(1, per_rank - cfg.num_workers)


def init_context(cfg) -> Context:
    """Join the torchrun process group when launched by torchrun, else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg, local_rank)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, device, pick_amp_dtype(cfg, device))


def seed_everything(seed: int, rank: int = 0):
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def barrier(ctx: Context):
    if ctx.distributed:
        dist.barrier()


def all_ranks_sum(ctx: Context, value: int) -> int:
    """The sum of an integer over the ranks (itself in one process)."""
    if not ctx.distributed:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=ctx.device)
    dist.all_reduce(t)
    return int(t.item())


def gather_by_index(ctx: Context, sample_index: torch.Tensor, values: torch.Tensor, num_samples: int,
                    fill=float("nan")) -> np.ndarray:
    """Scatter per-sample values from all ranks into one array indexed by sample index.

    Exact: each sample lands once at its own index (padding duplicates carry index -1 and are
    dropped), samples no rank saw keep `fill` (NaN, not 0). `values` is (n,) or (n, k).
    Every rank gets the full array.
    """
    sample_index = sample_index.reshape(-1).long().cpu()
    values = values.detach().cpu()
    if ctx.distributed:
        # all_gather needs equal shapes: pad to the largest count, then cut each rank's part back.
        count = torch.tensor([sample_index.numel()], dtype=torch.long, device=ctx.device)
        counts = [torch.zeros_like(count) for _ in range(ctx.world_size)]
        dist.all_gather(counts, count)
        counts = [int(c) for c in counts]
        biggest = max(counts)
        pad_idx = torch.full((biggest,), -1, dtype=torch.long)
        pad_idx[: sample_index.numel()] = sample_index
        pad_val = torch.zeros((biggest,) + tuple(values.shape[1:]), dtype=values.dtype)
        pad_val[: values.shape[0]] = values
        parts_idx = [torch.empty_like(pad_idx, device=ctx.device) for _ in range(ctx.world_size)]
        parts_val = [torch.empty_like(pad_val, device=ctx.device) for _ in range(ctx.world_size)]
        dist.all_gather(parts_idx, pad_idx.to(ctx.device))
        dist.all_gather(parts_val, pad_val.to(ctx.device))
        sample_index = torch.cat([p[:c].cpu() for p, c in zip(parts_idx, counts)])
        values = torch.cat([p[:c].cpu() for p, c in zip(parts_val, counts)])
    idx = sample_index.numpy()
    vals = values.numpy()
    out = np.full((num_samples,) + vals.shape[1:], fill, dtype=vals.dtype if vals.dtype.kind == "f" else np.float64)
    keep = idx >= 0
    out[idx[keep]] = vals[keep]
    return out
