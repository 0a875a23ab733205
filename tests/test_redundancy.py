"""utils/data/redundancy.py: the nearest same-identity neighbour of every image, and the redundant share."""
import json

import cv2
import numpy as np
import pytest

from utils.data import recordio
from utils.data.redundancy import redundancy_stats
from utils.synthetic.generator import SyntheticConfig, generate_dataset


def _brute_force(embeddings, labels):
    """The literal definition: for each image, scan every other image of its identity."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    n = len(labels)
    sim = np.full(n, np.nan)
    index = np.full(n, -1)
    for i in range(n):
        for j in range(n):
            if j != i and labels[j] == labels[i]:
                s = float(x[i] @ x[j])
                if index[i] < 0 or s > sim[i]:
                    sim[i], index[i] = s, j
    return sim, index


def _random_dataset(seed, sizes, dim=16):
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.permutation(len(sizes)) * 3 + 5, sizes)  # sparse, unsorted label values
    perm = rng.permutation(labels.size)  # identities interleaved, as in a shuffled list
    return rng.normal(size=(labels.size, dim)), labels[perm]


@pytest.mark.parametrize("chunk", [4096, 8, 3])
def test_matches_the_brute_force_loop(chunk):
    # singletons, pairs, sizes around the power-of-two padding, and identities larger than a small chunk
    embeddings, labels = _random_dataset(0, [1, 2, 3, 4, 5, 7, 8, 9, 17, 30, 1, 2])
    stats = redundancy_stats(embeddings, labels, threshold=0.6, chunk=chunk)
    sim, index = _brute_force(embeddings, labels)
    assert np.array_equal(stats["nn_index"], index)
    np.testing.assert_allclose(stats["nn_similarity"], sim, rtol=0, atol=1e-5)
    assert np.array_equal(np.isnan(stats["nn_similarity"]), index < 0)
    redundant = np.nan_to_num(sim, nan=-2) >= 0.6
    assert np.array_equal(stats["redundant"], redundant)
    assert stats["share"] == pytest.approx(redundant.mean())
    ident = stats["identity"]
    assert np.array_equal(ident["label"], np.unique(labels))
    assert np.array_equal(ident["num_images"], [np.sum(labels == k) for k in ident["label"]])
    assert np.array_equal(ident["num_redundant"], [redundant[labels == k].sum() for k in ident["label"]])
    np.testing.assert_allclose(ident["share"], ident["num_redundant"] / ident["num_images"])


def test_planted_near_duplicates_are_found():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(40), 25)
    embeddings = rng.normal(size=(labels.size, 128))  # independent directions: cosines near 0
    originals = rng.choice(labels.size, 60, replace=False)
    copies = []
    for i in originals:  # a copy replaces another image of the same identity
        candidates = np.setdiff1d(np.flatnonzero(labels == labels[i]), np.r_[originals, copies])
        j = int(candidates[0])
        embeddings[j] = embeddings[i] + rng.normal(scale=0.05, size=128)
        copies.append(j)
    stats = redundancy_stats(embeddings * rng.uniform(0.5, 3, (labels.size, 1)), labels)  # any norm
    planted = np.union1d(originals, copies)
    assert np.array_equal(np.flatnonzero(stats["redundant"]), planted)
    assert stats["share"] == pytest.approx(planted.size / labels.size)
    assert np.array_equal(stats["nn_index"][copies], originals)
    assert (stats["nn_similarity"][copies] > 0.99).all()


def test_exact_copies_tie_to_the_lowest_index():
    base = np.eye(4)[[0, 0, 0, 1]]
    stats = redundancy_stats(base, [7, 7, 7, 7], threshold=0.99)
    assert stats["nn_index"].tolist() == [1, 0, 0, 0]
    assert stats["redundant"].tolist() == [True, True, True, False]


def test_bad_inputs_say_what_is_wrong():
    with pytest.raises(ValueError, match="2 labels for 3 embeddings"):
        redundancy_stats(np.ones((3, 2)), [0, 1])
    with pytest.raises(ValueError, match="row 1"):
        redundancy_stats(np.array([[1.0, 0], [0, 0]]), [0, 0])
    with pytest.raises(ValueError, match="threshold"):
        redundancy_stats(np.ones((2, 2)), [0, 0], threshold=95)


def test_finds_the_re_shoots_of_a_synthetic_dataset_in_pixel_space(tmp_path):
    """Pixels are not an embedding, but a re-shoot (tiny pose/light/crop change) is near-identical even
    there: on 16 x 16 zero-mean pixel vectors the statistic finds the generator's ground truth."""
    cfg = SyntheticConfig(num_ids=12, image_size=32, seed=5, redundancy=0.5, redundant_id_share=1.0, val_pairs=0,
                          ijb_templates=0)
    generate_dataset(tmp_path, cfg, overwrite=True, progress=False)
    layout = recordio.read_layout(tmp_path)
    with recordio.MXIndexedRecordIO(str(tmp_path / "train.idx"), str(tmp_path / "train.rec"), "r") as rec:
        images = [recordio.unpack_img(rec.read_idx(int(k)))[1] for k in layout.image_keys]
    pixels = np.stack([cv2.resize(img, (16, 16), interpolation=cv2.INTER_AREA).reshape(-1) for img in images])
    pixels = pixels.astype(np.float32) - pixels.mean(axis=1, keepdims=True)
    stats = redundancy_stats(pixels, layout.labels)
    truth = json.loads((tmp_path / "redundancy.json").read_text())
    twins = np.zeros(len(images), bool)
    twins[truth["index"] + truth["source"]] = True
    found = stats["redundant"]
    assert (found & twins).sum() >= 0.8 * found.sum() and (found & twins).sum() >= 0.8 * twins.sum()
    assert stats["share"] == pytest.approx(truth["with_twin_share"], abs=0.1)
    # a re-shoot's nearest neighbour is, nearly always, the image it re-shoots or a sibling re-shoot
    group = np.arange(len(images))
    group[truth["index"]] = truth["source"]
    assert np.mean(group[stats["nn_index"][truth["index"]]] == group[truth["index"]]) > 0.9
