"""One command-line style (the paper's `--key value`, underscores) for the scripts with options of their own; the
old spellings (`--flip-rate`, a bare `--overwrite`) still work and mean the same."""
import argparse

import pytest

import make_noisy_dataset
import make_synthetic_dataset
from utils.runtime.cli import add_bool, flag


def test_flag_gives_the_underscore_form_first_and_the_old_one_too():
    assert flag("flip-rate") == ["--flip_rate", "--flip-rate"]
    assert flag("seed") == ["--seed"]
    p = argparse.ArgumentParser()
    p.add_argument(*flag("open_rate"), type=float, default=0.0)
    add_bool(p, "overwrite", "replace")
    assert p.parse_args(["--open-rate", "0.2"]).open_rate == p.parse_args(["--open_rate", "0.2"]).open_rate == 0.2
    assert [p.parse_args(a).overwrite for a in ([], ["--overwrite"], ["--overwrite", "true"], ["--overwrite", "false"],
                                                 ["--overwrite", "no"])] == [False, True, True, False, False]
    with pytest.raises(SystemExit):
        p.parse_args(["--overwrite", "maybe"])


def test_the_data_tools_read_both_spellings_alike():
    parser = make_synthetic_dataset.build_arg_parser()
    old = parser.parse_args(["--out", "x", "--num-ids", "7", "--val-pairs", "40", "--overwrite"])
    new = parser.parse_args(["--out", "x", "--num_ids", "7", "--val_pairs", "40", "--overwrite", "true"])
    assert vars(old) == vars(new) and new.num_ids == 7 and new.overwrite is True


@pytest.mark.parametrize("spelling", ["--flip-rate", "--flip_rate"])
def test_make_noisy_dataset_names_the_key_in_the_shown_style(spelling, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        make_noisy_dataset.main(["--rec", str(tmp_path), "--out", str(tmp_path / "o"), spelling, "2"])
    assert e.value.code == 2
    assert "--flip_rate 2.0 must lie in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
