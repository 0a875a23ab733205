"""train_everything.py and eval_trainset.py on a tiny synthetic dataset: recording, resume, torchrun, bad input."""
import json

import numpy as np
import pytest
import torch

from config.config import parse_config
from tests.helpers import TINY_TRAIN, make_tiny_dataset, run_script, train_until_killed
from utils.artifacts import paths
from utils.artifacts.files import Fingerprint, load_array


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def _cfg(rec, out, *extra):
    return parse_config(["--rec", str(rec), "--output", str(out), *TINY_TRAIN, *extra])


def _ctx():
    from utils.runtime.context import Context

    return Context()


def test_original_training_records_every_epoch(tiny, tmp_path):
    from train_everything import train

    cfg = _cfg(tiny, tmp_path)
    summary = train(cfg, _ctx())
    out = paths.original_dir(cfg)
    for e in (1, 2, 3):
        assert (out / f"epoch_{e:03d}.pt").exists()
    fp = Fingerprint(**json.loads((out / "prob_history.manifest.json").read_text())["fingerprint"])
    hist = load_array(out / "prob_history.npy", fp)
    assert hist.shape == (3, fp.num_images)
    seen = np.isfinite(hist)
    # drop_last: every epoch sees all but the last partial batch; a value is a probability
    steps = fp.num_images // 32
    assert (seen.sum(1) == steps * 32).all()
    assert ((hist[seen] >= 0) & (hist[seen] <= 1)).all()
    topk = load_array(out / "topk_logits.npz", fp)
    assert topk["topk_index"].shape == (3, fp.num_images, 4)
    assert ((topk["topk_index"] >= 0) == seen[..., None]).all()
    # the plain backbone.pth loads strictly into a fresh model
    from backbones import get_model

    model = get_model("smallnet", num_features=64, input_size=32)
    model.load_state_dict(torch.load(out / "backbone.pth"), strict=True)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["type"] == "epoch"] == [1, 2, 3]
    assert summary["num_images"] == fp.num_images and summary["train_seconds"] > 0
    assert set(summary["verification"]) == {"syn_frontal", "syn_pose"}


@pytest.mark.slow
def test_resume_after_a_crash_equals_uninterrupted(tiny, tmp_path):
    import train_everything as training

    straight = _cfg(tiny, tmp_path / "a", "--record_topk", "0")
    training.train(straight, _ctx())
    train_until_killed(_cfg(tiny, tmp_path / "b", "--record_topk", "0"), _ctx(), epoch=2)
    resumed = _cfg(tiny, tmp_path / "b", "--record_topk", "0", "--resume", "true")
    training.train(resumed, _ctx())
    a = torch.load(paths.original_dir(straight) / "backbone.pth")
    b = torch.load(paths.original_dir(resumed) / "backbone.pth")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = np.load(paths.original_dir(straight) / "prob_history.npy")
    hb = np.load(paths.original_dir(resumed) / "prob_history.npy")
    assert np.array_equal(ha, hb, equal_nan=True)


