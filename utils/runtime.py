"""Process-level plumbing shared by every stage: logging, torch.distributed, device and precision, exit codes.

A stage script is `run_stage("name", main)`: it parses the config, initialises logging (rank 0 writes
the log file), logs every resolved key, calls `main(cfg, ctx)`, and turns user errors into a clear
message and a non-zero exit instead of a traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from config.config import Config, parse_config, to_json

log = logging.getLogger("diffprob")


class UserError(Exception):
    """Something the user can fix (bad input, missing file); printed without a traceback, exit 1."""


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


def pick_device(cfg: Config, local_rank: int = 0) -> torch.device:
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device=cuda but no CUDA GPU is visible (use --device cpu or auto)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_amp_dtype(cfg: Config, device: torch.device):
    """The autocast dtype (None = fp32): bf16 where the GPU has it, fp16 + grad scaler on older GPUs."""
    if device.type != "cuda":
        if cfg.dtype in ("fp16", "bf16"):
            log.warning("dtype=%s asked for on CPU: running fp32 (CPU autocast is slower than fp32 here)", cfg.dtype)
        return None
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]


def init_context(cfg: Config) -> Context:
    """Join the torchrun process group when launched by torchrun, else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg, local_rank)
    if device.type == "cpu":
        # DataLoader workers and torch's intra-op threads share the cores: oversubscribing them made
        # CPU training 3x slower on 2 cores. Leave one core per worker (and per local rank).
        per_rank = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        torch.set_num_threads(max(1, per_rank - cfg.num_workers))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank, world_size, local_rank, device, pick_amp_dtype(cfg, device))


def seed_everything(seed: int, rank: int = 0):
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def barrier(ctx: Context):
    if ctx.distributed:
        dist.barrier()


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


# ---------------------------------------------------------------------------------------- the stage
def _rank0_code(ctx: Context, code: int) -> int:
    t = torch.tensor([code], dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def run_stage(name: str, main, description: str = "", extra_args=None, argv=None, distributed: bool = False):
    """Parse the config, run `main(cfg, ctx[, args])`, exit 0 on success, 1 on a user error.

    Under torchrun, a stage that is not `distributed` (pruning, cleaning, evaluation) runs on rank 0
    while the other ranks wait, so files are written once.
    """
    from utils.artifacts import ArtifactError

    parsed = parse_config(argv, description=description or name, extra=extra_args)
    cfg, args = parsed if extra_args is not None else (parsed, None)
    ctx, result, code = None, None, 1  # 1 until main() returns: a crash is never reported as success
    try:
        ctx = init_context(cfg)
        init_logging(ctx.rank)
        log.info("%s: world_size=%d device=%s amp=%s", name, ctx.world_size, ctx.device, ctx.amp_dtype)
        log.info("resolved config:\n%s", to_json(cfg))
        t0 = time.time()
        if distributed or ctx.is_main:
            result = main(cfg, ctx, args) if extra_args is not None else main(cfg, ctx)
        code = 0
        log.info("%s finished in %.1f s", name, time.time() - t0)
    except (UserError, ArtifactError, FileNotFoundError, ValueError) as e:
        # ValueError: the libraries' input checks (pruning, RecordIO, IJB meta), all worded for users
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else f"missing file {e.filename}"
        print(f"{name}: error: {msg}", file=sys.stderr)
    finally:
        if dist.is_available() and dist.is_initialized():
            if not distributed and ctx is not None:
                code = _rank0_code(ctx, code)  # the waiting ranks exit as rank 0 did
            dist.destroy_process_group()
    if code:
        raise SystemExit(code)
    return result
