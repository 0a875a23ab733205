"""Dynamic pruning inside train_everything.py on the tiny dataset: every epoch trains on the plan the literal rule
gives for the losses training saw, the cost is counted, a crash and --resume true give the uninterrupted run,
1 and 2 processes take the same sample sets, and ratio 0 is bitwise the static run."""
import json
import math
import re

import numpy as np
import pytest
import torch

from tests.helpers import TINY_TRAIN, make_tiny_dataset, run_script, train_until_killed
from tests.test_dynamic import literal_infobatch, literal_store, literal_ucb
from utils.artifacts import paths
from utils.artifacts.files import load_array
from utils.training import dynamic as D


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _cfg(rec, out, *extra):
    from config.config import parse_config

    return parse_config(["--rec", str(rec), "--output", str(out), *TINY_TRAIN, "--num_epoch", "5", "--lr_steps", "4",
                         "--record_topk", "0", *map(str, extra)])


def _ctx():
    from utils.runtime.context import Context

    return Context()


def _kept_list(tiny, tmp_path):
    """A kept list without every fifth sample: positions in the training set differ from dataset indices."""
    from utils.data.datasets import open_dataset

    n = open_dataset(tiny).num_images
    kept = np.array([i for i in range(n) if i % 5 != 2], dtype=np.int64)
    np.save(tmp_path / "kept.npy", kept)
    return kept


@pytest.mark.parametrize("method", ["infobatch", "ucb"])
def test_each_epoch_trains_on_the_literal_plan(tiny, tmp_path, monkeypatch, method):
    from train_everything import train

    kept = _kept_list(tiny, tmp_path)
    seen = []  # each epoch's gathered losses, in training-set positions
    real_update = D.LossStore.update

    def spy(self, losses, decay):
        seen.append(np.array(losses))
        return real_update(self, losses, decay)

    monkeypatch.setattr(D.LossStore, "update", spy)
    cfg = _cfg(tiny, tmp_path, "--is_original_train", "false", "--kept_index", tmp_path / "kept.npy",
               "--dynamic_method", method, "--dynamic_ratio", "0.4", "--dynamic_anneal", "0.8")
    summary = train(cfg, _ctx())
    out = paths.train_dir(cfg)
    assert out.name == f"kept_{out.name.split('_')[1]}_{method}0.40_smallnet_CosFace"
    saved = load_array(out / "dynamic_kept.npz", open_dataset_fp(tiny))
    assert np.array_equal(saved["sample_index"], kept)
    masks = saved["kept"]
    assert masks.shape == (5, kept.size) and len(seen) == 5
    n = kept.size
    for epoch in range(5):  # epochs 1..3 prune (< 0.8 * 5 = 4); 0 and 4 train on everything
        if epoch in (0, 4):
            expect = list(range(n))
        elif method == "infobatch":
            last, _, _ = literal_store([list(x) for x in seen[:epoch]], cfg.dynamic_ema)
            draws = np.random.default_rng([cfg.seed, epoch, 0x1FB]).random(n)
            expect, _ = literal_infobatch(last, 0.4, list(draws))
        else:
            _, mean, var = literal_store([list(x) for x in seen[:epoch]], cfg.dynamic_ema)
            expect = literal_ucb(mean, var, cfg.dynamic_ucb_c, 0.4)
        assert np.flatnonzero(masks[epoch]).tolist() == expect, epoch
        trained = np.flatnonzero(np.isfinite(seen[epoch]))
        assert set(trained) <= set(expect)
        assert trained.size == len(expect) // 32 * 32 == summary["samples_per_epoch"][epoch]  # drop_last
    assert summary["sample_passes"] == sum(summary["samples_per_epoch"])
    assert summary["samples_per_epoch"][0] == n // 32 * 32 > summary["samples_per_epoch"][2]
    assert summary["dynamic"] == {"method": method, "ratio": 0.4, "anneal": 0.8}


