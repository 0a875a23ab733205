"""ShardedClassifier: 2 gloo processes must reproduce the single-process head on the same global batch."""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import ShardedClassifier, class_split, get_head, list_heads

D, C = 16, 11  # 11 classes over 2 ranks: uneven slices (6 + 5)
LOCAL_SIZES = (6, 4)  # uneven local batches too (a last batch)
TOL = dict(rtol=1e-5, atol=1e-5)


def _global_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    n = sum(LOCAL_SIZES)
    return torch.randn(n, D, generator=gen) * 3.0, torch.randint(0, C, (n,), generator=gen)


def _worker(rank, world_size, init_file, names):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        lo = sum(LOCAL_SIZES[:rank])
        hi = lo + LOCAL_SIZES[rank]
        for name in names:
            single = ShardedClassifier(name, D, C)  # world_size 1: the reference, on the whole batch
            sharded = ShardedClassifier(name, D, C, rank=rank, world_size=world_size)
            start = single.full_state_dict()
            start["weight"] = torch.randn(start["weight"].shape, generator=torch.Generator().manual_seed(7))
            single.load_full_state_dict(start)
            sharded.load_full_state_dict(start)
            for step in range(2):  # the second step sees the EMA statistics the first one updated
                emb, labels = _global_batch(step)
                # the second step weights the samples (dynamic pruning) and asks for the per-sample losses
                weights = None if step == 0 else torch.rand(len(labels), generator=torch.Generator().manual_seed(3))
                ref_emb = emb.clone().requires_grad_()
                torch.manual_seed(step)  # Elastic heads draw margins: the same draw on both sides
                ref_loss, ref_prob, *ref_sample = single(ref_emb, labels, weights, per_sample=bool(step))
                ref_loss.backward()

                local_emb = emb[lo:hi].clone().requires_grad_()
                torch.manual_seed(step)
                loss, prob, *sample = sharded(local_emb, labels[lo:hi], None if weights is None else weights[lo:hi],
                                              per_sample=bool(step))
                loss.backward()
                if step:
                    torch.testing.assert_close(sample[0], ref_sample[0][lo:hi], **TOL, msg=f"{name}: sample loss")

                where = f"{name} step {step} rank {rank}"
                torch.testing.assert_close(loss, ref_loss, **TOL, msg=f"loss, {where}")
                assert prob.shape == (hi - lo,) and prob.dtype == torch.float32 and not prob.requires_grad
                torch.testing.assert_close(prob, ref_prob[lo:hi], **TOL, msg=f"gt_prob, {where}")
                # Convention: local embeddings get world_size x dLoss/d(local embeddings).
                torch.testing.assert_close(local_emb.grad, world_size * ref_emb.grad[lo:hi], **TOL,
                                           msg=f"embedding grad, {where}")
                sizes = [(e - s) * sharded.head.subcenters for s, e in class_split(C, world_size)]
                weight_grad = sharded.comm.all_gather_cat(sharded.head.weight.grad, sizes)
                torch.testing.assert_close(weight_grad, single.head.weight.grad, **TOL, msg=f"weight grad, {where}")
                single.zero_grad()
                sharded.zero_grad()

                topk = (3, 7)[step]  # 7 > the 5 classes of rank 1: its candidates are padded
                got = sharded.score(emb[lo:hi], labels[lo:hi], topk=topk)
                ref = single.score(emb, labels, topk=topk)
                assert set(got) == set(ref)
                for key in ref:
                    torch.testing.assert_close(got[key], ref[key][lo:hi], **TOL, msg=f"score {key}, {where}")

            full = sharded.full_state_dict()
            for key, value in single.full_state_dict().items():
                torch.testing.assert_close(full[key], value, **TOL, msg=f"state {key}, {name} rank {rank}")
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker, tmp_path, *args, nprocs=2, timeout=120):
    """Run worker(rank, nprocs, init_file, *args) in `nprocs` processes; fail the test after `timeout` s."""
    ctx = mp.spawn(worker, args=(nprocs, str(tmp_path / "store"), *args), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs}-process gloo check did not finish in {timeout} s")


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path):
    spawn_gloo(_worker, tmp_path, list_heads())


# ------------------------------------------------------------------ one process, no torch.distributed


@pytest.mark.parametrize("name", list_heads())
def test_single_process_equals_head_and_cross_entropy(name):
    assert not dist.is_initialized()
    clf = ShardedClassifier(name, D, C)
    head = get_head(name, D, C)
    head.load_state_dict(clf.full_state_dict())
    emb, labels = _global_batch(0)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    torch.manual_seed(0)
    loss, prob = clf(e1, labels)
    torch.manual_seed(0)
    logits = head(e2, labels)
    ref = torch.nn.functional.cross_entropy(logits, labels)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(prob, logits.softmax(1)[range(len(labels)), labels].detach(), **TOL)
    torch.testing.assert_close(e1.grad, e2.grad, **TOL)
    torch.testing.assert_close(clf.head.weight.grad, head.weight.grad, **TOL)


