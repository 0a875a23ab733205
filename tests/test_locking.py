"""One run per output folder (utils/artifacts/locking.py): real processes contending, stale and foreign locks, nesting."""
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, env
from utils.artifacts.locking import ENV_TOKENS, LOCK_NAME, LockError, OutputLock, read_lock

# Run as a stage would: the lock's one line on stderr, exit status 1.
CONTENDER = """
import sys
from utils.artifacts.locking import LockError, OutputLock
try:
    with OutputLock(sys.argv[1], what=sys.argv[2]):
        print("held", flush=True)
        sys.stdin.read()  # hold until the test closes stdin
except LockError as e:
    print(f"{sys.argv[2]}: error: {e}", file=sys.stderr)
    sys.exit(1)
"""


def _contender(folder, what, **kwargs):
    return subprocess.Popen([sys.executable, "-c", CONTENDER, str(folder), what], cwd=REPO, env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_second_process_on_a_folder_stops_at_once_naming_the_holder(tmp_path):
    folder = tmp_path / "demo"
    first = _contender(folder, "run_pipeline.py")
    try:
        assert first.stdout.readline().strip() == "held"
        t0 = time.time()
        second = _contender(folder, "train_everything.py")
        out, err = second.communicate(input="", timeout=60)
        assert second.returncode == 1 and out == ""
        assert time.time() - t0 < 30  # at once, not after waiting for the holder
        line = err.strip()
        assert "\n" not in line
        assert line.startswith(f"train_everything.py: error: {folder} is in use by run_pipeline.py "
                               f"(pid {first.pid} on host {socket.gethostname()}, started ")
        assert line.endswith("); wait for it or stop it")
    finally:
        first.communicate(input="", timeout=60)
    assert first.returncode == 0
    assert not (folder / LOCK_NAME).exists()  # released on exit


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "what": "crashed.py",
                                                  "started": "2024-01-01T07:31:02", "command": "crashed.py",
                                                  "token": "old"}))
    logger = logging.getLogger("diffprob")  # a stage run in-process earlier may have stopped its propagation
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="diffprob"):
            with OutputLock(tmp_path, what="new.py"):
                holder = read_lock(tmp_path)
                assert holder["pid"] == os.getpid() and holder["what"] == "new.py" and holder["command"]
    finally:
        logger.removeHandler(caplog.handler)
    assert any("taking over the lock of crashed.py" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(tmp_path)) == []


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "what": "run_pipeline.py",
                                                  "started": "2024-01-01T07:31:02", "command": "x", "token": "t"}))
    with pytest.raises(LockError, match=rf"{tmp_path} is in use by run_pipeline.py \(pid 1 on host gpu-node-7, "
                                        rf"started 2024-01-01 07:31:02\); a lock from another host is never taken "
                                        rf"over: if no run there is using it, remove {tmp_path / LOCK_NAME}"):
        OutputLock(tmp_path).acquire()
    assert read_lock(tmp_path)["host"] == "gpu-node-7"


def test_malformed_lock_file_says_how_to_free_the_folder(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(LockError, match="malformed lock file.*if no run is using .* remove it"):
        OutputLock(tmp_path).acquire()


def test_released_on_exception_and_reentrant_in_one_process(tmp_path):
    with pytest.raises(RuntimeError):
        with OutputLock(tmp_path, what="a"):
            with OutputLock(tmp_path, what="a again"):  # nested use
                assert read_lock(tmp_path)["what"] == "a"
            assert (tmp_path / LOCK_NAME).exists()  # the outer use still holds it
            raise RuntimeError("stage failed")
    assert not (tmp_path / LOCK_NAME).exists()
    assert ENV_TOKENS not in os.environ


def test_child_process_locks_a_subfolder_and_may_enter_the_parents_lock(tmp_path):
    stage = tmp_path / "demo" / "original"
    with OutputLock(tmp_path / "demo", what="run_pipeline.py"):
        # a stage of the pipeline: its own sub-folder, and the pipeline's folder (inherited through the environment)
        code = ("import sys; from utils.artifacts.locking import OutputLock\n"
                "with OutputLock(sys.argv[1], what='stage'), OutputLock(sys.argv[2], what='stage'):\n"
                "    print(open(sys.argv[1] + '/.lock').read())")
        r = subprocess.run([sys.executable, "-c", code, str(stage), str(tmp_path / "demo")], cwd=REPO,
                           env={**env(), ENV_TOKENS: os.environ[ENV_TOKENS]}, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["what"] == "stage"
        assert read_lock(tmp_path / "demo")["what"] == "run_pipeline.py"  # the child did not release it
        assert not (stage / LOCK_NAME).exists()


def test_folders_the_lock_made_go_when_the_run_left_them_empty(tmp_path):
    with OutputLock(tmp_path / "out" / "coresets" / "rand_0.50"):
        pass  # a run refused before it wrote anything
    assert os.listdir(tmp_path) == []
    with OutputLock(tmp_path / "out" / "clean"):
        (tmp_path / "out" / "clean" / "kept_index.npy").write_bytes(b"x")
    assert os.listdir(tmp_path / "out" / "clean") == ["kept_index.npy"]
    with OutputLock(tmp_path / "out" / "scores"):
        pass
    assert sorted(os.listdir(tmp_path / "out")) == ["clean"]  # made by the lock, left empty: gone; the rest stays
