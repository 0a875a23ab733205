"""Inter-class filtering (`interclass_filter`): a training step leaves out of the loss each sample whose margin-free
cosine to another identity's centre exceeds the threshold; the loss is the mean over the others. The head on a
hand-built batch, 1 against 2 gloo processes (with and without Partial FC), and train_everything.py's per-epoch
counts, on 1 and 2 processes and across a crash and --resume true."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from losses import ShardedClassifier
from tests.helpers import TINY_TRAIN, make_tiny_dataset, run_script, train_until_killed
from tests.test_partial_fc import spy_on_draws, union_of_draws
from tests.test_sharded_head import spawn_gloo
from utils.artifacts.files import ArtifactError

TOL = dict(rtol=1e-5, atol=1e-5)


def _hand_built():
    """(embeddings, labels, the rows a threshold of 0.5 filters) on 4 orthonormal centres: each row's largest cosine
    to a centre other than its label's is 0, 0.625, 0, 0.447, 1 (an image of identity 1 labelled 0) and 0."""
    e = torch.eye(4)
    emb = torch.stack([e[0], e[0] + 0.8 * e[1], 2 * e[2], e[3] + 0.5 * e[2], e[1], -e[0]])
    labels = torch.tensor([0, 0, 2, 3, 0, 1])
    return emb, labels, torch.tensor([False, True, False, False, True, False])


def _clf(name="CosFace", threshold=0.5, **kw):
    clf = ShardedClassifier(name, 4, 4, **kw)
    clf.load_full_state_dict({**clf.full_state_dict(), "weight": 3.0 * torch.eye(4)})
    clf.set_interclass_filter(threshold)
    return clf


@pytest.mark.parametrize("weighted", [False, True])
def test_the_filtered_rows_weigh_nothing_and_the_loss_is_the_mean_over_the_rest(weighted):
    emb, labels, mask = _hand_built()
    clf = _clf()
    weights = torch.tensor([2.0, 1.0, 0.5, 1.5, 3.0, 1.0]) if weighted else None
    x = emb.clone().requires_grad_()
    loss, prob, sample_loss = clf(x, labels, weights, per_sample=True)
    loss.backward()
    assert torch.equal(clf.last_filtered, mask)
    # the literal CosFace loss: s * (cos - m at the label), cross-entropy, mean over the rows kept
    def literal_ce(e):
        cos = F.normalize(e, dim=1) @ torch.eye(4).T
        return F.cross_entropy(clf.head.s * (cos - clf.head.m * F.one_hot(labels, 4)), labels, reduction="none")

    y = emb.clone().requires_grad_()
    ce = literal_ce(y)
    w = torch.ones(6) if weights is None else weights
    ref = (w * ce)[~mask].sum() / (~mask).sum()
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(x.grad, y.grad, **TOL)  # the gradient of the literal loss
    assert not x.grad[mask].any() and x.grad[[3, 5]].abs().sum(1).gt(0).all()
    ce = ce.detach()
    torch.testing.assert_close(sample_loss, ce, **TOL)  # the per-sample losses and probabilities: every row
    torch.testing.assert_close(prob, torch.exp(-ce), **TOL)


def test_every_row_filtered_gives_a_zero_loss_and_no_nan():
    emb, labels, _ = _hand_built()
    clf = _clf(threshold=0.0001)
    x = (emb + 0.05).requires_grad_()  # every row has a positive cosine to another centre
    loss, _ = clf(x, labels)
    loss.backward()
    assert clf.last_filtered.all() and float(loss.detach()) == 0.0
    assert torch.isfinite(x.grad).all() and not x.grad.any() and not clf.head.weight.grad.any()


def test_off_is_bitwise_the_head_without_it_and_eval_mode_filters_nothing():
    emb, labels, _ = _hand_built()
    plain, off = _clf(threshold=0.0), _clf(threshold=0.0)
    off.set_interclass_filter(0.5)
    off.set_interclass_filter(0)
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    (la, pa), (lb, pb) = plain(a, labels), off(b, labels)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb) and torch.equal(pa, pb) and torch.equal(a.grad, b.grad) and off.last_filtered is None
    on = _clf()
    on.eval()
    assert torch.equal(on(emb, labels)[0], plain(emb, labels)[0]) and on.last_filtered is None
    for bad in (1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"interclass_filter=.* must be in \[0, 1\)"):
            on.set_interclass_filter(bad)


def test_with_sampling_only_the_sampled_centres_count(monkeypatch):
    """Partial FC: a row close to a centre that was not drawn is not filtered."""
    emb, labels, _ = _hand_built()
    clf = _clf(sample_rate=0.5)  # 2 columns of 4: a batch of labels {0, 2} keeps only its positives, 0 and 2
    keep = [0, 1, 2]  # row 1 is close to centre 1, which is not drawn: kept
    clf(emb[keep], torch.tensor([0, 0, 2]))
    assert torch.equal(clf.last_filtered, torch.tensor([False, False, False]))
    monkeypatch.setattr(clf, "sample_columns", lambda local: torch.tensor([0, 1, 2]))
    clf(emb[keep], torch.tensor([0, 0, 2]))
    assert torch.equal(clf.last_filtered, torch.tensor([False, True, False]))


