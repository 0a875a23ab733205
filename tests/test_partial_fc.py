"""Partial FC sampling (`sample_rate`): the sampled softmax over each rank's positives plus random negatives."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from losses import ShardedClassifier, class_split, list_heads
from tests.test_sharded_head import spawn_gloo

D, C = 16, 40
TOL = dict(rtol=1e-6, atol=1e-6)
GRAD_TOL = dict(rtol=1e-5, atol=1e-5)  # gradients of s=64 logits (|g| ~ 1): float32 sums in another order


def _batch(n=12, seed=0, classes=C):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen) * 3.0, torch.randint(0, classes, (n,), generator=gen)


def _pair(name, rate, **kw):
    """A full head and a sampling head with the same weights."""
    full = ShardedClassifier(name, D, C)
    sampled = ShardedClassifier(name, D, C, sample_rate=rate, **kw)
    sampled.load_full_state_dict(full.full_state_dict())
    return full, sampled


def sampled_reference(single, emb, labels, columns):
    """(embeddings with grad, logits, targets, loss) of the full head's margin logits restricted to `columns`
    (sorted global class ids), cross-entropy over them; the loss is backpropagated."""
    ref_emb = emb.clone().requires_grad_()
    logits = single.head(ref_emb, labels)[:, columns]
    target = torch.searchsorted(columns, labels)
    ref = F.cross_entropy(logits, target)
    ref.backward()
    return ref_emb, logits, target, ref


def _step(clf, emb, labels):
    emb = emb.clone().requires_grad_()
    torch.manual_seed(0)  # Elastic heads draw margins
    loss, prob = clf(emb, labels)
    loss.backward()
    return loss, prob, emb.grad, clf.head.weight.grad


@pytest.mark.parametrize("name", list_heads())
def test_rate_one_and_every_class_kept_equal_the_full_head(name):
    """sample_rate=1 is today's head; a sampled step that keeps every class (all are positives) is too."""
    emb, labels = _batch(n=2 * C)
    labels[:C] = torch.arange(C)  # every class is in the batch: nothing can be left out
    full, same = _pair(name, 1.0)
    for a, b in zip(_step(full, emb, labels), _step(same, emb, labels)):
        assert torch.equal(a, b)
    full, sampled = _pair(name, 0.25)
    for a, b in zip(_step(full, emb, labels), _step(sampled, emb, labels)):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("name", ["CosFace", "ArcFace", "AdaFace"])
def test_sampled_step_is_cross_entropy_over_the_kept_classes(name, monkeypatch):
    emb, labels = _batch(n=6)
    full, sampled = _pair(name, 0.3)
    kept = []
    real = sampled.sample_columns
    monkeypatch.setattr(sampled, "sample_columns", lambda local: kept.append(real(local)) or kept[-1])
    loss, prob, emb_grad, weight_grad = _step(sampled, emb, labels)
    columns = kept[0]
    assert columns.numel() == int(0.3 * C) and torch.isin(labels, columns).all()
    assert torch.equal(columns, columns.sort().values)
    ref_emb, logits, target, ref = sampled_reference(full, emb, labels, columns)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(prob, logits.softmax(1)[range(len(labels)), target].detach(), **TOL)
    torch.testing.assert_close(emb_grad, ref_emb.grad, **GRAD_TOL)
    torch.testing.assert_close(weight_grad, full.head.weight.grad, **GRAD_TOL)  # zero outside the kept rows
    left_out = torch.ones(C, dtype=torch.bool)
    left_out[columns] = False
    assert not weight_grad[left_out].any()
    # the sampled probability is above the full softmax's (a smaller denominator)
    assert (prob >= full.score(emb, labels)["gt_prob_with_margin"] - 1e-6).all()


def test_draws_are_seeded_and_continue_after_a_reload():
    emb, labels = _batch(n=4)
    a = ShardedClassifier("CosFace", D, C, sample_rate=0.2, sample_seed=3)
    b = ShardedClassifier("CosFace", D, C, sample_rate=0.2, sample_seed=3)
    local = a._local_labels(labels)
    first = [a.sample_columns(local) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, [b.sample_columns(local) for _ in range(3)]))
    assert not torch.equal(first[0], first[1])  # a new draw every step
    assert int(a.state_dict()["sample_draws"]) == 3
    c = ShardedClassifier("CosFace", D, C, sample_rate=0.2, sample_seed=3)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.sample_columns(local), a.sample_columns(local))
    other = ShardedClassifier("CosFace", D, C, sample_rate=0.2, sample_seed=4)
    assert not torch.equal(other.sample_columns(local), first[0])
    # in eval mode (scoring) nothing is sampled; sample_rate=1 has no draw counter
    a.eval()
    assert not a.sampling and "sample_draws" not in ShardedClassifier("CosFace", D, C).state_dict()


