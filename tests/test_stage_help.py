"""Each stage's --help lists the keys that stage reads; the others stay accepted, and --help-all lists every key."""
import dataclasses
import subprocess
import sys

import pytest

from config.config import Config, parse_config
from config.stage_keys import stage_keys
from tests.helpers import REPO

STAGES = ["train_everything", "eval_trainset", "clean_trainset", "eval_simprobs", "coreset_dynunc", "coreset_rand",
          "coreset_entropy", "coreset_select", "generate_label_dict", "label_mapping", "eval_verification",
          "eval_ijbc", "export_trainset"]


def _help(stage, flag="--help"):
    r = subprocess.run([sys.executable, str(REPO / f"{stage}.py"), flag], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_export_help_lists_what_export_reads_not_the_training_schedule():
    text = _help("export_trainset")
    for key in ("--rec", "--kept_index", "--label_map", "--out"):
        assert key in text
    for key in ("--lr ", "--momentum", "--warmup_epoch", "--weight_decay", "--num_epoch"):
        assert key not in text.split("The shared config's other keys")[0], key
    assert "accepted but not read by export_trainset" in text and "warmup_epoch" in text
    every = _help("export_trainset", "--help-all")
    assert "--warmup_epoch INT" in every and "--momentum FLOAT" in every


def test_training_help_lists_the_schedule_and_the_head():
    text = _help("train_everything")
    for key in ("--lr FLOAT", "--momentum FLOAT", "--num_epoch INT", "--lr_steps", "--head_args", "--compile_mode",
                "--batch_size INT", "--val_targets"):
        assert key in text, key


@pytest.mark.parametrize("stage", STAGES)
def test_only_training_reads_the_optimizer_keys(stage):
    keys = stage_keys(REPO / f"{stage}.py", [f.name for f in dataclasses.fields(Config)])
    assert {"rec", "output", "dataset"} <= keys
    trains = stage == "train_everything"
    assert {"lr", "momentum", "weight_decay", "lr_steps", "warmup_epoch"} <= keys if trains else \
        not keys & {"lr", "momentum", "weight_decay", "lr_steps", "warmup_epoch"}


def test_a_key_the_stage_does_not_read_is_still_accepted():
    assert parse_config(["--lr", "0.3", "--warmup_epoch", "1"], stage="export_trainset").lr == 0.3
