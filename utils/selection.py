"""The registry of selection (pruning) methods: every method is one entry.

An entry names the method, the records it reads (`needs`), its selection function and what its score
means on a plot. Everything else is derived from the registry: the `coreset_method` choices of every
stage, `run_pipeline.py --methods`, the script that runs a method, the output folder
(`coresets/<name>_<fraction>/`) and the README's method table (`method_table()`). A new method is one
`@register_method(...)` function here plus its test.

A selection function takes the loaded `Records` and the config and returns a `Selection`: the kept
sample indices (sorted unique int64), the per-sample score it ranked by (or None) and facts for the
summary. Per-identity budgets always go through `utils.pruning.keep_top_per_identity` (or DiffProb's own
rule): one tested helper, as the data-pruning literature learned the hard way (DeepCore).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from config import config as config_module
from utils import pruning
from utils.records import NEEDS, Records  # noqa: F401  (Records: what selection functions take)
from utils.artifacts import ArtifactError
from utils.errors import InputError

# Retraining also accepts these two, which are not selections of the pruning stages.
RETRAIN_ONLY = {"full": "every image", "relabel": "every image, cleaning's flagged ones with their suggested label"}


@dataclass
class Selection:
    kept: np.ndarray  # sorted unique int64 sample indices
    scores: Optional[np.ndarray] = None  # (N,) what the method ranked by, for the plot; None: no score
    info: dict = field(default_factory=dict)  # facts for summary.json (threshold, window, seconds, ...)
    warnings: list = field(default_factory=list)  # printed by the stage, e.g. an unreachable fraction


@dataclass(frozen=True)
class Method:
    name: str
    title: str  # for tables and plots, e.g. "DiffProb"
    select: Callable  # (Records, cfg) -> Selection
    needs: tuple = ()  # keys of NEEDS
    score_name: Optional[str] = None  # what the score on the plot means; None: no score
    script: tuple = ("coreset_select.py",)  # the command that runs it (the paper's scripts for its methods)
    aliases: tuple = ()  # other names accepted for `coreset_method` (the paper repository's)
    takes_threshold: bool = False  # `--threshold` sets the selection instead of `--fraction`
    summary: str = ""  # one line for --help and the README


METHODS: dict = {}
_ALIASES: dict = {}


def register_method(name, *, title, needs=(), score_name=None, script=None, aliases=(), takes_threshold=False,
                    summary=""):
    """Decorator: register `fn(records, cfg) -> Selection` as selection method `name`."""
    def wrap(fn):
        for n in (name, *aliases):
            if n in METHODS or n in _ALIASES or n in RETRAIN_ONLY:
                raise ValueError(f"selection method name {n!r} is taken")
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{name}: unknown needs {sorted(unknown)}; valid: {sorted(NEEDS)}")
        METHODS[name] = Method(name, title, fn, tuple(needs), score_name, tuple(script or ("coreset_select.py",)),
                               tuple(aliases), takes_threshold, summary or (fn.__doc__ or "").strip().split("\n")[0])
        for a in aliases:
            _ALIASES[a] = name
        # The config's `coreset_method` choices and aliases are the registry's.
        config_module.CHOICES["coreset_method"] = coreset_method_choices()
        config_module.ALIASES["coreset_method"] = dict(_ALIASES)
        return fn
    return wrap


def canonical_name(name: str) -> str:
    """The registered name of `name` (aliases resolved); unknown names stay as they are."""
    return _ALIASES.get(name, name)


def get_method(name: str) -> Method:
    try:
        return METHODS[canonical_name(name)]
    except KeyError:
        raise InputError(f"unknown selection method {name!r}; valid: {', '.join(list_methods(aliases=True))}") from None


def list_methods(aliases: bool = False) -> list:
    return list(METHODS) + (list(_ALIASES) if aliases else [])


def coreset_method_choices() -> tuple:
    """Every value `coreset_method` accepts: retraining's own, the registered methods and their aliases."""
    return (*RETRAIN_ONLY, *METHODS, *_ALIASES)


def method_table() -> str:
    """The README's method table (markdown), from the registry."""
    rows = ["| method | `--coreset_method` | script | reads | what it keeps |", "|---|---|---|---|---|"]
    for m in METHODS.values():
        names = ", ".join(f"`{n}`" for n in (m.name, *m.aliases))
        rows.append(f"| {m.title} | {names} | `{' '.join(m.script)}` | {', '.join(m.needs) or 'labels'} | "
                    f"{m.summary} |")
    return "\n".join(rows) + "\n"


def _ranked(scores, cfg):
    """Scores as `keep_top_per_identity` ranks them: the highest are kept unless coreset_order=ascending."""
    return scores if cfg.coreset_order == "descending" else -scores


# ------------------------------------------------------------------------------------------- methods
@register_method("rand", title="Rand", script=("coreset_rand.py",),
                 summary="per identity, uniformly at random (seeded by --seed)")