def open_dataset_fp(rec):
    from utils.data.datasets import open_dataset

    return open_dataset(rec).fingerprint


def test_infobatch_at_ratio_zero_trains_bitwise_as_the_static_run(tiny, tmp_path):
    """Nothing pruned, every weight 1, the schedule counted in epochs: the weights of the static run, bit for bit
    (the sampler's subset, the weighted loss and the per-epoch lr are each exact)."""
    from train_everything import train

    static = _cfg(tiny, tmp_path / "a", "--is_original_train", "false", "--coreset_method", "full")
    dynamic = _cfg(tiny, tmp_path / "b", "--is_original_train", "false", "--coreset_method", "full",
                   "--dynamic_method", "infobatch", "--dynamic_ratio", "0")
    one, two = train(static, _ctx()), train(dynamic, _ctx())
    a = torch.load(paths.train_dir(static) / "backbone.pth")
    b = torch.load(paths.train_dir(dynamic) / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert one["samples_per_epoch"] == two["samples_per_epoch"] == [448 // 32 * 32] * 5
    assert one["dynamic"] == {"method": "none"}


def test_epoch_lr_factor_is_lr_factor_in_epochs():
    from types import SimpleNamespace

    from utils.training.optimizer import epoch_lr_factor, lr_factor

    cfg = SimpleNamespace(warmup_epoch=2, lr_steps=[3, 5], lr_decay=0.1)
    steps = 7
    by_step = lr_factor(cfg, steps)
    for t in range(6 * steps):
        assert epoch_lr_factor(cfg, t // steps, t % steps, steps) == pytest.approx(by_step(t), rel=1e-12)
    # an epoch of 3 steps after one of 7: warm-up reaches 1 at the end of epoch 2, decay at epoch 3 exactly
    assert epoch_lr_factor(cfg, 1, 2, 3) == pytest.approx((1 + 3 / 3) / 2)
    assert epoch_lr_factor(cfg, 3, 0, 3) == pytest.approx(0.1) and epoch_lr_factor(cfg, 2, 2, 3) == 1.0


@pytest.mark.slow
def test_a_crash_and_resume_give_the_uninterrupted_run(tiny, tmp_path):
    import train_everything as training

    extra = ("--dynamic_method", "infobatch", "--dynamic_ratio", "0.5", "--frequent", "1")
    straight = _cfg(tiny, tmp_path / "a", *extra)
    training.train(straight, _ctx())
    train_until_killed(_cfg(tiny, tmp_path / "b", *extra), _ctx(), epoch=2)
    resumed = _cfg(tiny, tmp_path / "b", *extra, "--resume", "true")
    summary = training.train(resumed, _ctx())
    a = torch.load(paths.original_dir(straight) / "backbone.pth")
    b = torch.load(paths.original_dir(resumed) / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    fp = open_dataset_fp(tiny)
    ka = load_array(paths.original_dir(straight) / "dynamic_kept.npz", fp)["kept"]
    kb = load_array(paths.original_dir(resumed) / "dynamic_kept.npz", fp)["kept"]
    assert np.array_equal(ka, kb) and ka.shape[0] == 5
    first = json.loads((paths.original_dir(straight) / "train_summary.json").read_text())
    assert summary["samples_per_epoch"] == first["samples_per_epoch"]
    for cfg in (straight, resumed):  # the progress counts the pruned epochs at their length: the last step is the total
        last = re.findall(r"step (\d+)/(\d+)", (paths.original_dir(cfg) / "training.log").read_text())[-1]
        assert last[0] == last[1], last
    # an original run that pruned: the epochs' records hold NaN for the samples not trained on
    hist = np.load(paths.original_dir(straight) / "prob_history.npy")
    assert (np.isfinite(hist).sum(axis=1) == first["samples_per_epoch"]).all()
    # resuming with another method is refused in one line
    with pytest.raises(Exception, match="trained with dynamic_method=infobatch, not ucb"):
        training.train(_cfg(tiny, tmp_path / "b", "--dynamic_method", "ucb", "--resume", "true"), _ctx())


@pytest.mark.slow
def test_two_processes_plan_from_what_both_ranks_saw(tiny, tmp_path):
    """Under torchrun every rank plans the same subset (the run checks it each epoch), and the plan is the literal
    rule on the losses gathered from both ranks, each sample once. A run of 1 process takes other sets: batch norm
    sees 16 images per rank instead of 32 and the flips are drawn per rank, so its losses differ."""
    args = ["--rec", tiny, *TINY_TRAIN, "--num_epoch", "4", "--lr_steps", "3", "--record_topk", "0",
            "--dynamic_method", "infobatch", "--dynamic_anneal", "0.75", "--batch_size", "16"]
    run_script("train_everything.py", *args, "--output", tmp_path, torchrun=2)
    fp = open_dataset_fp(tiny)
    out = tmp_path / "original_smallnet_CosFace"
    summary = json.loads((out / "train_summary.json").read_text())
    rec = load_array(out / "dynamic_kept.npz", fp)
    kept, loss = rec["kept"], rec["loss"]
    assert kept.shape == loss.shape == (4, 448)
    for epoch in range(4):
        expect = list(range(448))
        if epoch in (1, 2):
            last, _, _ = literal_store([list(x) for x in loss[:epoch].astype(np.float64)], 0.8)
            draws = np.random.default_rng([0, epoch, 0x1FB]).random(448)
            expect, _ = literal_infobatch(last, 0.5, list(draws))
        assert np.flatnonzero(kept[epoch]).tolist() == expect, epoch
        trained = np.isfinite(loss[epoch])
        assert (trained <= kept[epoch]).all() and trained.sum() == summary["samples_per_epoch"][epoch]
        k = int(kept[epoch].sum())  # each rank walks ceil(k / 2) (a padding duplicate at most), in batches of 16
        assert trained.sum() == min(k, math.ceil(k / 2) // 16 * 32)  # each sample once over both ranks
    assert kept[1:3].sum(axis=1).max() < 448 and math.isclose(summary["sample_passes"], loss.size - np.isnan(loss).sum())


@pytest.mark.slow
def test_a_crash_on_one_process_resumes_on_two(tiny, tmp_path):
    """The loss store and the epochs' plans travel in the resume files: 1 process dies in epoch 3, 2 processes
    resume; the first two epochs' kept sets are the uninterrupted run's, and every epoch's is the literal rule on
    the losses gathered so far, whichever world size gathered them."""
    import train_everything as training

    extra = ("--dynamic_method", "infobatch", "--dynamic_anneal", "0.8")
    straight = _cfg(tiny, tmp_path / "a", *extra)
    training.train(straight, _ctx())
    train_until_killed(_cfg(tiny, tmp_path / "b", *extra), _ctx(), epoch=2)
    run_script("train_everything.py", "--rec", tiny, "--output", tmp_path / "b", *TINY_TRAIN, "--num_epoch", "5",
               "--lr_steps", "4", "--record_topk", "0", *extra, "--batch_size", "16", "--resume", "true", torchrun=2)
    fp = open_dataset_fp(tiny)
    a = load_array(paths.original_dir(straight) / "dynamic_kept.npz", fp)
    b = load_array(tmp_path / "b" / "original_smallnet_CosFace" / "dynamic_kept.npz", fp)
    assert b["kept"].shape == (5, 448) and np.array_equal(a["kept"][:2], b["kept"][:2])
    assert np.array_equal(a["loss"][:2], b["loss"][:2], equal_nan=True)
    for epoch in (1, 2, 3):
        last, _, _ = literal_store([list(x) for x in b["loss"][:epoch].astype(np.float64)], 0.8)
        draws = np.random.default_rng([0, epoch, 0x1FB]).random(448)
        assert np.flatnonzero(b["kept"][epoch]).tolist() == literal_infobatch(last, 0.5, list(draws))[0], epoch
