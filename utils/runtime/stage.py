"""How every stage script runs: `run_stage("name", main)`.

It parses the config (defaults of config/config.py + command-line overrides), sets up the process
(`utils.runtime.context`: device, precision, torchrun group, logging), logs every resolved key, calls
`main(cfg, ctx)`, and turns the project's own errors (`utils.errors.ToolkitError`) into one line on
stderr and exit status 1; so are a folder or file the user cannot write (permission, read-only file system, full
disk: the path and the reason) and Ctrl-C (exit 130; every output is written whole or not at all, so a rerun
continues). Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from config.config import parse_config, to_json
from utils.runtime.context import Context, init_context, init_logging
from utils.errors import ToolkitError
from utils.artifacts.files import all_or_nothing
from utils.artifacts.locking import LockError, OutputLock

log = logging.getLogger("diffprob")


# What a user's file system, not a bug, causes: one line naming the path (a full disk while writing an artifact is
# reported by utils/artifacts/files.py with the artifact's name).
_USER_OS_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _rank0_code(ctx: Context, code: int) -> int:
    t = torch.tensor([code], dtype=torch.int64, device=ctx.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def _lock_on_rank0(ctx: Context, folder, name: str):
    """Rank 0 locks `folder`; every rank learns whether it could, so none starts work without the lock."""
    lock, error = None, None
    if ctx.is_main:
        lock = OutputLock(folder, what=f"{name}.py")
        try:
            lock.acquire()
        except LockError as e:
            lock, error = None, e
    if ctx.distributed and _rank0_code(ctx, 0 if error is None else 1):
        raise error if error is not None else LockError(f"{folder} is in use by another run (see rank 0)")
    if error is not None:
        raise error
    return lock


def _clear_progress_bars():
    """Close the progress bars a failed stage left open, cleared, so that its error line stands on a line of its
    own and is the last thing it prints (an open bar is otherwise redrawn at exit, after the error)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.leave = False
        bar.close()


def run_stage(name: str, main, description: str = "", extra_args=None, argv=None, distributed: bool = False,
              lock_dir=None, preset_needed: bool = False, all_at_once: bool = True):
    """Parse the config, run `main(cfg, ctx[, args])`, exit 0 on success, 1 on a user error.

    Under torchrun, a stage that is not `distributed` (pruning, cleaning, evaluation) runs on rank 0
    while the other ranks wait, so files are written once. `lock_dir(cfg)` names the folder the stage
    writes: it is locked for the run (utils/artifacts/locking.py), so a second run on it stops at once.
    `preset_needed`: the stage reads the dataset preset (training: the schedule; verification: the targets).
    `all_at_once`: the stage's outputs replace the previous ones together when it succeeds, or not at all
    (`utils.artifacts.files.all_or_nothing`); training commits its checkpoints epoch by epoch instead.
    """
    parsed = parse_config(argv, description=description or name, extra=extra_args, preset_needed=preset_needed,
                          stage=name)
    cfg, args = parsed if extra_args is not None else (parsed, None)
    ctx, result, code, lock = None, None, 1, None  # 1 until main() returns: a crash is never reported as success
    try:
        ctx = init_context(cfg)
        if lock_dir is not None:
            lock = _lock_on_rank0(ctx, lock_dir(cfg), name)
        init_logging(ctx.rank)
        log.info("%s: world_size=%d device=%s amp=%s", name, ctx.world_size, ctx.device, ctx.amp_dtype)
        log.info("resolved config:\n%s", to_json(cfg))
        t0 = time.time()
        if distributed or ctx.is_main:
            with all_or_nothing() if all_at_once else contextlib.nullcontext():
                result = main(cfg, ctx, args) if extra_args is not None else main(cfg, ctx)
        code = 0
        log.info("%s finished in %.1f s", name, time.time() - t0)
    except ToolkitError as e:
        # The project's own errors are worded for users: one line, no traceback. Anything else is a bug.
        _clear_progress_bars()
        print(f"{name}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, even if e's has several
    except OSError as e:
        if e.errno not in _USER_OS_ERRORS:
            raise  # anything else is a bug: its traceback
        _clear_progress_bars()
        where = e.filename if e.filename is not None else "the output folder"
        print(f"{name}: error: cannot write {where}: {e.strerror or os.strerror(e.errno)}; choose an --output "
              f"this user can write to", file=sys.stderr)
    except KeyboardInterrupt:
        _clear_progress_bars()
        print(f"{name}: interrupted (Ctrl-C); every file it wrote is whole, and the same command continues",
              file=sys.stderr)
        code = 130
    finally:
        if lock is not None:
            lock.release()
        if dist.is_available() and dist.is_initialized():
            if not distributed and ctx is not None:
                code = _rank0_code(ctx, code)  # the waiting ranks exit as rank 0 did
            dist.destroy_process_group()
    if code:
        raise SystemExit(code)
    return result
