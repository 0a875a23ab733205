"""Sub-center ArcFace: k sub-centres per class, the class cosine max-pooled over them, ArcFace's margin on it;
its weight (classes * k rows, class-major) through the sharded head, Partial FC, checkpoints, resume and scoring."""
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from config.config import parse_config
from losses import ShardedClassifier, class_split, get_head
from losses.sharded import resplit_rows
from tests import test_config
from tests.helpers import TINY_TRAIN, make_tiny_dataset, train_until_killed
from tests.test_partial_fc import sampled_reference, step_on_shard
from tests.test_resume_world_size import fake_resume_states
from tests.test_sharded_head import spawn_gloo
from utils.artifacts import paths
from utils.runtime.context import Context

NAME = "SubCenterArcFace"
D, C, K = 16, 11, 3
TOL = dict(rtol=1e-5, atol=1e-5)


def _batch(n=8, seed=0, classes=C):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 3.0, torch.randint(0, classes, (n,), generator=gen)


# ------------------------------------------------------------------ the head


def test_pooled_cosine_and_arcface_logits_by_hand():
    torch.manual_seed(0)
    head = get_head(NAME, D, C)
    assert head.k == head.subcenters == K and head.weight.shape == (C * K, D)
    emb, labels = _batch()
    e = F.normalize(emb.double(), dim=1)
    w = F.normalize(head.weight.detach().double(), dim=1)
    per = torch.tensor([[[float(e[i] @ w[c * K + j]) for j in range(K)] for c in range(C)] for i in range(len(emb))],
                       dtype=torch.float64)
    torch.testing.assert_close(head.subcenter_cosine(emb).detach().double(), per, rtol=0, atol=1e-6)
    pooled = head.cosine(emb).detach()
    torch.testing.assert_close(pooled.double(), per.max(dim=2).values, rtol=0, atol=1e-6)
    # ArcFace's target logit on the pooled cosine: cos(theta + m), past pi - m the fallback cos - sin(pi - m) * m
    m, s = 0.5, 64.0
    cos_y = pooled.double()[range(len(emb)), labels]
    target = torch.where(cos_y > math.cos(math.pi - m), torch.cos(torch.acos(cos_y) + m),
                         cos_y - math.sin(math.pi - m) * m)
    expected = s * pooled.double()
    expected[range(len(emb)), labels] = s * target
    logits = head(emb, labels)
    torch.testing.assert_close(logits.detach().double(), expected, rtol=0, atol=2e-4)
    assert torch.equal(logits, get_head("ArcFace", D, C).margin_logits(head.cosine(emb), labels))
    # Partial FC's columns: all k rows of each kept class
    columns = torch.tensor([1, 4, 10])
    torch.testing.assert_close(head.cosine(emb, columns), head.cosine(emb)[:, columns], rtol=0, atol=1e-6)
    # max pooling: of a class's sub-centres only the closest one to a sample gets its gradient
    head(emb[:1], labels[:1]).sum().backward()
    rows = head.weight.grad[labels[0] * K:(labels[0] + 1) * K].abs().sum(1)
    assert int((rows > 0).sum()) == 1 and int(rows.argmax()) == int(per[0, labels[0]].argmax())


def test_one_subcentre_is_arcface_bitwise():
    arc, sub = get_head("ArcFace", D, C), get_head(NAME, D, C, k=1.0)
    sub.load_state_dict(arc.state_dict())
    emb, labels = _batch(seed=1)
    assert sub.subcenters == 1 and torch.equal(sub(emb, labels), arc(emb, labels))
    assert "label_subcenter_cos" not in ShardedClassifier(NAME, D, C, k=1).score(emb, labels)
    assert "label_subcenter_cos" not in ShardedClassifier("ArcFace", D, C).score(emb, labels)