# --------------------------------------------------------------------------------------- 1 and 2 processes
D, C = 16, 11
SIZES = (6, 4)
THRESHOLD = 0.35


def _batch(seed=5):
    gen = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    return torch.randn(n, D, generator=gen) * 3.0, torch.randint(0, C, (n,), generator=gen)


def _worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        lo, hi = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
        emb, labels = _batch()
        centres = torch.randn(C, D, generator=torch.Generator().manual_seed(7))
        single = ShardedClassifier("ArcFace", D, C)
        single.load_full_state_dict({**single.full_state_dict(), "weight": centres})
        single.set_interclass_filter(THRESHOLD)
        ref_emb = emb.clone().requires_grad_()
        ref_loss, _ = single(ref_emb, labels)
        ref_loss.backward()
        mask = single.last_filtered
        assert 0 < int(mask.sum()) < len(mask)  # some rows filtered, not all
        for rate in (1.0, 0.5):
            sharded = ShardedClassifier("ArcFace", D, C, rank=rank, world_size=world_size, sample_rate=rate)
            sharded.load_full_state_dict({**sharded.full_state_dict(), "weight": centres})
            sharded.set_interclass_filter(THRESHOLD)
            kept = spy_on_draws(sharded)
            local_emb = emb[lo:hi].clone().requires_grad_()
            loss, _ = sharded(local_emb, labels[lo:hi])
            loss.backward()
            if rate == 1.0:  # the single process's mask, loss and gradients
                want_mask, want_loss, want_grad = mask, ref_loss, ref_emb.grad
            else:  # the literal rule over the union of the centres the ranks drew
                union = union_of_draws(sharded, kept[0])
                assert union.numel() < C
                x = emb.clone().requires_grad_()
                cos = single.head.cosine(x).detach()[:, union]
                cos[labels[:, None] == union[None, :]] = -2.0
                want_mask = cos.max(1).values > THRESHOLD
                logits = single.head(x, labels)[:, union]
                ce = F.cross_entropy(logits, torch.searchsorted(union, labels), reduction="none")
                want_loss = ce[~want_mask].mean()
                want_loss.backward()
                want_grad = x.grad
            where = f"rank {rank}, sample_rate {rate}"
            assert torch.equal(sharded.last_filtered, want_mask[lo:hi]), where
            torch.testing.assert_close(loss, want_loss.detach(), **TOL, msg=where)
            torch.testing.assert_close(local_emb.grad, world_size * want_grad[lo:hi], **TOL, msg=where)
            assert not local_emb.grad[want_mask[lo:hi]].any()
    finally:
        dist.destroy_process_group()


def test_two_ranks_filter_the_rows_one_process_filters(tmp_path):
    spawn_gloo(_worker, tmp_path)


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


ARGS = [*TINY_TRAIN, "--record_topk", "0", "--max_steps_per_epoch", "4", "--verify_every_epoch", "false",
        "--interclass_filter", "0.3"]


def _cfg(rec, out, *extra):
    from config.config import parse_config

    return parse_config(["--rec", str(rec), "--output", str(out), *ARGS, *map(str, extra)])


def test_training_counts_the_filtered_samples_and_resumes_them(tiny, tmp_path):
    import train_everything as training
    from utils.artifacts import paths
    from utils.runtime.context import Context

    straight = _cfg(tiny, tmp_path / "a")
    summary = training.train(straight, Context())
    counts, trained = summary["interclass_filtered"], summary["samples_per_epoch"]
    assert len(counts) == 3 and all(0 < c < t for c, t in zip(counts, trained)), (counts, trained)
    log = (paths.original_dir(straight) / "training.log").read_text()
    assert f"epoch 3: interclass_filter 0.3 left {counts[2]} of the {trained[2]} samples" in log

    train_until_killed(_cfg(tiny, tmp_path / "b"), Context(), epoch=2)
    with pytest.raises(ArtifactError, match="trained with interclass_filter=0.3, not 0.4"):
        training.train(_cfg(tiny, tmp_path / "b", "--resume", "true", "--interclass_filter", "0.4"), Context())
    resumed = training.train(_cfg(tiny, tmp_path / "b", "--resume", "true"), Context())
    assert resumed["interclass_filtered"] == counts and resumed["samples_per_epoch"] == trained
    a = torch.load(paths.original_dir(straight) / "backbone.pth")
    b = torch.load(paths.original_dir(_cfg(tiny, tmp_path / "b")) / "backbone.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)

    run_script("train_everything.py", "--rec", tiny, "--output", tmp_path / "c", *ARGS, "--batch_size", "16",
               torchrun=2)
    two = json.loads((tmp_path / "c" / "original_smallnet_CosFace" / "train_summary.json").read_text())
    assert two["world_size"] == 2 and len(two["interclass_filtered"]) == 3
    assert all(0 < c < t for c, t in zip(two["interclass_filtered"], two["samples_per_epoch"]))


def test_a_threshold_outside_0_1_is_refused_in_one_line(tiny, tmp_path):
    r = run_script("train_everything.py", "--rec", tiny, "--output", tmp_path, "--interclass_filter", "1.5",
                   check=False)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and errors == ["error: interclass_filter=1.5 must be in [0, 1) (a cosine threshold; "
                                            "0: off)"], r.stderr
    assert not (tmp_path / "original_smallnet_CosFace").exists()
