"""How run_pipeline.py runs a stage script: a subprocess, or a forked copy of the pipeline.

A stage is a script (`train_everything.py --rec ... --output ...`); the pipeline runs it with its output
appended to `pipeline.log` and stops on a non-zero exit. Two runners do that with the same result:

  subprocess  `python script args`, a new interpreter. What torchrun needs, and what CUDA needs (a forked
              child cannot use CUDA once the parent has touched it).
  fork        on CPU runs under POSIX: the pipeline imports what the stages import once (`preload`), then
              each stage runs in an `os.fork()` child as `python script args` would (`runpy`, `__main__`,
              the same argv, working folder, environment and exit code), so a step no longer pays 3-5 s of
              imports (torch, and torch._dynamo that torch.optim.SGD imports on first use). The child is a
              process of its own: its state, threads, locks and memory end with it, as a subprocess's do.

The parent of a fork must not have run a torch operation (an OpenMP thread pool does not survive a fork)
nor touched CUDA; run_pipeline.py only imports torch and counts GPUs before the first step.
"""
from __future__ import annotations

import atexit
import logging
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

RUNNERS = ("auto", "fork", "subprocess")


def can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform != "darwin"  # macOS: fork without exec is unsafe with its frameworks


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or taskset may narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_jobs(asked, gpus: int, nproc: int) -> int:
    """How many trainings run at once: `asked` (a number, or 'auto': one per core, at most 8, on CPU runs in
    one process each); one on GPUs and under torchrun, where a training takes the whole device."""
    if asked == "auto":
        return 1 if gpus or nproc > 1 else max(1, min(8, usable_cores()))
    jobs = int(asked)
    if jobs < 1:
        raise ValueError(f"--jobs {asked}: expected a number >= 1 or auto")
    if jobs > 1 and (gpus or nproc > 1):
        raise ValueError(f"--jobs {jobs}: trainings run one at a time on GPUs and under torchrun (each takes the "
                         f"whole device); --jobs is for CPU runs")
    return jobs


def choose_runner(asked: str, gpus: int, nproc: int) -> str:
    """'fork' for CPU runs in one process on POSIX (unless asked otherwise), else 'subprocess'."""
    if asked not in RUNNERS:
        raise ValueError(f"runner {asked!r}: expected one of {RUNNERS}")
    if asked == "subprocess":
        return "subprocess"
    forkable = can_fork() and gpus == 0 and nproc == 1
    if asked == "fork" and not forkable:
        why = "this platform has no fork" if not can_fork() else \
            "a GPU is visible (CUDA does not survive a fork)" if gpus else "torchrun runs several processes"
        raise ValueError(f"--runner fork: {why}; use --runner subprocess")
    return "fork" if forkable else "subprocess"


def preload(scripts) -> None:
    """Import what `scripts` import (their `__main__` blocks do not run), and torch._dynamo, which
    torch.optim imports lazily: each forked stage then starts with them loaded."""
    # only a forking parent needs it, to hand it loaded to each child (2.7 s of every training process otherwise)
    import torch._dynamo  # noqa: F401

    for script in scripts:
        runpy.run_path(str(script), run_name="__preload__")


def _exit_code(e: SystemExit) -> int:
    """What the interpreter does with SystemExit(x): None -> 0, an int -> itself, anything else printed -> 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _print_traceback(e: BaseException, script: Path) -> None:
    """The traceback `python script` prints: from the script's first frame on, without the runner's frames."""
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != str(script):
        tb = tb.tb_next
    traceback.print_exception(type(e), e, tb or e.__traceback__)


def _child(script: Path, args: list, log_path: Path, cwd: Path, env: dict) -> int:
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # Python-level streams on the new fds: the parent's sys.stdout may not write to fd 1 (a pytest capture, a
    # tee, a notebook), and text buffered in the parent's objects must not be written twice.
    sys.stdout = sys.__stdout__ = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    atexit._clear()  # the pipeline's exit handlers are not this stage's
    sys.argv = [str(script), *map(str, args)]
    sys.path[0] = str(script.parent)
    code = 1
    try:
        runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as e:
        code = _exit_code(e)
    except KeyboardInterrupt as e:
        _print_traceback(e, script)
        code = 130
    except BaseException as e:  # a bug: its traceback, as the interpreter would print it
        _print_traceback(e, script)
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    return code


class Started:
    """A stage running in the background: `poll()` gives its exit code once it has ended (None before), `wait()`
    waits for it and gives it."""

    def __init__(self, pid: int = None, popen: subprocess.Popen = None):
        self.pid, self.popen, self.code = pid, popen, None

    def poll(self):
        if self.popen is not None:
            return self.popen.poll()
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code

    def wait(self) -> int:
        if self.popen is not None:
            return self.popen.wait()
        if self.code is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except KeyboardInterrupt:  # Ctrl-C reaches the child too: let it stop cleanly, then stop
                os.waitpid(self.pid, 0)
                raise
            self.code = os.waitstatus_to_exitcode(status)
        return self.code


def start_forked(script: Path, args: list, log_path: Path, cwd: Path, env: dict) -> Started:
    """Start `python script args` as a forked child, stdout and stderr appended to `log_path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the pipeline's code
        code = 1
        try:
            code = _child(Path(script), args, Path(log_path), Path(cwd), env)
        finally:
            os._exit(code)
    return Started(pid=pid)


def start_subprocess(cmd: list, log_path: Path, cwd: Path, env: dict) -> Started:
    with open(log_path, "a") as logf:  # the child holds its own copy of the descriptor
        return Started(popen=subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT))


def run_forked(script: Path, args: list, log_path: Path, cwd: Path, env: dict) -> int:
    """Run `python script args` as a forked child, stdout and stderr appended to `log_path`; its exit code."""
    return start_forked(script, args, log_path, cwd, env).wait()


def run_subprocess(cmd: list, log_path: Path, cwd: Path, env: dict) -> int:
    with open(log_path, "a") as logf:
        return subprocess.run(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
