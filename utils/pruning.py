"""The pruning rules, under the path users' scripts import (`utils.pruning`, kept stable): DiffProb and its
threshold for a fraction, DynUnc, keep-k per identity, Rand, and the per-identity helpers. NumPy only; every
selection returns sorted unique int64 sample indices.

The rules live by concern: utils/selection/diffprob.py (with `diffprob_loop`, the paper's rule as a plain
loop), utils/selection/keep.py, utils/dynamics/dynunc.py and utils/arrays.py; this module re-exports them.
"""
from utils.arrays import format_summary, identity_index, label_map_for, per_identity_counts, selection_summary
from utils.dynamics.dynunc import dynunc_scores
from utils.selection.diffprob import diffprob, diffprob_for_fraction, diffprob_loop, diffprob_threshold_for_fraction
from utils.selection.keep import keep_top_per_identity, random_key, random_keep

__all__ = [
    "diffprob", "diffprob_loop", "diffprob_threshold_for_fraction", "diffprob_for_fraction", "dynunc_scores",
    "keep_top_per_identity", "random_keep", "random_key", "per_identity_counts", "identity_index",
    "label_map_for", "selection_summary", "format_summary",
]
