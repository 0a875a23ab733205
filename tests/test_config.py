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
    assert cfg.val_targets == ["lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw"]


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
    (["--dropout", "0.4", "--network", "smallnet"], "dropout"),
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


# ----------------------------------------------------------------------------- checks against the dataset
def _ok_args():
    return ["--batch_size", "32", "--num_epoch", "6", "--lr_steps", "4", "--window", "3", "--record_topk", "4"]


@pytest.mark.parametrize("extra, dataset, needle", [
    (["--record_topk", "-1"], {}, "record_topk=-1 must be >= 0"),
    (["--record_topk", "20"], {}, "record_topk=20 exceeds the dataset's 16 identities"),
    (["--coreset_method", "entropy", "--record_topk", "0"], {}, "coreset_method=entropy .* record_topk=0"),
    (["--coreset_method", "dynunc", "--window", "7"], {}, r"window=7 needs num_epoch >= window \+ 1 = 8 \(found 6\)"),
    (["--coreset_method", "dynunc", "--window", "6"], {}, r"window=6 needs num_epoch >= window \+ 1 = 7 \(found 6\)"),
    (["--coreset_method", "dynunc", "--window", "3", "--score_epochs", "3"], {},
     r"window=3 needs score_epochs >= window \+ 1 = 4 \(found 3\)"),
    (["--eval_epoch", "7"], {}, r"eval_epoch=7 must be -1 \(the last\) or an epoch in 1..6"),
    (["--eval_epoch", "0"], {}, "eval_epoch=0 must be"),
    (["--eval_epoch", "-2"], {}, "eval_epoch=-2 must be"),
    (["--warmup_epoch", "7"], {}, r"warmup_epoch=7 must be in 0..6"),
    (["--max_steps_per_epoch", "-1"], {}, "max_steps_per_epoch=-1"),
    (["--batch_size", "64"], {"world_size": 4}, r"batch_size=64 x 4 process\(es\) = 256 exceeds the dataset's 200"),
    ([], {"num_classes": 1}, "1 identities; a margin head needs at least 2"),
    (["--min_samples_per_id", "30"], {"class_counts": [15, 10] * 8}, "min_samples_per_id=30 is at least the size "
                                                                     r"of every identity \(largest 15\)"),
    (["--min_samples_per_id", "10", "--fraction", "0.25"], {"class_counts": [20, 5] * 8},
     r"min_samples_per_id=10 alone keeps 120 of 200 images .* more than fraction=0.25 asks \(50\)"),
    ([], {"image_size": 30}, r"the dataset's images are 30x30; iresnet50: input_size must be a multiple of 16"),
    ([], {"image_size": (112, 96)}, "112x96; iresnet50: the backbones take square images"),
])
def test_check_against_dataset(extra, dataset, needle):
    from config.config import ConfigError, check_against_dataset

    cfg = parse_config(_ok_args() + extra)
    kwargs = {"num_images": 200, "num_classes": 16, **dataset}
    with pytest.raises(ConfigError, match=needle):
        check_against_dataset(cfg, **kwargs)


def test_check_against_dataset_passes_sound_configs_and_gathers_every_error():
    from config.config import ConfigError, check_against_dataset

    check_against_dataset(parse_config(_ok_args()), 200, 16, 112, class_counts=[20, 5] * 8)
    # a given DiffProb threshold makes `fraction` moot: by fraction (0.5: 100 of 200) the minimum alone (120) would be
    # refused; a retraining records no top-k logits
    check_against_dataset(parse_config(_ok_args() + ["--min_samples_per_id", "10", "--threshold", "0.1"]), 200, 16,
                          class_counts=[20, 5] * 8)
    check_against_dataset(parse_config(_ok_args() + ["--record_topk", "20", "--is_original_train", "false"]), 200, 16)
    with pytest.raises(ConfigError, match="record_topk=-1.*; eval_epoch=9"):
        check_against_dataset(parse_config(_ok_args() + ["--record_topk", "-1", "--eval_epoch", "9"]), 200, 16)


def test_lr_steps_beyond_num_epoch_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match=r"lr_steps \[8, 10\] lie beyond num_epoch=4"):
        cfg = parse_config(["--num_epoch", "4"])
    assert cfg.lr_steps == []
    with pytest.warns(UserWarning):
        assert parse_config(["--num_epoch", "9"]).lr_steps == [8]


def test_paper_recipe_details():
    assert parse_config(["--network", "iresnet50"]).dropout == 0.4  # the paper trains iresnet50 with dropout 0.4
    assert parse_config(["--network", "iresnet100"]).dropout == 0.0
    assert parse_config(["--network", "smallnet"]).dropout == 0.0
    assert "cfp_ff" in parse_config(["--dataset", "webface"]).val_targets
    assert parse_config(["--network", "mfn"]).network == "mfn"


def test_a_threshold_and_a_fraction_together_are_refused(capsys):
    """--fraction was silently ignored when --threshold was given too; now the conflict is named."""
    with pytest.raises(SystemExit) as e:
        parse_config(["--coreset_method", "diffprob", "--threshold", "0.05", "--fraction", "0.3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: --threshold 0.05 and --fraction 0.3 both given: a threshold decides the kept fraction itself" in err
    assert parse_config(["--threshold", "0.05"]).threshold == 0.05  # either alone is fine
    assert parse_config(["--fraction", "0.3"]).fraction == 0.3


def test_threads_fixes_torchs_cpu_threads(monkeypatch, capsys):
    """threads=N: N intra-op threads whatever the core count (the same digits on any machine); 0: the cores per
    local rank less one per DataLoader worker, at least 1."""
    import torch

    from utils.runtime import context

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(context.os, "cpu_count", lambda: 8)
        assert context.cpu_threads(parse_config(["--threads", "3"])) == 3
        assert context.cpu_threads(parse_config(["--threads", "0", "--num_workers", "2"])) == 6
        assert context.cpu_threads(parse_config(["--num_workers", "2"]), local_world_size=4) == 1  # 8 // 4 - 2 = 0
        context.init_context(parse_config(["--threads", "3", "--device", "cpu"]))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        parse_config(["--threads", "-1"])
    assert "threads=-1 must be >= 0" in capsys.readouterr().err
