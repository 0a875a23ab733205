"""Reading the training records a chunk at a time (utils/dynamics/blocks.py) and the one soft-label kernel
(utils/dynamics/soft_labels.py): file reads give what the memory map holds, in any chunking; a file cut while being
read is one clear error, not a crash; the streamed scores, soft labels and confident learning equal the
in-memory ones; ties between classes go to the lower class id."""
import os

import numpy as np
import pytest

from utils.dynamics import blocks
from utils.cleaning import probabilities, rules
from utils.dynamics import scores
from utils.dynamics import soft_labels
from utils.dynamics.blocks import file_region, iter_chunks
from utils.errors import InputError
from utils.artifacts.records import open_npz
from utils.dynamics.soft_labels import soft_label_entropy


def records(rng, E=6, N=97, k=4, C=40, unseen=5):
    """Top-k records as training writes them (float16 logits, descending, distinct classes, -1 / NaN unseen)."""
    labels = rng.integers(0, C, N)
    index = np.stack([np.stack([rng.permutation(C)[:k] for _ in range(N)]) for _ in range(E)]).astype(np.int32)
    index[:, :, 0] = np.where(rng.random((E, N)) < 0.7, labels, index[:, :, 0])
    for e in range(E):  # keep the classes of a row distinct after putting the label first
        for i in range(N):
            row = index[e, i]
            if (row[1:] == row[0]).any():
                free = np.setdiff1d(np.arange(C), row)
                row[1:][row[1:] == row[0]] = free[0]
    logits = -np.sort(-rng.normal(3, 2, (E, N, k)), axis=2).astype(np.float16)
    rest = rng.normal(0, 1, (E, N)).astype(np.float16)
    label_logit = rng.normal(2, 1, (E, N)).astype(np.float16)
    for _ in range(unseen):
        e, i = rng.integers(E), rng.integers(N)
        index[e, i], logits[e, i], rest[e, i], label_logit[e, i] = -1, np.nan, np.nan, np.nan
    return {"topk_logits": logits, "topk_index": index, "rest_mean_logit": rest, "label_logit": label_logit}, labels