def select_rand(rec: Records, cfg) -> Selection:
    """Per identity, a uniformly random share of the images."""
    t0 = time.time()
    kept = pruning.random_keep(rec.labels, cfg.fraction, cfg.min_samples_per_id, seed=cfg.seed)
    rec.inputs.append(cfg.rec)
    return Selection(kept, None, {"seed": cfg.seed, "seconds": time.time() - t0})


@register_method("dynunc", title="DynUnc", needs=("prob_history",), score_name="DynUnc uncertainty",
                 script=("coreset_dynunc.py",),
                 summary="per identity, the images whose p(label) varied most over training epochs")
def select_dynunc(rec: Records, cfg) -> Selection:
    """DynUnc (He et al. 2023): mean over sliding windows of the std of p(label) across epochs."""
    history = rec.prob_history
    t0 = time.time()
    scores = pruning.dynunc_scores(history, cfg.window)
    kept = pruning.keep_top_per_identity(_ranked(scores, cfg), rec.labels, cfg.fraction, cfg.min_samples_per_id)
    return Selection(kept, scores, {"window": cfg.window, "epochs": int(history.shape[0]),
                                    "seconds": time.time() - t0})


def _diffprob(rec: Records, cfg, excluded=None) -> Selection:
    prob = rec.scores["gt_prob_with_margin"]
    t0 = time.time()
    if cfg.threshold is not None:
        threshold = float(cfg.threshold)
        kept = pruning.diffprob(prob, rec.labels, threshold, cfg.min_samples_per_id, excluded=excluded)
    else:
        kept, threshold = pruning.diffprob_for_fraction(prob, rec.labels, cfg.fraction, cfg.min_samples_per_id,
                                                        excluded=excluded)
    info = {"threshold": threshold, "requested_fraction": None if cfg.threshold is not None else cfg.fraction,
            "seconds": time.time() - t0}
    sel = Selection(kept, prob, info)
    achieved = len(kept) / len(rec.labels)
    if cfg.threshold is None and abs(achieved - cfg.fraction) > 0.02:
        # DiffProb's relaxation keeps at least min_samples_per_id per identity and, when an identity's
        # probabilities are bunched (a model that has not fitted its training data), nearly all of them.
        sel.warnings.append(
            f"asked for {cfg.fraction:.3f}, the closest DiffProb selection keeps {achieved:.3f}: the scores leave "
            f"no room (under-fitted original model, or min_samples_per_id={cfg.min_samples_per_id} is large for "
            f"these identities)")
    return sel


@register_method("diffprob", title="DiffProb", needs=("scores",), score_name="p(label) with margin",
                 script=("eval_simprobs.py",), aliases=("eval_simprobs",), takes_threshold=True,
                 summary="per identity, drops an image whose p(label) is within the threshold of one kept")
def select_diffprob(rec: Records, cfg) -> Selection:
    """DiffProb (Caldeira et al. 2025) on the margin head's labelled-class probability."""
    return _diffprob(rec, cfg)


@register_method("diffprob_clean", title="cleaning + DiffProb", needs=("scores", "clean"),
                 score_name="p(label) with margin", script=("eval_simprobs.py", "--coreset_method", "diffprob_clean"),
                 aliases=("eval_simprobs_clean",), takes_threshold=True,
                 summary="DiffProb on what cleaning kept")
def select_diffprob_clean(rec: Records, cfg) -> Selection:
    """DiffProb on the samples cleaning kept (the paper's auxiliary cleaning first)."""
    return _diffprob(rec, cfg, excluded=rec.excluded_by_cleaning)


@register_method("entropy", title="soft-label entropy", needs=("topk",), score_name="soft-label entropy",
                 script=("coreset_entropy.py",),
                 summary="per identity, the images whose epoch-averaged soft label is most uncertain")
def select_entropy(rec: Records, cfg) -> Selection:
    """Entropy of the soft label averaged over the training trajectory ("Data Pruning Can Do More")."""
    topk = rec.topk
    t0 = time.time()
    entropy = pruning.soft_label_entropy(topk["topk_logits"].astype(np.float32), topk["topk_index"],
                                         topk["rest_mean_logit"].astype(np.float32), rec.num_classes)
    kept = pruning.keep_top_per_identity(_ranked(entropy, cfg), rec.labels, cfg.fraction, cfg.min_samples_per_id)
    return Selection(kept, entropy, {"topk": int(topk["topk_logits"].shape[-1]), "seconds": time.time() - t0})


def run_selection(method: Method, rec: Records, cfg) -> Selection:
    """Check the config against the method, read what it needs, select."""
    if cfg.threshold is not None and not method.takes_threshold:
        raise InputError(f"{method.name} is set by --fraction; --threshold is for "
                         f"{', '.join(m.name for m in METHODS.values() if m.takes_threshold)}")
    rec = rec.load(method.needs)
    try:
        return method.select(rec, cfg)
    except InputError as e:  # values the method cannot use came from the files it read: name them
        raise ArtifactError(f"{', '.join(map(str, rec.inputs))}: {e}") from None
