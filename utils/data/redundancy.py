"""How redundant is a face dataset? The share of images that have a near-identical image of the same
identity, measured in an embedding space.

For every image, its nearest neighbour among the *other* images of its identity (cosine similarity of
L2-normalised embeddings); an image is redundant when that similarity reaches `threshold`. Both an image
and its near-twin count, so a dataset where a share R of the images re-shoot an earlier one (one photo
shoot, tiny changes) shows a redundant share between R and 2R (redundancy.json of a synthetic dataset
gives the exact truth as `with_twin_share`).

NumPy only. Identities are grouped once (CSR: sort by label, start and size of each identity), so the
work is about the sum over identities of size^2 x D and nothing rescans the dataset. Identities of up
to SMALL_IDENTITY images are padded to a power of two and compared in batched products, many at a
time; larger ones one product each on their own contiguous rows (faster: BLAS), in `chunk` x `chunk`
tiles beyond `chunk` images, so that memory stays below about `chunk`^2 similarities.
"""
from __future__ import annotations

import numpy as np

# Identity size up to which batched padded products beat one BLAS product per identity (measured on
# 2 CPU cores, D = 512: about even at 16 images, 5x slower batched at 64).
SMALL_IDENTITY = 16


def _check_inputs(embeddings, labels, threshold, chunk):
    x = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must have shape (N, D) with N > 0, got {x.shape}")
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {x.shape[0]} embeddings")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
    if chunk < 2:
        raise ValueError(f"chunk must be >= 2, got {chunk}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        raise ValueError(f"{bad.size} embeddings are zero or not finite (first: row {bad[0]}); "
                         f"they have no direction to compare")
    return x / norms, labels


def _nearest_in_padded_groups(xs, starts, counts, size, nn_sim, nn_pos):
    """Nearest other member of each group of at most `size` rows: groups padded to `size`, one
    batched product (G, size, size). Writes into nn_sim / nn_pos (sorted positions)."""
    offsets = np.arange(size)
    valid = offsets[None, :] < counts[:, None]  # (G, size)
    pos = starts[:, None] + np.where(valid, offsets[None, :], 0)  # padding points at the group's first row
    e = xs[pos]  # (G, size, D)
    sim = np.matmul(e, e.transpose(0, 2, 1))  # (G, size, size)
    sim[:, offsets, offsets] = -np.inf  # not itself
    sim[~np.broadcast_to(valid[:, None, :], sim.shape)] = -np.inf  # nor padding
    best = sim.argmax(axis=2)  # first maximum: the lowest sorted position, i.e. the lowest sample index
    nn_sim[pos[valid]] = np.take_along_axis(sim, best[..., None], axis=2)[..., 0][valid]
    nn_pos[pos[valid]] = (starts[:, None] + best)[valid]


def _nearest_in_group(xs, start, count, chunk, nn_sim, nn_pos):
    """Nearest other member within one group of rows start..start+count, in chunk x chunk tiles."""
    best_sim = np.full(count, -np.inf, np.float32)
    best_pos = np.full(count, -1, np.int64)
    for r in range(0, count, chunk):
        rows = xs[start + r:start + min(r + chunk, count)]
        for c in range(0, count, chunk):
            sim = rows @ xs[start + c:start + min(c + chunk, count)].T
            if r == c:
                np.fill_diagonal(sim, -np.inf)
            j = sim.argmax(axis=1)
            tile_best = sim[np.arange(sim.shape[0]), j]
            better = tile_best > best_sim[r:r + rows.shape[0]]  # strict: an earlier column keeps a tie
            best_sim[r:r + rows.shape[0]][better] = tile_best[better]
            best_pos[r:r + rows.shape[0]][better] = start + c + j[better]
    nn_sim[start:start + count] = best_sim
    nn_pos[start:start + count] = best_pos


def redundancy_stats(embeddings, labels, threshold: float = 0.95, chunk: int = 4096) -> dict:
    """Near-duplicate statistics of a dataset from per-sample embeddings.

    embeddings: (N, D) array-like (L2-normalised here); labels: (N,) integer identity of each sample.
    threshold: cosine similarity at or above which an image's nearest same-identity neighbour makes it
    redundant. chunk: memory bound (about chunk^2 float32 similarities at once).

    Returns a dict:
        share          float, redundant images / N (an identity's only image is never redundant)
        threshold      the threshold used
        num_images     N
        nn_similarity  (N,) float32, cosine similarity to the nearest other image of the same identity
                       (NaN for an identity with one image)
        nn_index       (N,) int64, sample index of that neighbour (-1 for an identity with one image);
                       ties go to the lowest sample index
        redundant      (N,) bool, nn_similarity >= threshold
        identity       {"label" (K,), "num_images" (K,), "num_redundant" (K,), "share" (K,)}: the
                       per-identity distribution, identities in increasing label order
    """
    x, labels = _check_inputs(embeddings, labels, threshold, chunk)
    n = x.shape[0]
    order = np.argsort(labels, kind="stable")  # within an identity: increasing sample index
    xs = x[order]
    identity, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)

    nn_sim = np.full(n, np.nan, np.float32)  # by sorted position
    nn_pos = np.full(n, -1, np.int64)
    # Identities of 2..SMALL_IDENTITY images, padded to the next power of two (at most chunk), a batch
    # of them at a time holding at most `chunk` rows; larger identities one at a time.
    small = np.flatnonzero((counts >= 2) & (counts <= min(SMALL_IDENTITY, chunk)))
    padded = np.minimum(2 ** np.ceil(np.log2(counts[small])).astype(np.int64), chunk)
    for size in np.unique(padded):
        groups = small[padded == size]
        per_batch = max(1, chunk // int(size))
        for b in range(0, groups.size, per_batch):
            g = groups[b:b + per_batch]
            _nearest_in_padded_groups(xs, starts[g], counts[g], int(size), nn_sim, nn_pos)
    for g in np.flatnonzero(counts > min(SMALL_IDENTITY, chunk)):
        _nearest_in_group(xs, int(starts[g]), int(counts[g]), chunk, nn_sim, nn_pos)

    nn_similarity = np.empty(n, np.float32)
    nn_similarity[order] = nn_sim
    nn_index = np.full(n, -1, np.int64)
    nn_index[order] = np.where(nn_pos >= 0, order[np.maximum(nn_pos, 0)], -1)
    with np.errstate(invalid="ignore"):  # NaN (an identity's only image) compares False
        redundant = nn_similarity >= threshold
    redundant_sorted = redundant[order]
    num_redundant = np.add.reduceat(redundant_sorted.astype(np.int64), starts)
    return {
        "share": float(redundant.mean()),
        "threshold": float(threshold),
        "num_images": int(n),
        "nn_similarity": nn_similarity,
        "nn_index": nn_index,
        "redundant": redundant,
        "identity": {"label": identity, "num_images": counts, "num_redundant": num_redundant,
                     "share": num_redundant / counts},
    }
