"""utils/pipeline/runner.py: a forked stage behaves as `python script args` would (argv, working folder,
environment, output, exit code, exit handlers), and the runner is chosen by where the run goes."""
import atexit
import os
import sys
import textwrap

import pytest

from utils.pipeline import runner as stage_runner
from utils.pipeline.runner import choose_runner, run_forked, run_subprocess

pytestmark = pytest.mark.skipif(not stage_runner.can_fork(), reason="no fork on this platform")

SCRIPT = """
import atexit, os, sys
print("argv", sys.argv[1:])
print("cwd", os.getcwd())
print("env", os.environ.get("STAGE_RUNNER_TEST"))
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("the stage's own exit handler"))
what = sys.argv[1]
if what == "code":
    sys.exit(3)
if what == "message":
    sys.exit("stage: error: a message")
if what == "bug":
    raise ValueError("a bug keeps its traceback")
"""


def _run(tmp_path, runner, what):
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(SCRIPT))
    log = tmp_path / f"{runner}_{what}.log"
    log.write_text("header\n")
    env = dict(os.environ, STAGE_RUNNER_TEST="yes")
    cwd = tmp_path
    if runner == "fork":
        code = run_forked(script, [what, "--flag", 2], log, cwd, env)
    else:
        code = run_subprocess([sys.executable, str(script), what, "--flag", "2"], log, cwd, env)
    return code, log.read_text()


@pytest.mark.parametrize("what, code", [("ok", 0), ("code", 3), ("message", 1), ("bug", 1)])
def test_a_forked_stage_is_what_a_subprocess_is(tmp_path, what, code):
    forked, sub = _run(tmp_path, "fork", what), _run(tmp_path, "subprocess", what)
    assert forked[0] == sub[0] == code
    lines = forked[1].splitlines()
    assert lines[0] == "header"  # appended, not overwritten
    assert f"argv ['{what}', '--flag', '2']" in lines and f"cwd {tmp_path}" in lines and "env yes" in lines
    assert "to stderr" in lines
    assert ("stage: error: a message" in lines) == (what == "message")
    assert ("ValueError: a bug keeps its traceback" in lines) == (what == "bug")
    assert "Traceback (most recent call last):" in forked[1] if what == "bug" else "Traceback" not in forked[1]
    # the same lines as the subprocess, whatever the order in which stdout and stderr reached the file
    # (the traceback too: the runner's own frames are left out, as `python script` has none)
    assert sorted(forked[1].splitlines()) == sorted(sub[1].splitlines())
    assert "the stage's own exit handler" in lines


def test_the_pipelines_exit_handlers_and_state_stay_in_the_pipeline(tmp_path):
    marker, cwd = tmp_path / "parent_handler_ran", os.getcwd()
    handler = lambda: marker.write_text("ran")  # noqa: E731
    atexit.register(handler)
    try:
        script = tmp_path / "stage.py"
        script.write_text("import os, sys\nos.environ['LEAK'] = '1'\nsys.modules['json'].LEAK = 1\n")
        assert run_forked(script, [], tmp_path / "log", tmp_path, dict(os.environ)) == 0
    finally:
        atexit.unregister(handler)
    assert not marker.exists()  # the child ran its own handlers only
    import json
    assert "LEAK" not in os.environ and not hasattr(json, "LEAK")
    assert os.getcwd() == cwd  # the child's chdir is its own


@pytest.mark.parametrize("asked, gpus, nproc, runner", [
    ("auto", 0, 1, "fork"), ("auto", 1, 1, "subprocess"), ("auto", 0, 2, "subprocess"),
    ("subprocess", 0, 1, "subprocess"), ("fork", 0, 1, "fork")])
def test_the_runner_follows_where_the_run_goes(asked, gpus, nproc, runner):
    assert choose_runner(asked, gpus, nproc) == runner


@pytest.mark.parametrize("gpus, nproc, why", [(1, 1, "a GPU is visible"), (0, 4, "torchrun runs several processes")])
def test_fork_is_refused_where_it_cannot_work(gpus, nproc, why):
    with pytest.raises(ValueError, match=why):
        choose_runner("fork", gpus, nproc)


@pytest.mark.parametrize("asked, gpus, nproc, cores, jobs", [
    ("auto", 0, 1, 2, 2), ("auto", 0, 1, 32, 8), ("auto", 0, 1, 1, 1), ("auto", 1, 1, 16, 1), ("auto", 0, 4, 16, 1),
    ("3", 0, 1, 2, 3), ("1", 1, 1, 16, 1)])
def test_jobs_follow_the_cores_and_stay_one_on_gpus(monkeypatch, asked, gpus, nproc, cores, jobs):
    monkeypatch.setattr(stage_runner, "usable_cores", lambda: cores)
    assert stage_runner.choose_jobs(asked, gpus, nproc) == jobs


@pytest.mark.parametrize("asked, gpus, nproc, why", [("0", 0, 1, "expected a number >= 1"),
                                                     ("2", 1, 1, "one at a time on GPUs"), ("2", 0, 2, "torchrun")])
