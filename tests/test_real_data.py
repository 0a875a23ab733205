"""The real-data path is the paper's recipe: with a real --rec the dataset preset decides the schedule and the
verification targets, the dataset is named or told from its class count, a missing .bin stops the run in one
line, and --ijb_root reaches IJB-B/C. Tested on RecordIO folders the tests write, without training."""
import shutil

import pytest

from config.config import parse_config
from tests.helpers import make_tiny_dataset

WEBFACE_BINS = ["lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def real(tiny, tmp_path):
    """A copy of the tiny set that looks like a real release: no generator description, the webface .bin names."""
    rec = tmp_path / "faces_webface_112x112"
    shutil.copytree(tiny, rec)
    (rec / "dataset.json").unlink()
    for name in WEBFACE_BINS:
        shutil.copy(rec / "syn_frontal.bin", rec / f"{name}.bin")
    for path in rec.glob("syn_*.bin"):
        path.unlink()
    shutil.rmtree(rec / "ijb")
    return rec


def _set_classes(rec, classes):
    rest = (rec / "property").read_text().split(",")[1:]
    (rec / "property").write_text(",".join([str(classes), *rest]))


def _pipeline(*argv):
    from run_pipeline import main

    return main([*map(str, argv), "--show_config"])


def test_webface_gets_the_paper_schedule_and_targets_not_the_profile_s(real, tmp_path, capsys):
    shown = _pipeline("--rec", real, "--dataset", "webface", "--profile", "gpu", "--out", tmp_path / "o")
    assert shown["num_epoch"] == 34 and shown["lr_steps"] == [20, 28, 32]
    assert shown["val_targets"] == WEBFACE_BINS
    # the profile fills the model, the batch and the workers only
    assert (shown["network"], shown["embedding_size"], shown["batch_size"], shown["num_workers"]) == \
        ("iresnet50", 512, 256, 8)
    shown = _pipeline("--rec", real, "--dataset", "webface", "--profile", "cpu", "--nproc", "8",
                      "--out", tmp_path / "o")
    assert shown["num_epoch"] == 34 and shown["network"] == "smallnet" and shown["batch_size"] == 128
    assert "processes        8 (global batch 1024, lr 0.1 x 1024/512 = 0.2)" in capsys.readouterr().out


def test_a_missing_bin_stops_the_run_in_one_line_naming_it(real, tmp_path):
    (real / "cfp_ff.bin").unlink()
    with pytest.raises(SystemExit) as exit_:
        _pipeline("--rec", real, "--dataset", "webface", "--out", tmp_path / "o")
    message = str(exit_.value.code)
    assert "\n" not in message and f"verification set {real / 'cfp_ff.bin'} not found" in message
    assert "InsightFace publishes the .bin files" in message and "--val_targets" in message
    # the run itself refuses before training anything
    from run_pipeline import main

    with pytest.raises(SystemExit, match="cfp_ff.bin not found"):
        main(["--rec", str(real), "--dataset", "webface", "--profile", "tiny", "--out", str(tmp_path / "run")])
    assert not list((tmp_path / "run").glob("runs/*"))
    # narrowing the targets on purpose is allowed
    shown = _pipeline("--rec", real, "--dataset", "webface", "--set", "val_targets=lfw,cfp_fp", "--out", tmp_path / "o")
    assert shown["val_targets"] == ["lfw", "cfp_fp"]


def test_the_dataset_is_told_from_its_class_count_with_a_printed_line(real, tmp_path, capsys):
    _set_classes(real, 85742)
    assert _pipeline("--rec", real, "--out", tmp_path / "o")["dataset"] == "ms1mv2"
    assert f"dataset: ms1mv2 (85,742 classes in {real / 'property'})" in capsys.readouterr().out
    # a stage run on a real folder without --dataset: the same preset, said on stderr
    _set_classes(real, 10572)
    cfg = parse_config(["--rec", str(real)])
    assert (cfg.dataset, cfg.num_epoch, cfg.val_targets) == ("webface", 34, WEBFACE_BINS)
    assert "dataset: webface (10,572 classes in" in capsys.readouterr().err
    # the synthetic data stays synthetic, given by path too
    assert parse_config(["--rec", str(real.parent.parent / "data" / "tiny")]).dataset == "synthetic"


def test_an_unknown_dataset_must_be_named(real, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _pipeline("--rec", real, "--out", tmp_path / "o")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "cannot tell which dataset" in err and "pass --dataset webface | ms1mv2 | glint360k | synthetic" in err
    with pytest.raises(SystemExit) as exit_:
        parse_config(["--rec", str(real)])
    assert exit_.value.code == 2 and "pass --dataset" in capsys.readouterr().err


def test_ijb_root_reaches_the_stages_and_is_checked(real, tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _pipeline("--rec", real, "--dataset", "webface", "--ijb_root", tmp_path, "--out", tmp_path / "o")
    assert exit_.value.code == 2 and "not an IJB release folder" in capsys.readouterr().err
    shown = _pipeline("--rec", real, "--dataset", "webface", "--ijb_root", tiny / "ijb", "--ijb_target", "ijbb",
                      "--out", tmp_path / "o")
    assert (shown["ijb_root"], shown["ijb_target"]) == (str(tiny / "ijb"), "ijbb")


def test_training_on_a_real_folder_refuses_a_missing_bin(real):
    from utils.errors import UserError
    from utils.artifacts.files import check_bins

    (real / "agedb_30.bin").unlink()
    cfg = parse_config(["--rec", str(real), "--dataset", "webface"])
    with pytest.raises(UserError, match="agedb_30.bin not found"):
        check_bins(cfg)
    check_bins(parse_config(["--rec", str(real), "--dataset", "webface", "--val_targets", "lfw"]))


def test_the_pipeline_eta_counts_the_training_and_the_other_steps_left(tmp_path, monkeypatch):
    import run_pipeline
    from run_pipeline import PROFILES, Pipeline

    # synthetic: 1 full + 0.5 x (5 kept sets + UCB at cost 0.5); 11 other steps (UCB has no pruning step)
    pipe = Pipeline(tmp_path, PROFILES["tiny"])
    assert pipe.planned_work() == (4.0, 11)
    monkeypatch.setattr(run_pipeline.time, "time", lambda: 1000.0)
    pipe.t_start, pipe.work_total = 1000.0 - 30, pipe.planned_work()
    pipe.spent, pipe.skipped = {"train": [0.0, 0.0], "other": [0.0, 0.0]}, {"train": 0.0, "other": 0.0}
    assert pipe.progress(0.0, 10.0) == ""  # the data: no training yet, no rate
    # the original model: 3 trainings left at 20 s each, 10 other steps at 10 s each
    assert pipe.progress(1.0, 20.0) == "   (0:30 elapsed; about 2:40 left)"
    pipe.skipped["other"] += 1  # a step found complete is not waited for
    # a kept set of 50% trained in 10 s: 2.5 trainings left at 20 s, 9 other steps at 10 s
    assert pipe.progress(0.5, 10.0) == "   (0:30 elapsed; about 2:20 left)"


def test_head_args_travel_from_the_pipeline_to_the_stages(tiny, tmp_path):
    from run_pipeline import PROFILES, Pipeline, flag_value, parse_set

    assert flag_value({"m1": -0.2, "t": 0.3}) == "m1=-0.2,t=0.3"
    pipe = Pipeline(tmp_path, PROFILES["tiny"], rec=tiny, dataset="synthetic",
                    overrides=parse_set(["loss=RobustFace", "head_args=m1=-0.2,t=0.3"]))
    cfg = pipe.cfg()
    assert cfg.loss == "RobustFace" and cfg.head_args == {"m1": -0.2, "t": 0.3}