@pytest.mark.slow
def test_torchrun_two_ranks_train_and_score_exactly(tiny, tmp_path):
    args = ["--rec", tiny, "--output", tmp_path, *TINY_TRAIN, "--batch_size", "16", "--num_epoch", "2",
            "--lr_steps", "1"]
    run_script("train_everything.py", *args, torchrun=2)
    cfg = parse_config([str(a) for a in args])
    hist = np.load(paths.original_dir(cfg) / "prob_history.npy")
    n = hist.shape[1]
    assert ((np.isfinite(hist)).sum(1) == (n // 32) * 32).all()  # each sample once, no padding duplicate
    # scoring: 2 ranks give the arrays of 1 process
    run_script("eval_trainset.py", *args, torchrun=2)
    two = dict(np.load(paths.scores_path(cfg)))
    run_script("eval_trainset.py", *args)
    one = dict(np.load(paths.scores_path(cfg)))
    assert np.array_equal(one["label"], two["label"]) and np.array_equal(one["pred"], two["pred"])
    for k in ("gt_prob_with_margin", "gt_prob", "pred_prob"):
        np.testing.assert_allclose(one[k], two[k], rtol=1e-4, atol=1e-6)


def test_retrain_on_kept_list_uses_label_map(tiny, tmp_path):
    from utils.artifacts.files import save_kept_index, save_label_map
    from utils.data.datasets import open_dataset
    from utils.pruning import label_map_for
    from train_everything import train

    ds = open_dataset(tiny)
    keep_ids = np.unique(ds.all_labels)[::2]
    kept = np.flatnonzero(np.isin(ds.all_labels, keep_ids))
    cfg = _cfg(tiny, tmp_path, "--is_original_train", "false", "--coreset_method", "rand", "--fraction", "0.5",
               "--num_epoch", "1", "--lr_steps", "1")
    save_kept_index(paths.kept_index_path(cfg), kept, "test", ds.fingerprint)
    save_label_map(paths.label_map_path(cfg), label_map_for(kept, ds.all_labels), "test", ds.fingerprint)
    summary = train(cfg, _ctx())
    assert summary["num_classes"] == len(keep_ids) and summary["num_images"] == len(kept)
    ckpt = torch.load(paths.train_dir(cfg) / "epoch_001.pt", weights_only=False)
    assert ckpt["head"]["weight"].shape[0] == len(keep_ids)


def test_bad_inputs_fail_before_work(tiny, tmp_path):
    from utils.artifacts.files import Fingerprint, save_kept_index

    base = ["--rec", tiny, "--output", tmp_path, *TINY_TRAIN]
    r = run_script("train_everything.py", "--rec", tmp_path / "nowhere", "--output", tmp_path, check=False)
    assert r.returncode == 1 and "not found" in r.stderr
    cfg = parse_config([str(a) for a in base + ["--is_original_train", "false", "--coreset_method", "rand"]])
    foreign = Fingerprint(10, 2, 3)
    save_kept_index(paths.kept_index_path(cfg), [0, 1, 2], "test", foreign)
    r = run_script("train_everything.py", *base, "--is_original_train", "false", "--coreset_method", "rand",
                   check=False)
    assert r.returncode == 1 and "another dataset" in r.stderr
    r = run_script("train_everything.py", *base, "--is_original_train", "false", "--coreset_method", "dynunc",
                   check=False)
    assert r.returncode == 1 and "missing kept list" in r.stderr
    r = run_script("eval_trainset.py", *base, check=False)
    assert r.returncode == 1 and "train the original model first" in r.stderr


def test_scoring_all_epochs_and_paper_format_weights(tiny, tmp_path):
    """use_all_epochs averages the per-epoch scores; a plain backbone.pth + the paper's `kernel` head
    (in_features x classes) scores exactly like this toolkit's checkpoint."""
    args = ["--rec", tiny, "--output", tmp_path, *TINY_TRAIN, "--num_epoch", "2", "--lr_steps", "1",
            "--record_topk", "0"]
    run_script("train_everything.py", *args)
    per_epoch = []
    for e in ("1", "2"):
        run_script("eval_trainset.py", *args, "--eval_epoch", e)
        per_epoch.append(dict(np.load(paths.scores_path(parse_config([str(a) for a in args + ["--eval_epoch", e]])))))
    run_script("eval_trainset.py", *args, "--use_all_epochs", "true")
    avg = dict(np.load(paths.scores_path(parse_config([str(a) for a in args + ["--use_all_epochs", "true"]]))))
    np.testing.assert_allclose(avg["gt_prob"], (per_epoch[0]["gt_prob"] + per_epoch[1]["gt_prob"]) / 2, rtol=1e-5)
    assert np.array_equal(avg["pred"], per_epoch[1]["pred"])
    labels = avg["label"]
    vote = np.mean([np.where(e["pred"] == labels, e["gt_prob_with_margin"].astype(np.float64), -1.0)
                    for e in per_epoch], axis=0)
    np.testing.assert_allclose(avg["argmax_vote"], vote, rtol=1e-6)  # the paper's cleaning over all epochs
    # the paper's release format: backbone state dict + head with `kernel` of shape (in_features, classes)
    ckpt = torch.load(paths.original_dir(parse_config([str(a) for a in args])) / "epoch_002.pt", weights_only=False)
    torch.save(ckpt["backbone"], tmp_path / "backbone.pth")
    torch.save({"kernel": ckpt["head"]["weight"].t().clone()}, tmp_path / "header.pth")
    out = tmp_path / "paper"
    paper_args = ["--rec", tiny, "--output", out, *TINY_TRAIN, "--checkpoint", tmp_path / "backbone.pth",
                  "--head_checkpoint", tmp_path / "header.pth"]
    run_script("eval_trainset.py", *paper_args)
    paper = dict(np.load(paths.scores_path(parse_config([str(a) for a in paper_args]))))
    np.testing.assert_allclose(paper["gt_prob_with_margin"], per_epoch[1]["gt_prob_with_margin"], rtol=1e-5, atol=1e-7)
    r = run_script("eval_trainset.py", *paper_args[:-2], check=False)
    assert r.returncode == 1 and "--head_checkpoint" in r.stderr


def test_retrain_with_relabelled_samples(tiny, tmp_path):
    from utils.artifacts.files import save_array
    from utils.data.datasets import open_dataset
    from utils.training.loop import prepare_run

    ds = open_dataset(tiny)
    cfg = _cfg(tiny, tmp_path, "--is_original_train", "false", "--coreset_method", "relabel", "--num_epoch", "1",
               "--lr_steps", "1")
    with pytest.raises(Exception, match="clean_trainset.py --relabel true"):
        prepare_run(cfg, _ctx())
    flagged = np.array([0, 5, 9])
    new = (ds.all_labels[flagged] + 1) % ds.num_classes
    save_array(paths.clean_dir(cfg) / "relabel.npz", {"index": flagged, "label": ds.all_labels[flagged],
                                                      "suggested_label": new}, "clean_trainset", ds.fingerprint)
    run = prepare_run(cfg, _ctx())
    assert len(run.dataset) == ds.num_images and run.dataset.num_classes == ds.num_classes
    assert np.array_equal(run.dataset.labels[flagged], new)
    others = np.setdiff1d(np.arange(ds.num_images), flagged)
    assert np.array_equal(run.dataset.labels[others], ds.all_labels[others])
    assert paths.train_dir(cfg).name.startswith("relabel_")


# ------------------------------------------------------------------- the GPU code paths, run on CPU
def _short(tiny, out, *extra):
    return _cfg(tiny, out, "--num_epoch", "1", "--lr_steps", "1", "--record_topk", "0", "--verify_every_epoch",
                "false", "--max_steps_per_epoch", "3", *extra)


@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16], ids=["fp16_scaler", "bf16"])
def test_autocast_paths_train_and_resume_on_cpu(tiny, tmp_path, amp):
    """The GPU precisions, forced on CPU through the Context (on CPU the default is fp32): fp16 runs with a
    grad scaler whose state is saved and resumed, bf16 without one."""
    from train_everything import train
    from utils.runtime.context import Context

    train(_short(tiny, tmp_path), Context(amp_dtype=amp))
    out = paths.original_dir(_short(tiny, tmp_path))
    scaler = torch.load(out / "resume_rank0_epoch001.pt", weights_only=True)["scaler"]
    assert ("scale" in scaler) == (amp == torch.float16)
    summary = train(_short(tiny, tmp_path, "--num_epoch", "2", "--resume", "true"), Context(amp_dtype=amp))
    assert summary["steps"] == 6  # 3 steps per epoch; train() stops on a non-finite loss