def test_score_definitions():
    torch.manual_seed(0)
    clf = ShardedClassifier("CosFace", D, C)
    emb, labels = _global_batch(1)
    clf.train()
    out = clf.score(emb, labels, topk=4)
    assert clf.training  # score leaves the mode as it found it
    with torch.no_grad():
        plain = clf.head.logits_without_margin(emb)
        margin = clf.head(emb, labels)
    rows = range(len(labels))
    torch.testing.assert_close(out["gt_prob"], plain.softmax(1)[rows, labels])
    torch.testing.assert_close(out["gt_prob_with_margin"], margin.softmax(1)[rows, labels])
    assert torch.equal(out["pred"], plain.argmax(1)) and out["pred"].dtype == torch.int64
    torch.testing.assert_close(out["pred_prob"], plain.softmax(1).max(1).values)
    values, index = plain.topk(4, dim=1)
    torch.testing.assert_close(out["topk_logits"], values)
    assert torch.equal(out["topk_index"], index) and out["topk_index"].dtype == torch.int64
    rest = (plain.sum(1) - values.sum(1)) / (C - 4)
    torch.testing.assert_close(out["rest_mean_logit"], rest)
    assert set(clf.score(emb, labels)) == {"gt_prob_with_margin", "gt_prob", "pred", "pred_prob", "label_cos",
                                           "other_cos", "other_class"}
    cos = plain / clf.s
    others = cos.clone()
    others[rows, labels] = float("-inf")
    torch.testing.assert_close(out["label_cos"], cos[rows, labels])
    torch.testing.assert_close(out["other_cos"], others.max(1).values)
    assert torch.equal(out["other_class"], others.argmax(1))


def test_state_dict_round_trip_and_errors():
    clf = ShardedClassifier("CurricularFace", D, C)
    state = clf.full_state_dict()
    assert set(state) == set(get_head("CurricularFace", D, C).state_dict()) == {"weight", "t"}
    with pytest.raises(ValueError, match=r"expected 'weight' of shape \(11, 16\)"):
        clf.load_full_state_dict({**state, "weight": torch.zeros(C + 1, D)})
    with pytest.raises(ValueError, match="labels must be in"):
        clf(torch.randn(2, D), torch.tensor([0, C]))
    assert class_split(11, 2) == [(0, 6), (6, 11)] and class_split(10, 3) == [(0, 4), (4, 7), (7, 10)]


def test_score_label_logit_is_the_margin_free_labelled_logit():
    # AUM and EL2N need the labelled class's logit when it is outside the recorded top k
    clf = ShardedClassifier("ArcFace", D, C)
    emb, labels = _global_batch(2)
    with torch.no_grad():
        plain = clf.head.logits_without_margin(emb)
    labels[::2] = plain.argmax(1)[::2]  # half the rows with the label on top
    out = clf.score(emb, labels, topk=3)
    torch.testing.assert_close(out["label_logit"], plain[range(len(labels)), labels])
    on_top = out["topk_index"][:, 0] == labels  # same scale and value as the top-k record there
    assert on_top.any() and torch.equal(out["label_logit"][on_top], out["topk_logits"][on_top, 0])
    assert "label_logit" not in clf.score(emb, labels)


@pytest.mark.parametrize("name", list_heads())
def test_weighted_and_per_sample_losses_are_the_heads_cross_entropy(name):
    """forward(..., weights, per_sample=True): the loss is mean(w * CE) over the batch, the per-sample losses are
    CE with reduction none, and the gradients are those of mean(w * CE); without weights, the plain mean."""
    clf = ShardedClassifier(name, D, C)
    head = get_head(name, D, C)
    head.load_state_dict(clf.full_state_dict())
    emb, labels = _global_batch(1)
    weights = torch.tensor([0.0, 2.0, 1.0, 1.0, 0.5, 2.0, 1.0, 0.0, 1.0, 3.0])
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    torch.manual_seed(0)
    loss, prob, sample_loss = clf(e1, labels, weights, per_sample=True)
    torch.manual_seed(0)
    logits = head(e2, labels)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    ref = (weights * ce).mean()
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(sample_loss, ce.detach(), **TOL)
    torch.testing.assert_close(prob, torch.exp(-ce.detach()), **TOL)
    assert not sample_loss.requires_grad
    torch.testing.assert_close(e1.grad, e2.grad, **TOL)
    torch.testing.assert_close(clf.head.weight.grad, head.weight.grad, **TOL)
    with pytest.raises(ValueError, match="3 weights for 10 embeddings"):
        clf(emb, labels, torch.ones(3))


def test_no_weights_is_bitwise_the_plain_mean():
    clf = ShardedClassifier("CosFace", D, C)
    emb, labels = _global_batch(2)
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    loss_a, prob_a = clf(a, labels)
    loss_b, prob_b, _ = clf(b, labels, torch.ones(len(labels)), per_sample=True)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b) and torch.equal(prob_a, prob_b) and torch.equal(a.grad, b.grad)