def test_jobs_refused(asked, gpus, nproc, why):
    with pytest.raises(ValueError, match=why):
        stage_runner.choose_jobs(asked, gpus, nproc)


# A stand-in for train_everything.py: sleeps, says which run it is on stdout and stderr, fails when asked.
FAKE_TRAIN = """
import sys, time
name, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
threads = sys.argv[sys.argv.index("--threads") + 1]
for i in range(3):
    print(f"{name} line {i} threads {threads}", flush=True)
    print(f"{name} err {i}", file=sys.stderr, flush=True)
    time.sleep(seconds / 3)
sys.exit(code)
"""


def _pipeline(tmp_path, monkeypatch, runner, jobs):
    from utils.pipeline import steps
    from utils.pipeline.profiles import PROFILES

    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "train_everything.py").write_text(FAKE_TRAIN)
    monkeypatch.setattr(steps, "REPO", repo)
    monkeypatch.setattr(steps, "usable_cores", lambda: 2)
    pipe = steps.Pipeline(tmp_path / f"out_{runner}_{jobs}", PROFILES["tiny"], runner=runner, jobs=jobs)
    pipe.out.mkdir()
    pipe.t_start = 0
    pipe.work_total, pipe.spent, pipe.skipped = (3.0, 0), {"train": [0.0, 0.0], "other": [0.0, 0.0]}, \
        {"train": 0.0, "other": 0.0}
    return pipe


@pytest.mark.parametrize("runner", ["fork", "subprocess"])
def test_trainings_run_together_with_whole_logs(tmp_path, monkeypatch, capsys, runner):
    """Four queued trainings, two at a time: each log is added to pipeline.log whole (no interleaved lines),
    the longest start first, every training gets the profile's threads, and the wall time is that of two
    rounds, not three or four."""
    import time

    pipe = _pipeline(tmp_path, monkeypatch, runner, jobs=2)
    t0 = time.time()
    with pipe.concurrently():
        for name, seconds, work in (("a", 0.6, 0.5), ("b", 0.6, 1.0), ("c", 0.6, 0.25), ("d", 0.6, 0.75)):
            pipe.step(f"train {name}", ["train_everything.py"], lambda: False, name, seconds, 0, work=work)
    wall = time.time() - t0
    assert wall < 1.7, wall  # 2 rounds of 0.6 s (3 rounds would be 1.8 s)
    log = (pipe.out / "pipeline.log").read_text()
    blocks = log.split("\n===== ")[1:]
    assert sorted(b.splitlines()[0] for b in blocks) == ["train a", "train b", "train c", "train d"]
    for block in blocks:  # each block holds its own run's lines only, all of them
        name = block.splitlines()[0][-1]
        body = [x for x in block.splitlines()[2:] if x]
        assert sorted(body) == sorted([f"{name} line {i} threads 1" for i in range(3)] + [f"{name} err {i}" for i in range(3)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "running 4 trainings, 2 at a time (--jobs 2; 1 thread(s) each)"
    # b (1.0) and d (0.75) ran first, then a (0.5) and c (0.25): each line has its own step number
    assert {x.split(" ...")[0] for x in lines[1:3]} == {"[ 2] train b", "[ 4] train d"}
    assert {x.split(" ...")[0] for x in lines[3:5]} == {"[ 1] train a", "[ 3] train c"}
    assert set(pipe.steps_run) == {"train a", "train b", "train c", "train d"}
    assert not (pipe.out / "logs").exists()


def test_a_failed_training_stops_the_others_from_starting(tmp_path, monkeypatch, capsys):
    pipe = _pipeline(tmp_path, monkeypatch, "fork", jobs=2)
    with pytest.raises(SystemExit) as e:
        with pipe.concurrently():
            pipe.step("train bad", ["train_everything.py"], lambda: False, "bad", 0.1, 7, work=1.0)
            pipe.step("train slow", ["train_everything.py"], lambda: False, "slow", 0.6, 0, work=0.9)
            pipe.step("train never", ["train_everything.py"], lambda: False, "never", 0.1, 0, work=0.1)
    msg = str(e.value)
    assert msg.startswith("run_pipeline: step 'train bad' failed (exit 7); last lines of")
    assert "bad line 2 threads 1" in msg and "bad err 2" in msg
    log = (pipe.out / "pipeline.log").read_text()
    assert "===== train slow" in log and "slow line 2" in log  # the running one finished
    assert "never" not in log and pipe.steps_run == ["train slow"]  # the queued one did not start
    assert "[ 1] train bad ... FAILED" in capsys.readouterr().out
    assert not (pipe.out / "logs").exists()


def test_one_job_runs_each_training_when_stepped(tmp_path, monkeypatch, capsys):
    pipe = _pipeline(tmp_path, monkeypatch, "fork", jobs=1)
    with pipe.concurrently():
        pipe.step("train a", ["train_everything.py"], lambda: False, "a", 0.1, 0, "--threads", 2, work=1.0)
        assert pipe.steps_run == ["train a"] and not pipe.queued
    assert "running" not in capsys.readouterr().out