def test_score_label_subcenter_cos():
    clf = ShardedClassifier(NAME, D, C)
    emb, labels = _batch(seed=2)
    out = clf.score(emb, labels, topk=2)
    sub = clf.head.subcenter_cosine(emb)[range(len(labels)), labels]
    assert out["label_subcenter_cos"].shape == (len(labels), K) and out["label_subcenter_cos"].dtype == torch.float32
    assert torch.equal(out["label_subcenter_cos"], sub)
    torch.testing.assert_close(out["label_logit"], 64.0 * sub.max(dim=1).values)


# ------------------------------------------------------------------ 2 gloo ranks == 1 process, with Partial FC


def _worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        classes, sizes = 40, (5, 3)  # 40 classes: sampling at 0.3 leaves some out
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        start, end = class_split(classes, world_size)[rank]
        emb, labels = _batch(n=sum(sizes), seed=5, classes=classes)
        for rate in (1.0, 0.3):
            single = ShardedClassifier(NAME, D, classes)
            sharded = ShardedClassifier(NAME, D, classes, rank=rank, world_size=world_size, sample_rate=rate)
            state = single.full_state_dict()
            state["weight"] = torch.randn(classes * K, D, generator=torch.Generator().manual_seed(7))
            single.load_full_state_dict(state)
            sharded.load_full_state_dict(state)
            full = sharded.full_state_dict()
            assert full.keys() == state.keys() and all(torch.equal(full[key], state[key]) for key in state)
            local_emb, loss, prob, union = step_on_shard(sharded, emb, labels, lo, hi)
            assert (union.numel() < classes) == (rate < 1)
            ref_emb, logits, target, ref = sampled_reference(single, emb, labels, union)
            where = f"rate {rate} rank {rank}"
            torch.testing.assert_close(loss, ref, **TOL, msg=f"loss, {where}")
            torch.testing.assert_close(prob, logits.softmax(1)[range(lo, hi), target[lo:hi]].detach(), **TOL)
            torch.testing.assert_close(local_emb.grad, world_size * ref_emb.grad[lo:hi], **TOL)
            rows = single.head.weight.grad[start * K:end * K]  # this shard's classes' k rows each
            torch.testing.assert_close(sharded.head.weight.grad, rows, **TOL, msg=f"weight grad, {where}")
            left_out = torch.ones(classes, dtype=torch.bool)
            left_out[union] = False
            assert not sharded.head.weight.grad.view(-1, K, D)[left_out[start:end]].any()  # not kept: no gradient
            got = sharded.score(emb[lo:hi], labels[lo:hi], topk=3)
            ref_score = single.score(emb, labels, topk=3)
            assert set(got) == set(ref_score) and "label_subcenter_cos" in got
            for key in ref_score:
                torch.testing.assert_close(got[key], ref_score[key][lo:hi], **TOL, msg=f"score {key}, {where}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_and_without_partial_fc(tmp_path):
    spawn_gloo(_worker, tmp_path)


# ------------------------------------------------------------------ checkpoints, resume, config


def test_full_state_dict_round_trip_and_wrong_shape():
    clf = ShardedClassifier(NAME, D, C, k=2)
    state = clf.full_state_dict()
    assert state["weight"].shape == (C * 2, D)
    other = ShardedClassifier(NAME, D, C, k=2)
    other.load_full_state_dict(state)
    assert torch.equal(other.head.weight, clf.head.weight)
    with pytest.raises(ValueError, match=r"expected 'weight' of shape \(22, 16\): \(classes x 2 sub-centres, "
                                         r"in_features\), found \(11, 16\)"):
        other.load_full_state_dict({"weight": torch.zeros(C, D)})


def test_scoring_model_weight_shape_names_the_subcentres(tmp_path):
    from tests.test_head_args import SMALL, save_model
    from utils.artifacts.files import ArtifactError
    from utils.models.build import load_scoring_model
    from utils.models.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "epoch_001.pt"
    cfg = parse_config(["--loss", NAME, "--head_args", "k=2"] + SMALL)
    head, fingerprint = save_model(path, cfg, 5)
    model = load_scoring_model(parse_config(SMALL), Context(), path, fingerprint, 5)
    assert model.head.head.k == 2 and torch.equal(model.head.head.weight, head.head.weight)
    ckpt = load_checkpoint(path)
    ckpt["head"]["weight"] = ckpt["head"]["weight"][:5]
    save_checkpoint(path, ckpt)
    with pytest.raises(ArtifactError, match=r"the head's weight is \(5, 8\), expected \(10, 8\): \(the dataset's "
                                            r"classes x 2 sub-centres, --embedding_size\)"):
        load_scoring_model(parse_config(SMALL), Context(), path, fingerprint, 5)


@pytest.mark.parametrize("old,new", [(3, 2), (1, 3)])
def test_resume_resplit_keeps_each_class_subcentres_together(old, new):
    from utils.training.resume import resplit_resume_state

    states, weight, momentum, _ = fake_resume_states(old, subcenters=K)
    out = [resplit_resume_state(states, 11, new, rank, subcenters=K) for rank in range(new)]
    for rank, o in enumerate(out):
        start, end = class_split(11, new)[rank]
        assert torch.equal(o["head_shard"]["head.weight"], weight[start * K:end * K])
        assert torch.equal(o["optimizer"]["state"][1]["momentum_buffer"], momentum[start * K:end * K])
    with pytest.raises(ValueError, match="hold 11 classes x 3 sub-centres, expected 12"):
        resplit_rows([s["head_shard"]["head.weight"] for s in states], 12, new, 0, subcenters=K)


def test_head_args_k_reaches_the_head_and_bad_k_is_refused(capsys):
    from utils.models.build import build_head, head_kwargs

    cfg = parse_config(["--loss", "subcenterarcface", "--head_args", "k=2"])
    assert cfg.loss == NAME and cfg.head_args == {"k": 2.0}
    head = build_head(cfg.loss, 8, 5, Context(), head_kwargs(cfg)).head
    assert head.k == 2 and head.weight.shape == (10, 8)
    for bad in ("1.5", "0"):
        test_config.test_bad_values_exit_2_with_message(
            ["--loss", NAME, "--head_args", f"k={bad}"],
            f"SubCenterArcFace: k (sub-centres per class) must be a whole number >= 1, got {float(bad)}", capsys)


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_trains_resumes_exactly_and_scores(tmp_path):
    import eval_trainset
    import train_everything as training
    from utils.artifacts.files import read_array

    rec = make_tiny_dataset(tmp_path / "tiny")

    def cfg(out, *extra):
        return parse_config(["--rec", str(rec), "--output", str(out), *TINY_TRAIN, "--loss", NAME,
                             "--original_net_loss", NAME, "--head_args", "k=2", "--num_epoch", "2", "--lr_steps", "1",
                             "--verify_every_epoch", "false", *extra])

    straight = cfg(tmp_path / "a")
    training.train(straight, Context())
    train_until_killed(cfg(tmp_path / "b"), Context(), epoch=1)
    resumed = cfg(tmp_path / "b", "--resume", "true")
    training.train(resumed, Context())
    a, b = (torch.load(paths.epoch_checkpoint(paths.original_dir(c), 2), weights_only=True)
            for c in (straight, resumed))
    assert a["head"]["weight"].shape == (2 * a["head_info"]["num_classes"], 64)
    for part in ("backbone", "head"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    history = [np.load(paths.original_dir(c) / "prob_history.npy") for c in (straight, resumed)]
    assert np.array_equal(*history, equal_nan=True)
    scores = read_array(eval_trainset.score_trainset(straight, Context()))
    for key in ("gt_prob_with_margin", "gt_prob", "pred_prob"):
        assert np.isfinite(scores[key]).all() and ((scores[key] >= 0) & (scores[key] <= 1)).all(), key
