"""Config: defaults, command-line overrides, tables, and the exit-2 errors users rely on."""
import subprocess
import sys

import pytest

from config.config import Config, parse_config
from tests.conftest import REPO


def test_defaults_resolve_from_tables():
    cfg = parse_config([])
    assert cfg.dataset == "synthetic" and cfg.num_epoch == 12 and cfg.lr_steps == [8, 10]
    assert cfg.loss == "CosFace" and cfg.s == 64.0 and cfg.m == 0.35


def test_loss_table_sets_margin_and_preset_sets_schedule():
    cfg = parse_config(["--loss", "arcface", "--dataset", "webface"])
    assert cfg.loss == "ArcFace" and cfg.m == 0.5
    assert cfg.num_epoch == 34 and cfg.lr_steps == [20, 28, 32]
    assert cfg.val_targets == ["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]


def test_overrides_are_typed():
    cfg = parse_config(["--batch_size", "64", "--lr", "0.05", "--SE", "true", "--lr_steps", "3,5",
                        "--num_epoch", "6", "--val_targets", "lfw,cfp_fp", "--threshold", "0.01", "--m", "0.2"])
    assert cfg.batch_size == 64 and cfg.lr == 0.05 and cfg.SE is True
    assert cfg.lr_steps == [3, 5] and cfg.val_targets == ["lfw", "cfp_fp"]
    assert cfg.threshold == 0.01 and cfg.m == 0.2
    assert parse_config(["--threshold", "none"]).threshold is None


@pytest.mark.parametrize("argv, needle", [
    (["--no_such_key", "1"], "valid keys"),
    (["--batch_size", "many"], "expected int"),
    (["--SE", "maybe"], "boolean"),
    (["--fraction", "1.5"], "fraction"),
    (["--threshold", "-0.1"], "threshold"),
    (["--loss", "nosuchloss"], "valid"),
    (["--dtype", "fp8"], "dtype"),
    (["--num_epoch", "4"], "lr_steps"),
])
def test_bad_values_exit_2_with_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_stage_script_cli_unknown_key_and_help():
    r = subprocess.run([sys.executable, "coreset_rand.py", "--bogus", "3"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "valid keys" in r.stderr and "fraction" in r.stderr
    r = subprocess.run([sys.executable, "eval_simprobs.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--threshold" in r.stdout and "default: 0.5" in r.stdout


def test_every_key_has_a_cli_flag():
    import dataclasses

    from config.config import build_parser

    text = build_parser().format_help()
    for f in dataclasses.fields(Config):
        assert f"--{f.name}" in text