def test_sample_rate_outside_0_1_is_refused():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sample_rate=.* must be in \(0, 1\]"):
            ShardedClassifier("CosFace", D, C, sample_rate=bad)
    from config.config import parse_config

    with pytest.raises(SystemExit) as e:
        parse_config(["--sample_rate", "0"])
    assert e.value.code == 2


def spy_on_draws(clf) -> list:
    """The list that each of `clf`'s sampled steps appends its kept local columns to."""
    kept = []
    real = clf.sample_columns
    clf.sample_columns = lambda local: kept.append(real(local)) or kept[-1]
    return kept


def union_of_draws(clf, columns: torch.Tensor) -> torch.Tensor:
    """The global class ids every rank kept in a step, sorted (shards are in class order), from this rank's local
    `columns`; a collective."""
    mine = columns + clf.class_start
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(clf.world_size)]
    dist.all_gather(counts, torch.tensor([mine.numel()]))
    return clf.comm.all_gather_cat(mine, [int(c) for c in counts])


def step_on_shard(sharded, emb, labels, lo, hi):
    """A training step of this rank's `sharded` on its rows [lo, hi) of the global batch: (its embeddings, with their
    gradient, loss, gt_prob, the classes the ranks kept: sorted global ids, every one of the rank without sampling)."""
    kept = spy_on_draws(sharded)
    local_emb = emb[lo:hi].clone().requires_grad_()
    loss, prob = sharded(local_emb, labels[lo:hi])
    loss.backward()
    columns = kept[0] if kept else torch.arange(sharded.class_end - sharded.class_start)
    return local_emb, loss, prob, union_of_draws(sharded, columns)


def _worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sizes = (5, 3)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        emb, labels = _batch(n=sum(sizes), seed=5)
        torch.manual_seed(0)  # the same initial centres on both ranks
        single = ShardedClassifier("ArcFace", D, C)
        sharded = ShardedClassifier("ArcFace", D, C, rank=rank, world_size=world_size, sample_rate=0.3)
        sharded.load_full_state_dict(single.full_state_dict())
        local_emb, loss, prob, union = step_on_shard(sharded, emb, labels, lo, hi)
        start = class_split(C, world_size)[rank][0]
        assert torch.isin(labels, union).all()
        ref_emb, logits, target, ref = sampled_reference(single, emb, labels, union)
        torch.testing.assert_close(loss, ref, **TOL)
        torch.testing.assert_close(prob, logits.softmax(1)[range(lo, hi), target[lo:hi]].detach(), **TOL)
        torch.testing.assert_close(local_emb.grad, world_size * ref_emb.grad[lo:hi], **GRAD_TOL)
        end = class_split(C, world_size)[rank][1]
        torch.testing.assert_close(sharded.head.weight.grad, single.head.weight.grad[start:end], **GRAD_TOL)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_sample_their_own_shards(tmp_path):
    """Over 2 gloo ranks the loss is the cross-entropy over the union of the classes each rank kept."""
    spawn_gloo(_worker, tmp_path)


@pytest.mark.slow
def test_training_with_sampling_records_the_full_softmax(tmp_path):
    from config.config import parse_config
    from tests.helpers import TINY_TRAIN, make_tiny_dataset
    from train_everything import train
    from utils.artifacts import paths
    from utils.runtime.context import Context

    rec = make_tiny_dataset(tmp_path / "tiny")
    cfg = parse_config(["--rec", str(rec), "--output", str(tmp_path / "out"), *TINY_TRAIN, "--num_epoch", "2",
                        "--lr_steps", "1", "--sample_rate", "0.5", "--record_topk", "0", "--verify_every_epoch",
                        "false"])
    train(cfg, Context())
    out = paths.original_dir(cfg)
    info = json.loads((out / "probs" / "epoch_001.manifest.json").read_text())["info"]
    assert info["sample_rate"] == 0.5 and info["recorded_prob"].startswith("full softmax")
    assert json.loads((out / "prob_history.manifest.json").read_text())["info"]["sample_rate"] == 0.5
    resume = torch.load(out / "resume_rank0_epoch002.pt", weights_only=True)
    assert "sample_draws" in resume["head_shard"]  # the draw count resumes with the head
