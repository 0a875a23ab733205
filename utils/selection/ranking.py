"""A selection's ranking, written beside its kept list: pick another fraction later, or share it, without rerunning.

    <folder>/ranking.npy (+ ranking.manifest.json)   one row per sample of the dataset, in sample order
    <folder>/ranking.csv                             the same rows with a header, and each sample's record key
                                                     (RecordIO) or file (image folder)

Columns (`RANKING_DTYPE`, a structured array: `numpy.load(..., allow_pickle=False)` reads it):

    sample_index      int64    the sample (row i is sample i)
    identity          int64    its label in the dataset
    score             float64  the method's score (DiffProb: p(label) with margin; the trajectory scores as
                               computed, before --coreset_order); Rand: its random sort key; NaN where the
                               method has neither
    rank_in_identity  int64    its place in its identity in the order the method selected in: 0 is kept
                               first, the kept samples are exactly ranks 0..k-1; every identity's ranks
                               are 0..n-1 (samples the method did not rank, e.g. excluded by cleaning, come
                               last, in sample order)
    overall_rank      int64    its place in one order of all samples: the kept ones first (the first
                               len(kept) rows by overall_rank are the kept list), then the dropped ones;
                               within each, by (rank_in_identity + 0.5) / identity size, ties by sample
                               index, so that a prefix takes about the same share of every identity
    kept              bool     in the kept list

The order within an identity is the one the method selected by, taken from that computation: the keep-top
methods, the highest value of what they rank (the score, or minus it with --coreset_order ascending; Rand's
random key) first, ties by sample index, NaN last; DiffProb, the samples its scan keeps, highest p(label)
first, then the ones it drops, highest first (equal values: the later sample first, as the scan meets
them); CCS, its priority (the strata round by round in random order; the cut hardest samples last).

The CSV writes the same columns (kept as 1/0, score to 9 significant digits like printf's %.9g: exact for
float32 scores and for integers below 1e9; ranking.npy holds the exact value), then `record_key` (the
train.idx key) or `file` (the path under the image folder) when the dataset is known.

Another fraction later. For the keep-top methods (manifest info `nested: true`: Rand, DynUnc, entropy,
EL2N, forgetting, AUM, margin, least confidence), an identity of n samples keeps k = max(int(n * f),
min(n, min_samples_per_id)), and the selection at fraction f is `rank_in_identity < k`. DiffProb's and
CCS's selections at another fraction are not a prefix of this order; the score and identity columns are
all they read (`pruning.diffprob_for_fraction(score, identity, f)`, `keep.ccs_keep(score, identity, f,
seed=...)` with the seed of the manifest).
"""
from __future__ import annotations

import numpy as np

from utils.artifacts.files import atomic_path, write_manifest
from utils.arrays import dense_labels, stable_order

RANKING_DTYPE = np.dtype([("sample_index", "<i8"), ("identity", "<i8"), ("score", "<f8"),
                          ("rank_in_identity", "<i8"), ("overall_rank", "<i8"), ("kept", "?")])
_CSV_ROWS = 1 << 18  # rows formatted at a time: tens of MB of byte matrices