def test_bf16_step_agrees_with_fp32():
    from backbones import get_model
    from losses import ShardedClassifier
    from utils.training.loop import train_step

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 8
    losses = {}
    for amp in (None, torch.bfloat16):
        torch.manual_seed(0)
        model, head = get_model("smallnet", num_features=32, input_size=32), ShardedClassifier("CosFace", 32, 8)
        opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        losses[amp] = float(train_step(model, head, opt, scaler, images, labels, device=torch.device("cpu"),
                                       amp_dtype=amp)[0])
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.02)  # bf16 keeps 8 bits of mantissa


def test_compiled_model_state_dict_loads_into_an_uncompiled_one():
    from backbones import get_model
    from utils.models.build import build_backbone

    model = get_model("smallnet", num_features=32, input_size=32)
    state = torch.compile(model).state_dict()  # compiling is lazy: nothing is compiled here
    assert all(k.startswith("_orig_mod.") for k in state)
    loaded = build_backbone(state, "smallnet", 32, input_size=32)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.slow
def test_compile_trains_and_resumes_on_cpu(tiny, tmp_path):
    """--compile true on CPU (inductor: needs a C compiler); the saved backbone has plain keys."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU (inductor) needs a C compiler (cc); none on PATH")
    from backbones import get_model
    from train_everything import train

    train(_short(tiny, tmp_path, "--compile", "true", "--max_steps_per_epoch", "2"), _ctx())
    summary = train(_short(tiny, tmp_path, "--compile", "true", "--max_steps_per_epoch", "2", "--num_epoch", "2",
                           "--resume", "true"), _ctx())
    assert summary["steps"] == 4
    state = torch.load(paths.original_dir(_short(tiny, tmp_path)) / "backbone.pth", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state)
    get_model("smallnet", num_features=64, input_size=32).load_state_dict(state, strict=True)


@pytest.mark.parametrize("loss, margin", [("CosFace", lambda cos, m: cos - m),
                                          ("ArcFace", lambda cos, m: torch.cos(torch.acos(cos.clamp(-1, 1)) + m))])
def test_the_recorded_probability_is_the_heads_p_label_with_margin_for_the_same_batch(loss, margin):
    """DynUnc's input: the probability training records for a sample is softmax(s * margin-adjusted cosines) at its
    label, from the weights and embeddings of that very step (before the update), computed here from scratch."""
    from backbones import get_model
    from losses import ShardedClassifier
    from utils.training.loop import train_step

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(16) % 8
    torch.manual_seed(0)
    model, head = get_model("smallnet", num_features=32, input_size=32), ShardedClassifier(loss, 32, 8)
    weight = head.head.weight.detach().clone()  # before the step changes it
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, gt_prob, emb = train_step(model, head, opt, scaler, images, labels, device=torch.device("cpu"),
                                 flip_gen=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.normalize(emb.detach().double(), dim=1) @ \
        torch.nn.functional.normalize(weight.double(), dim=1).T
    s, m = head.head.s, head.head.m
    logits = s * cos
    rows = torch.arange(16)
    logits[rows, labels] = s * margin(cos[rows, labels], m)
    expected = torch.softmax(logits, dim=1)[rows, labels]
    assert gt_prob.shape == (16,)
    torch.testing.assert_close(gt_prob.double(), expected, rtol=1e-4, atol=1e-6)
    assert float(expected.min()) < 0.5  # an untrained head: the check is not a trivial 1.0 == 1.0
