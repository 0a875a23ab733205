"""DynUnc (He et al. 2023): a sample's uncertainty, the mean over sliding windows of epochs of the standard
deviation of its labelled-class probability (NumPy only)."""
from __future__ import annotations

import numpy as np

from utils.arrays import check_int
from utils.errors import InputError


# ============================================================================ DynUnc
def dynunc_scores(history, window=10) -> np.ndarray:
    """DynUnc uncertainty (He et al. 2023) of every sample, float64 (N,).

    ``history`` (E, N) holds the labelled-class probability of each sample after each epoch, and NaN where a
    sample was not seen in that epoch. For every window of ``J = window`` consecutive epochs ending at epoch
    ``J-1 .. E-2`` (0-based, the last epoch's window is left out as in the reference code), the uncertainty
    is the sample standard deviation (ddof = 1) of the window's available values. It needs at least 2, or
    the window has no value. The score is the mean over the windows that have a value, and NaN when none
    has (``keep_top_per_identity`` ranks NaN lowest).

    Vectorised over samples, in blocks that stay in cache. The window means come from running sums
    over epochs. The squared deviations are then summed around those means (two passes), so windows of
    tiny variance, such as converged samples, keep full precision. A one-pass sum-of-squares would
    cancel there.
    """
    J = check_int(window, "window", 2, " (a standard deviation needs two epochs)")
    h = np.asarray(history)
    if h.ndim != 2:
        raise InputError(f"history must have shape (num_epochs, num_samples), found shape {h.shape}")
    E, N = h.shape
    if N == 0:
        raise InputError("empty input: history has no sample")
    if E < J + 1:
        raise InputError(f"dynunc_scores needs at least window + 1 = {J + 1} epochs (windows end at epochs "
                         f"J-1 .. E-2), found {E}")
    if h.dtype.kind not in "fiu":
        raise InputError(f"history must be a float array, found dtype {h.dtype}")
    out = np.empty(N, dtype=np.float64)
    chunk = max(64, (1 << 14) // E)  # ~500 samples at E = 34: the block stays in L2
    for a in range(0, N, chunk):
        out[a:a + chunk] = _dynunc_block(h[:E - 1, a:a + chunk], J)  # the last epoch is never in a window
    return out


def _dynunc_block(block: np.ndarray, J: int) -> np.ndarray:
    x = block.astype(np.float64)
    if np.isinf(x).any():
        raise InputError("history must hold probabilities (finite, or NaN for an unseen sample), found inf")
    valid = ~np.isnan(x)
    has_nan = not valid.all()
    if has_nan:
        x = np.where(valid, x, 0.0)
    E1, C = x.shape
    W = E1 - J + 1  # windows starting at epochs 0 .. E-1-J
    run = np.empty((E1 + 1, C))  # running sums over epochs, row by row (contiguous; faster than cumsum(axis=0))
    run[0] = 0.0
    for e in range(E1):
        np.add(run[e], x[e], out=run[e + 1])
    s1 = run[J:] - run[:W]
    if has_nan:
        cnt = np.empty((E1 + 1, C))
        cnt[0] = 0.0
        for e in range(E1):
            np.add(cnt[e], valid[e], out=cnt[e + 1])
        n = cnt[J:] - cnt[:W]
    else:
        n = np.full((W, C), float(J))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s1 / n
    m2 = np.empty((W, C))
    for w in range(W):
        d = x[w:w + J] - mean[w]
        if has_nan:
            d *= valid[w:w + J]
        np.einsum("ij,ij->j", d, d, out=m2[w])
    ok = n >= 2
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(m2 / (n - 1))
        n_win = ok.sum(axis=0)
        total = np.where(ok, std, 0.0).sum(axis=0)
        return np.where(n_win > 0, total / n_win, np.nan)