# ------------------------------------------------------------------------------------------ the table
def ranking_table(labels, kept, rank=None, score=None) -> np.ndarray:
    """The ranking (`RANKING_DTYPE`, one row per sample) of a selection: `kept` its sorted sample indices,
    `rank` its order (each sample's place in its identity, -1 where unranked; None: kept first, then by
    sample index) and `score` (None: NaN)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = labels.size
    is_kept = np.zeros(n, dtype=bool)
    is_kept[kept] = True
    _, dense = dense_labels(labels)
    counts = np.bincount(dense)
    rank = np.full(n, -1, dtype=np.int64) if rank is None else np.asarray(rank, dtype=np.int64)
    if (rank < 0).any():
        rank = _rank_the_rest(rank, dense, counts, is_kept)
    kept_per_id = np.bincount(dense, weights=is_kept, minlength=counts.size).astype(np.int64)
    if not np.array_equal(rank < kept_per_id[dense], is_kept):  # a method whose order is not its selection
        raise RuntimeError("the selection's order does not put its kept samples first in every identity")
    out = np.empty(n, dtype=RANKING_DTYPE)
    out["sample_index"] = np.arange(n, dtype=np.int64)
    out["identity"] = labels
    out["score"] = np.nan if score is None else np.asarray(score, dtype=np.float64)
    out["rank_in_identity"] = rank
    out["overall_rank"] = _overall_rank(rank, counts[dense], is_kept)
    out["kept"] = is_kept
    return out


def _rank_the_rest(rank, dense, counts, is_kept) -> np.ndarray:
    """Ranks for the samples a method left unranked (-1): after its ranked ones in their identity, the kept
    before the dropped, each in sample order."""
    n = rank.size
    group = np.where(rank >= 0, 0, np.where(is_kept, 1, 2))
    key = (dense * 3 + group) * n + np.where(rank >= 0, rank, np.arange(n))
    order = np.argsort(key)  # unique keys: any sort is stable
    starts = np.cumsum(counts) - counts
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n, dtype=np.int64) - np.repeat(starts, counts)
    return out


def _overall_rank(rank, id_size, is_kept) -> np.ndarray:
    """Kept first, then dropped; within each by (rank + 0.5) / identity size, ties by sample index.

    The fractions are ordered once per distinct (rank, size) pair (at most N of them, usually far fewer):
    equal fractions are equal floats (one correctly rounded division each), and distinct ones of identities
    below 2**25 samples differ by more than their rounding. Each sample then has a small integer key, and
    one packed integer sort orders all of them."""
    present = np.zeros(int(id_size.max()) + 1, dtype=bool)
    present[id_size] = True
    sizes = np.flatnonzero(present)
    offset = np.zeros(present.size, dtype=np.int64)
    offset[sizes] = np.cumsum(sizes) - sizes
    pair_size = np.repeat(sizes, sizes)
    pair_rank = np.arange(pair_size.size, dtype=np.int64) - np.repeat(offset[sizes], sizes)
    key = (2 * pair_rank + 1) / (2.0 * pair_size)
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    place = np.empty(key.size, dtype=np.int64)
    place[order] = np.cumsum(np.r_[False, ordered[1:] != ordered[:-1]])  # equal fractions, equal place
    sample_key = place[offset[id_size] + rank] + np.where(is_kept, 0, int(place.max()) + 1)
    out = np.empty(rank.size, dtype=np.int64)
    out[stable_order(sample_key)] = np.arange(rank.size, dtype=np.int64)
    return out


# ------------------------------------------------------------------------------------------ the files
def write_ranking(folder, table: np.ndarray, stage: str, fingerprint, config=None, inputs=(), info=None,
                  keys=None):
    """`ranking.npy` (+ manifest, written last) and `ranking.csv` in `folder`, each atomically.

    `keys`: `records.sample_names(dataset)`: `("record_key", int array)` or `("file", list of paths)`, one
    per sample, for the CSV; None or `(None, None)`: no such column."""
    npy, csv = folder / "ranking.npy", folder / "ranking.csv"
    keys = keys if keys is not None and keys[0] is not None else None
    with atomic_path(npy, nbytes=table.nbytes) as tmp:  # streamed: no second copy of a 17M-row table in memory
        with open(tmp, "wb") as f:
            np.save(f, table, allow_pickle=False)
    write_csv(csv, table, keys)
    write_manifest(npy, stage, fingerprint, config, inputs,
                   {**(info or {}), "columns": list(RANKING_DTYPE.names), "csv": csv.name,
                    "csv_key": keys[0] if keys is not None else None})
    return npy, csv


def write_csv(path, table: np.ndarray, keys=None):
    """The ranking as CSV, formatted by NumPy in blocks of rows (no Python step per row)."""
    header = list(RANKING_DTYPE.names) + ([keys[0]] if keys is not None else [])
    key_bytes = _file_bytes(keys[1]) if keys is not None and keys[0] == "file" else None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write((",".join(header) + "\n").encode())
        for a in range(0, table.size, _CSV_ROWS):
            t = table[a:a + _CSV_ROWS]
            cols = [_int_chars(t["sample_index"]), _int_chars(t["identity"]), _float_chars(t["score"]),
                    _int_chars(t["rank_in_identity"]), _int_chars(t["overall_rank"]),
                    (t["kept"].astype(np.uint8) + ord("0"))[:, None]]
            if keys is not None:
                cols.append(_int_chars(np.asarray(keys[1][a:a + t.size], dtype=np.int64)) if key_bytes is None
                            else key_bytes[a:a + t.size])
            f.write(_join_rows(cols))


def _join_rows(cols) -> bytes:
    """Rows of `cols` (uint8 matrices, one row per CSV row, NUL where a field is shorter) joined by commas."""
    m = cols[0].shape[0]
    sep = np.full((m, 1), ord(","), dtype=np.uint8)
    parts = []
    for c in cols:
        parts += [c, sep]
    parts[-1] = np.full((m, 1), ord("\n"), dtype=np.uint8)
    mat = np.hstack(parts)
    return mat[mat != 0].tobytes()


def _quads(fmt) -> np.ndarray:
    """Four ASCII bytes (NUL-padded) of `fmt(i)` for i in 0..9999, one uint32 each: a table a gather reads."""
    return np.frombuffer(b"".join(fmt(i).encode().ljust(4, b"\0")[:4] for i in range(10000)), dtype=np.uint32)


_PAD = _quads(lambda i: f"{i:04d}")  # "0042": a group below the leading one
_LEAD = np.concatenate([_PAD, _quads(lambda i: f"{i}".rjust(4, "\0") if i else "")])  # + the leading group
_UNITS = np.concatenate([_PAD, _quads(lambda i: f"{i}".rjust(4, "\0"))])  # + the units group (0 stays "0")
_TRAIL = np.concatenate([_PAD, _quads(lambda i: f"{i:04d}".rstrip("0"))])  # + a group ending a fraction
_IPOW10 = 10 ** np.arange(19, dtype=np.int64)


def _uint_chars(v: np.ndarray) -> np.ndarray:
    """(m, w) ASCII of non-negative int64 `v`, right-aligned, NUL-padded on the left: four digits per gather,
    right to left, each group read from the table of groups with digits on their left (`_PAD`) or not."""
    top = int(v.max()) if v.size else 0
    groups = -(-len(str(top)) // 4)
    out = np.empty((v.size, groups), dtype=np.uint32)
    x = v.astype(np.int64, copy=True)
    for j in range(groups):
        rem = x % 10000
        x //= 10000
        out[:, groups - 1 - j] = (_UNITS if j == 0 else _LEAD)[rem + 10000 * (x == 0)]
    return out.view(np.uint8).reshape(v.size, 4 * groups)


def _fraction_chars(g: np.ndarray) -> np.ndarray:
    """(m, 12) ASCII of the 12-digit fractions `g` (int64 below 10**12), trailing zeros NUL (all NUL for 0)."""
    high, rest = np.divmod(g, 10 ** 8)
    mid, low = np.divmod(rest, 10 ** 4)
    out = np.empty((g.size, 3), dtype=np.uint32)
    out[:, 2] = _TRAIL[low + 10000]
    none_right = low == 0
    out[:, 1] = _TRAIL[mid + 10000 * none_right]
    none_right &= mid == 0
    out[:, 0] = _TRAIL[high + 10000 * none_right]
    return out.view(np.uint8).reshape(g.size, 12)


def _int_chars(v: np.ndarray) -> np.ndarray:
    """(m, w) ASCII of int64 `v`, right-aligned, NUL-padded on the left (a sign column only where needed)."""
    v = np.asarray(v, dtype=np.int64)
    neg = v < 0
    if not neg.any():
        return _uint_chars(v)
    return np.hstack([np.where(neg, ord("-"), 0).astype(np.uint8)[:, None], _uint_chars(np.abs(v))])


_NINE = 9  # significant digits of the CSV score


def _float_chars(x: np.ndarray) -> np.ndarray:
    """(m, w) ASCII of float64 `x` as printf's %.9g writes it (fixed notation for exponents -4..8, else
    d.ddde+XX; trailing zeros dropped), NUL-padded; nan, inf, -inf as Python writes them (-0.0 as 0).

    The 9 significant digits are an integer `mant` (10**8 <= mant < 10**9) and a decimal exponent `e`; with
    `shift` digits after the point (8 - e in fixed notation, 8 in scientific), the integer part is
    mant // 10**shift and the fraction mant % 10**shift, written left-aligned in 12 digits so that its
    trailing zeros are the ones dropped."""
    x = np.asarray(x, dtype=np.float64)
    m = x.size
    finite = np.isfinite(x)
    safe = np.where(finite, np.abs(x), 0.0)
    zero = safe == 0
    safe[zero] = 1.0
    e = np.floor(np.log10(safe)).astype(np.int64)
    mant = _scaled(safe, _NINE - 1 - e)
    for _ in range(2):  # log10 can be one off near a power of ten, and rounding can carry into a tenth digit
        high, low = mant >= 10.0 ** _NINE, mant < 10.0 ** (_NINE - 1)
        fix = high | low
        if not fix.any():
            break
        e += high.astype(np.int64) - low.astype(np.int64)
        mant[fix] = _scaled(safe[fix], _NINE - 1 - e[fix])
    carry = mant >= 10.0 ** _NINE  # 9.9999999996e3 rounds up to 1.00000000e4
    e[carry] += 1
    mant[carry] = 10.0 ** (_NINE - 1)
    mant = mant.astype(np.int64)
    fixed = (e >= -4) & (e < _NINE)
    shift = np.where(fixed, _NINE - 1 - e, _NINE - 1)  # 0..12
    whole, frac = np.divmod(mant, _IPOW10[shift])
    frac *= _IPOW10[12 - shift]  # left-aligned in 12 digits
    pieces = [_uint_chars(whole), np.where(frac > 0, ord("."), 0).astype(np.uint8)[:, None], _fraction_chars(frac)]
    if (x < 0).any():
        pieces.insert(0, np.where(x < 0, ord("-"), 0).astype(np.uint8)[:, None])
    sci = ~fixed & finite & ~zero
    if sci.any():
        ae = np.minimum(np.abs(e), 999)
        d = _PAD[ae].view(np.uint8).reshape(m, 4)  # "0012", "0305"
        exp = np.empty((m, 5), dtype=np.uint8)
        exp[:, 0] = ord("e")
        exp[:, 1] = np.where(e < 0, ord("-"), ord("+"))
        exp[:, 2] = np.where(ae >= 100, d[:, 1], 0)  # at least two digits, as printf writes them
        exp[:, 3:] = d[:, 2:]
        exp[~sci] = 0
        pieces.append(exp)
    special = zero | ~finite
    if special.any():
        pieces.append(np.zeros((m, 3), dtype=np.uint8))
    out = np.hstack(pieces)
    if special.any():
        out[special] = 0
        out[zero & finite, 0] = ord("0")
        for word, where in ((b"nan", np.isnan(x)), (b"inf", np.isposinf(x)), (b"-inf", np.isneginf(x))):
            out[np.ix_(where, np.arange(len(word)))] = np.frombuffer(word, dtype=np.uint8)
    return out


_POW10 = 10.0 ** np.arange(-200, 201)  # _POW10[200 + k] = 10**k


def _scaled(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """round(a * 10**k), in two steps so that no power of ten overflows (k up to about +-330)."""
    h = k // 2
    return np.rint(a * _POW10[200 + h] * _POW10[200 + k - h])


def _file_bytes(files) -> np.ndarray:
    """(N, w) uint8 of each file path, quoted as CSV quotes a field when it holds a comma, quote or line end."""
    def field(f):
        return '"' + f.replace('"', '""') + '"' if any(c in f for c in ',"\r\n') else f
    enc = np.array([field(f).encode("utf-8") for f in files], dtype=bytes)  # an image folder's listing: O(files)
    return enc.view(np.uint8).reshape(len(files), -1) if enc.itemsize else np.zeros((len(files), 1), np.uint8)

