"""One run per output folder: `<folder>/.lock`, created atomically, names the process that holds it.

    with OutputLock(cfg.output, what="run_pipeline.py"):
        ...

A second run on the same folder stops at once with one line naming the holder. Locks are per folder,
not per tree: the pipeline can hold `output/demo` while a stage it starts holds `output/demo/original`.
A process may enter a lock it holds again (nested use), and so may the processes it starts (the lock's
token is passed down in the environment variable `DIFFPROB_OUTPUT_LOCKS`). A lock left by a process
that died on this host is taken over with a warning; a lock from another host is never taken over.
Under torchrun, take the lock on one rank (the ranks are siblings, not parent and children).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from utils.artifacts.files import ArtifactError

log = logging.getLogger("diffprob")

LOCK_NAME = ".lock"
ENV_TOKENS = "DIFFPROB_OUTPUT_LOCKS"

_HELD = {}  # resolved folder -> [token, depth]: the locks this process owns


class LockError(ArtifactError):
    """The output folder is in use by another run (or its lock file cannot be read)."""


def read_lock(folder) -> dict | None:
    """The holder recorded in `<folder>/.lock` ({pid, host, started, command, what, token}), or None when free.

    A lock file being written by its creator at this moment reads as empty: it is read again for up to
    a second before it counts as malformed.
    """
    path = Path(folder) / LOCK_NAME
    for _ in range(20):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            if isinstance(info, dict) and isinstance(info.get("pid"), int):
                return info
        except json.JSONDecodeError:
            pass
        time.sleep(0.05)
    raise LockError(f"{path}: malformed lock file (expected JSON with pid, host, started, command); "
                    f"if no run is using {path.parent}, remove it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _describe(folder: Path, info: dict) -> str:
    started = str(info.get("started", "?"))
    try:
        when = datetime.datetime.fromisoformat(started)
        started = when.strftime("%H:%M:%S" if when.date() == datetime.date.today() else "%Y-%m-%d %H:%M:%S")
    except ValueError:
        pass
    return f"{folder} is in use by {info.get('what', '?')} (pid {info['pid']} on host {info.get('host', '?')}, " \
           f"started {started})"


def _inherited_tokens() -> list:
    return [t for t in os.environ.get(ENV_TOKENS, "").split(os.pathsep) if t]


def _set_inherited_tokens(tokens):
    if tokens:
        os.environ[ENV_TOKENS] = os.pathsep.join(tokens)
    else:
        os.environ.pop(ENV_TOKENS, None)


class OutputLock:
    """Context manager holding `<folder>/.lock` for this run; `what` names the run in the message others get."""

    def __init__(self, folder, what: str = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what or Path(sys.argv[0]).name or "python"
        self._key = None
        self._owned = False
        self._made = []  # folders acquire() created, innermost first: removed on release if left empty

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    def acquire(self):
        self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = str(self.folder.resolve())
        if self._key in _HELD:  # nested use in the process that holds it
            _HELD[self._key][1] += 1
            self._owned = True
            return
        for _ in range(3):  # a stale lock taken over by another process at the same moment: look again
            if self._create():
                return
            holder = read_lock(self.folder)
            if holder is None:
                continue
            if holder.get("token") in _inherited_tokens():
                return  # held by the process that started this one: enter without owning it
            if holder.get("host") != socket.gethostname():
                raise LockError(f"{_describe(self.folder, holder)}; a lock from another host is never taken over: "
                                f"if no run there is using it, remove {self.path}")
            if _alive(holder["pid"]):
                raise LockError(f"{_describe(self.folder, holder)}; wait for it or stop it")
            log.warning("%s: taking over the lock of %s (pid %d), which is no longer running", self.folder,
                        holder.get("what", "?"), holder["pid"])
            self._remove_stale(holder)
        raise LockError(f"{self.path}: could not take the lock (other processes keep taking it over)")

    def _create(self) -> bool:
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what, "token": token,
                "started": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv)}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:  # another run's release removed the folder it had made: make it again
            self.folder.mkdir(parents=True, exist_ok=True)
            return self._create()
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info, indent=1) + "\n")
        _HELD[self._key] = [token, 1]
        _set_inherited_tokens(_inherited_tokens() + [token])
        self._owned = True
        return True

    def _remove_stale(self, holder: dict):
        """Remove the dead holder's file, and only it: a fresh lock another process created meanwhile stays."""
        grave = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        try:
            dead = json.loads(grave.read_text()).get("token") == holder.get("token")
        except json.JSONDecodeError:  # a lock being written this moment: not the dead one
            dead = False
        if not dead:
            try:
                os.link(grave, self.path)  # put it back, unless yet another lock is there already
            except FileExistsError:
                pass
        grave.unlink(missing_ok=True)

    def release(self):
        if not self._owned:
            return
        self._owned = False
        held = _HELD.get(self._key)
        held[1] -= 1
        if held[1] > 0:
            return
        token = _HELD.pop(self._key)[0]
        _set_inherited_tokens([t for t in _inherited_tokens() if t != token])
        try:
            if json.loads(self.path.read_text()).get("token") == token:
                self.path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass  # removed or replaced by hand: nothing of ours to remove
        for folder in self._made:  # a run that stopped before writing leaves no empty folder behind
            try:
                folder.rmdir()
            except OSError:  # not empty (outputs, another run's lock) or gone: it stays, and so do its parents
                break
