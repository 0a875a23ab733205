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