@pytest.fixture
def on_disk(tmp_path):
    rec, labels = records(np.random.default_rng(0))
    path = tmp_path / "topk.npz"
    np.savez(path, **rec)
    return rec, open_npz(path), labels, path


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few hundred bytes: many chunks, none a multiple of the samples."""
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 700)
    monkeypatch.setattr(soft_labels, "BLOCK_ENTRIES", 40)
    monkeypatch.setattr(scores, "_BLOCK", 50)


# ---------------------------------------------------------------------------------------------- reading
def test_memory_maps_and_their_epoch_views_are_file_regions_and_read_as_sliced(on_disk):
    rec, mm, _, path = on_disk
    lg = mm["topk_logits"]
    assert str(file_region(lg)[0]) == str(path)
    for view in (lg, lg[2:5], lg[::2], lg[4:5], mm["rest_mean_logit"][1:]):
        assert file_region(view) is not None
        got = [rows[0] for _, _, rows in iter_chunks([view], view.shape[1], 13)]
        np.testing.assert_array_equal(np.concatenate(got, axis=1), np.asarray(view))
    assert file_region(lg[:, :, :2]) is None  # rows not contiguous in the file: sliced instead
    assert file_region(np.asarray(lg)) is None and file_region(rec["topk_logits"]) is None


def test_iter_chunks_covers_every_sample_once_and_keeps_none(on_disk):
    rec, mm, _, _ = on_disk
    N = rec["topk_index"].shape[1]
    seen = []
    for a, b, (ix, nothing, rest) in iter_chunks([mm["topk_index"], None, rec["rest_mean_logit"]], N, 10):
        assert nothing is None and ix.shape[1] == rest.shape[1] == b - a
        np.testing.assert_array_equal(ix, rec["topk_index"][:, a:b])
        np.testing.assert_array_equal(rest, rec["rest_mean_logit"][:, a:b])
        seen.append((a, b))
    assert seen[0][0] == 0 and seen[-1][1] == N and all(b == c for (_, b), (c, _) in zip(seen, seen[1:]))
    assert list(iter_chunks([mm["topk_index"]], 0, 10)) == []


def test_a_records_file_cut_while_in_use_is_a_clear_error_not_a_crash(on_disk, small_chunks):
    """A memory map of a file cut short faults (SIGBUS) on the missing pages; file reads say what happened."""
    rec, mm, labels, path = on_disk
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(InputError, match="ends before the records it declares"):
        soft_label_entropy(mm["topk_logits"], mm["topk_index"], mm["rest_mean_logit"], 40)


# ---------------------------------------------------------------------------------- streamed == in memory
def test_soft_labels_streamed_from_the_file_equal_the_in_memory_ones(on_disk, small_chunks):
    rec, mm, labels, _ = on_disk
    args = [mm[k] for k in ("topk_logits", "topk_index", "rest_mean_logit")]
    got = probabilities.trajectory_soft_labels(*args, labels, 40, keep=7)
    soft_labels.BLOCK_ENTRIES = 1 << 17
    blocks.CHUNK_BYTES = 64 << 20
    want = probabilities.trajectory_soft_labels(*[rec[k] for k in ("topk_logits", "topk_index", "rest_mean_logit")],
                                                labels, 40, keep=7)
    for field in ("classes", "probs", "label_prob", "rest_prob", "entropy"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    assert np.isfinite(want.entropy).all() and (want.classes[:, 0] >= 0).all()


@pytest.mark.parametrize("name", ["el2n", "aum", "forgetting", "margin", "least_confidence"])
def test_scores_streamed_from_the_file_equal_the_in_memory_ones(on_disk, small_chunks, name):
    rec, mm, labels, _ = on_disk
    C = 40

    def run(r):
        lg, ix, rest, ll = (r[k] for k in ("topk_logits", "topk_index", "rest_mean_logit", "label_logit"))
        return {"el2n": lambda: scores.el2n_scores(lg, ix, rest, labels, C, 4, label_logit=ll),
                "aum": lambda: scores.aum_scores(lg, ix, rest, ll, labels, C),
                "forgetting": lambda: scores.forgetting_scores(ix, labels, C),
                "margin": lambda: scores.margin_scores(lg, ix, rest, C, epoch=3),
                "least_confidence": lambda: scores.least_confidence_scores(lg, ix, rest, C)}[name]()

    streamed = run(mm)
    scores._BLOCK = 1 << 20
    blocks.CHUNK_BYTES = 64 << 20
    np.testing.assert_array_equal(streamed, run(rec))
    assert np.isfinite(streamed).sum() >= streamed.size - 5


def test_an_error_in_a_later_chunk_names_its_samples(on_disk, small_chunks):
    rec, _, labels, _ = on_disk
    ix = rec["topk_index"].copy()
    ix[3, 90, 2] = 40  # a class the dataset does not have, in the last chunk
    with pytest.raises(InputError, match=r"found class 40 \(sample 90\).*another dataset"):
        probabilities.trajectory_soft_labels(rec["topk_logits"], ix, rec["rest_mean_logit"], labels, 40)


def test_confident_learning_in_row_blocks_equals_one_block(monkeypatch):
    rng = np.random.default_rng(3)
    K, n = 7, 500
    labels = rng.integers(0, K, n)
    p = rng.dirichlet(np.full(K, 0.5), n)
    order = np.argsort(-p, axis=1, kind="stable")[:, :3]
    probs = soft_labels.SparseProbs(order, np.take_along_axis(p, order, axis=1), p[np.arange(n), labels],
                                    np.zeros(n))
    whole = rules.confident_learning(probs, labels, K)
    monkeypatch.setattr(rules, "_CL_ROWS", 37)
    blocked = rules.confident_learning(probs, labels, K)
    assert whole[0].sum() > 0
    for w, b in zip(whole, blocked):
        np.testing.assert_array_equal(w, b)


# ---------------------------------------------------------------------------------------------------- ties
def test_tied_classes_are_ranked_lower_class_first_and_the_kept_ones_at_the_boundary_too():
    """Sample 0: classes 5, 2 and 4 all at the same mean logit, above 1; keep 2 of them: 2 and 4 (the lower
    ids), then ranked 2, 4. Sample 1: one class clearly on top, then a tie 3 / 0: ranked 0, 3."""
    E, C = 2, 8
    ix = np.array([[[5, 2, 4], [6, 3, 0]], [[4, 2, 5], [6, 0, 3]]], dtype=np.int32)
    lg = np.array([[[2.0, 2.0, 2.0], [5.0, 1.0, 1.0]], [[2.0, 2.0, 2.0], [5.0, 1.0, 1.0]]])
    rest = np.zeros((E, 2))
    soft = probabilities.trajectory_soft_labels(lg, ix, rest, np.array([1, 3]), C, keep=2)
    assert soft.classes.tolist() == [[2, 4], [6, 0]]
    assert soft.probs[0, 0] == soft.probs[0, 1]
    full = probabilities.trajectory_soft_labels(lg, ix, rest, np.array([1, 3]), C, keep=4)
    assert full.classes.tolist() == [[2, 4, 5, -1], [6, 0, 3, -1]]
    assert full.probs[:, 3].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(full.probs.sum(axis=1) + (C - 3) * full.rest_prob, 1.0)
    assert full.label_prob[0] == full.rest_prob[0]  # class 1 was never in a top k
