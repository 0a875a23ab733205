"""The registry of selection (pruning) methods: every method is one entry.

An entry names the method, the records it reads (`needs`), its selection function and what its score
means on a plot. Everything else is derived from the registry: the `coreset_method` choices of every
stage, `run_pipeline.py --methods`, the script that runs a method, the output folder
(`coresets/<name>_<fraction>/`) and the README's method table (`method_table()`). A new method is one
`@register_method(...)` function here plus its test.

A selection function takes the loaded `Records` and the config and returns a `Selection`: the kept
sample indices (sorted unique int64), the per-sample score it ranked by (or None), facts for the
summary, and the order it selected in (`rank`: each sample's place in its identity, kept first), which
the stage writes as the selection's ranking (utils/selection/ranking.py). Per-identity budgets always go through `utils.selection.keep.keep_top_per_identity` (or DiffProb's own
rule): one tested helper, as the data-pruning literature learned the hard way (DeepCore).

A method that reads the scores selects among the samples they score: one that eval_trainset.py could not
decode (--skip_bad_images true) is left out as if the dataset did not hold it (per-identity quotas and the
fraction count the scored samples), is never kept, and is listed as `unscored` in the summary.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from utils.artifacts import paths
from utils.dynamics.dynunc import dynunc_scores
from utils.selection import diffprob as diffprob_rule
from utils.selection.keep import ccs_keep, keep_top_per_identity, random_key
from utils.dynamics import scores
from utils.dynamics.soft_labels import soft_label_entropy
from utils.artifacts.records import NEEDS, Records  # noqa: F401  (Records: what selection functions take)
from utils.artifacts.files import ArtifactError
from utils.errors import InputError

# Retraining also accepts these two, which are not selections of the pruning stages.
RETRAIN_ONLY = {"full": "every image", "relabel": "every image, cleaning's flagged ones with their suggested label"}


@dataclass
class Selection:
    kept: np.ndarray  # sorted unique int64 sample indices
    scores: Optional[np.ndarray] = None  # (N,) what the method ranked by, for the plot; None: no score
    info: dict = field(default_factory=dict)  # facts for summary.json (threshold, window, seconds, ...)
    warnings: list = field(default_factory=list)  # printed by the stage, e.g. an unreachable fraction
    # The ranking written beside the kept list (utils/selection/ranking.py), from the computation that selected:
    rank: Optional[np.ndarray] = None  # (N,) int64 place in its identity, 0 = kept first; -1: not ranked
    sort_key: Optional[np.ndarray] = None  # (N,) what the order sorts by where `scores` is None (Rand's key)
    nested: bool = False  # rank < k is this method's selection for every per-identity quota k (keep-top)


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
    seeded: bool = False  # the selection depends on `--seed` (another training seed selects again)
    summary: str = ""  # one line for --help and the README
    reads: tuple = ()  # the config keys it reads: checked by `method_config_errors`, listed by the README table


METHODS: dict = {}
_ALIASES: dict = {}


# Every method reads these; a method declares the rest (`reads=`), and the checks below follow the keys, not names.
BASE_KEYS = ("fraction", "min_samples_per_id")


def register_method(name, *, title, needs=(), score_name=None, script=None, aliases=(), takes_threshold=False,
                    seeded=False, summary="", reads=()):
    """Decorator: register `fn(records, cfg) -> Selection` as selection method `name`, reading the config keys
    BASE_KEYS + `reads` (+ `threshold` when `takes_threshold`, `seed` when `seeded`)."""
    def wrap(fn):
        for n in (name, *aliases):
            if n in METHODS or n in _ALIASES or n in RETRAIN_ONLY:
                raise ValueError(f"selection method name {n!r} is taken")
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"{name}: unknown needs {sorted(unknown)}; valid: {sorted(NEEDS)}")
        keys = (*BASE_KEYS, *(("threshold",) if takes_threshold else ()), *(("seed",) if seeded else ()), *reads)
        METHODS[name] = Method(name, title, fn, tuple(needs), score_name, tuple(script or ("coreset_select.py",)),
                               tuple(aliases), takes_threshold, seeded,
                               summary or (fn.__doc__ or "").strip().split("\n")[0], tuple(dict.fromkeys(keys)))
        for a in aliases:
            _ALIASES[a] = name
        return fn
    return wrap


def method_config_errors(cfg, num_images: int = None, class_counts=None) -> list:
    """What is wrong with `cfg` for its `coreset_method`, by the keys and inputs the method declares (config
    asks this when it checks a config against a dataset); [] for full / relabel or an unknown name."""
    method = METHODS.get(canonical_name(cfg.coreset_method))
    if method is None:
        return []
    errors = []
    if "topk" in method.needs and cfg.record_topk == 0:
        errors.append(f"coreset_method={method.name} reads the top-k logits the original training records; "
                      f"record_topk=0 records none")
    epochs, which = (cfg.score_epochs, "score_epochs") if cfg.score_epochs else (cfg.num_epoch, "num_epoch")
    if "window" in method.reads and cfg.window + 1 > epochs:  # the last epoch's window is left out (the paper's)
        errors.append(f"window={cfg.window} needs {which} >= window + 1 = {cfg.window + 1} (found {epochs}): "
                      f"{method.title} reads `window`-epoch windows of recorded probabilities ending before the last")
    by_fraction = not (method.takes_threshold and cfg.threshold is not None)
    if class_counts is not None and num_images and by_fraction:
        counts = np.asarray(class_counts, dtype=np.int64)
        floor = int(np.minimum(counts, cfg.min_samples_per_id).sum())
        if floor >= num_images:
            errors.append(f"min_samples_per_id={cfg.min_samples_per_id} is at least the size of every identity "
                          f"(largest {int(counts.max(initial=0))}): every image would be kept")
        elif floor > cfg.fraction * num_images:
            errors.append(f"min_samples_per_id={cfg.min_samples_per_id} alone keeps {floor} of {num_images} images "
                          f"(min(count, {cfg.min_samples_per_id}) per identity), more than fraction={cfg.fraction} "
                          f"asks ({cfg.fraction * num_images:.0f}); lower min_samples_per_id or raise fraction")
    return errors


def coreset_method_aliases() -> dict:
    """The paper repository's names -> the registered ones (config resolves them)."""
    return dict(_ALIASES)


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


def default_coreset_method() -> str:
    """The `coreset_method` a config has unless told otherwise: the paper's method."""
    return "diffprob"


def coreset_method_choices() -> tuple:
    """Every value `coreset_method` accepts: retraining's own, the registered methods and their aliases."""
    return (*RETRAIN_ONLY, *METHODS, *_ALIASES)


def method_labels() -> dict:
    """{method: title} for tables and plots, in the registry's order: the full-data model first, relabelling last."""
    return {"full": "full data", **{name: m.title for name, m in METHODS.items()},
            "relabel": "relabelled (cleaning's suggestions)"}


def method_table() -> str:
    """The README's method table (markdown), from the registry."""
    rows = ["| method | `--coreset_method` | script | reads | what it keeps |", "|---|---|---|---|---|"]
    ccs = [m for m in METHODS.values() if m.name.startswith("ccs_")]  # one row: CCS over each score
    for m in METHODS.values():
        if m in ccs:
            continue
        names = ", ".join(f"`{n}`" for n in (m.name, *m.aliases))
        rows.append(f"| {m.title} | {names} | `{' '.join(m.script)}` | {', '.join(m.needs) or 'labels'} | "
                    f"{m.summary} |")
    if ccs:
        needs = sorted({n for m in ccs for n in m.needs})
        rows.append(f"| CCS over a score | {', '.join(f'`{m.name}`' for m in ccs)} | `coreset_select.py` | "
                    f"{', '.join(needs)} | CCS (Zheng et al. 2023) over that method's score: the hardest dropped, the "
                    f"rest sampled across score strata |")
    return "\n".join(rows) + "\n"


def _ranked(scores, cfg):
    """Scores as `keep_top_per_identity` ranks them: the highest are kept unless coreset_order=ascending."""
    return scores if cfg.coreset_order == "descending" else -scores


# ------------------------------------------------------------------------------------------- methods
@register_method("rand", title="Rand", script=("coreset_rand.py",), seeded=True,
                 summary="per identity, uniformly at random (seeded by --seed)")
def select_rand(rec: Records, cfg) -> Selection:
    """Per identity, a uniformly random share of the images."""
    t0 = time.time()
    key = random_key(rec.labels.size, cfg.seed)  # random_keep's draw
    kept, rank = keep_top_per_identity(key, rec.labels, cfg.fraction, cfg.min_samples_per_id,
                                               return_rank=True)
    rec.inputs.append(cfg.rec)
    return Selection(kept, None, {"seed": cfg.seed, "seconds": time.time() - t0}, rank=rank, sort_key=key,
                     nested=True)


@register_method("dynunc", title="DynUnc", needs=("prob_history",), score_name="DynUnc uncertainty",
                 script=("coreset_dynunc.py",), reads=("window", "coreset_order"),
                 summary="per identity, the images whose p(label) varied most over training epochs")
def select_dynunc(rec: Records, cfg) -> Selection:
    """DynUnc (He et al. 2023): mean over sliding windows of the std of p(label) across epochs."""
    history = rec.prob_history
    t0 = time.time()
    scores = dynunc_scores(history, cfg.window)
    kept, rank = keep_top_per_identity(_ranked(scores, cfg), rec.labels, cfg.fraction,
                                               cfg.min_samples_per_id, return_rank=True)
    return Selection(kept, scores, {"window": cfg.window, "epochs": int(history.shape[0]),
                                    "seconds": time.time() - t0}, rank=rank, nested=True)


def _diffprob(rec: Records, cfg, excluded=None) -> Selection:
    prob = rec.scores["gt_prob_with_margin"]
    t0 = time.time()
    if cfg.threshold is not None:
        threshold = float(cfg.threshold)
        kept, rank = diffprob_rule.diffprob(prob, rec.labels, threshold, cfg.min_samples_per_id, excluded=excluded,
                                      return_rank=True)
    else:
        kept, threshold, rank = diffprob_rule.diffprob_for_fraction(prob, rec.labels, cfg.fraction, cfg.min_samples_per_id,
                                                              excluded=excluded, return_rank=True)
    info = {"threshold": threshold, "requested_fraction": None if cfg.threshold is not None else cfg.fraction,
            "seconds": time.time() - t0}
    sel = Selection(kept, prob, info, rank=rank)
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


# ---------------------------------------------------------------------- scores of the training trajectory
# Each score below is one entry (keep the highest per identity, the one keep-k helper) and one CCS entry,
# `ccs_<name>` (Zheng et al. 2023): the hardest `ccs_beta` dropped, the budget spread over `ccs_strata`
# equal-width score strata, per identity. Formulas, sources and approximations: utils/dynamics/scores.py.
def _topk_args(rec: Records):
    t = rec.topk
    return t["topk_logits"], t["topk_index"], t["rest_mean_logit"]


def _label_logit(rec: Records, required: bool):
    logit = rec.topk.get("label_logit")
    if logit is None and required:
        raise ArtifactError(f"{paths.topk_history_path(rec.cfg)} holds no label_logit (recorded since 2026-12): "
                            f"train the original model again to use this method")
    return logit


def _score_el2n(rec, cfg):
    return scores.el2n_scores(*_topk_args(rec), rec.labels, rec.num_classes, cfg.score_epoch,
                              label_logit=_label_logit(rec, required=False)), {"epoch": cfg.score_epoch}


def _score_forgetting(rec, cfg):
    return scores.forgetting_scores(rec.topk["topk_index"], rec.labels, rec.num_classes), {}


def _score_aum(rec, cfg):
    return scores.aum_scores(*_topk_args(rec), _label_logit(rec, required=True), rec.labels, rec.num_classes), {}


def _score_margin(rec, cfg):
    return scores.margin_scores(*_topk_args(rec), rec.num_classes, cfg.score_epoch), {"epoch": cfg.score_epoch}


def _score_least_confidence(rec, cfg):
    return (scores.least_confidence_scores(*_topk_args(rec), rec.num_classes, cfg.score_epoch),
            {"epoch": cfg.score_epoch})


def _score_entropy(rec, cfg):
    t = rec.topk
    return soft_label_entropy(t["topk_logits"], t["topk_index"], t["rest_mean_logit"], rec.num_classes), {}


def _score_dynunc(rec, cfg):
    return dynunc_scores(rec.prob_history, cfg.window), {"window": cfg.window}


def _keep_top(score_fn):
    """A selection keeping, per identity, the highest values of `score_fn(rec, cfg) -> (scores, info)`."""
    def select(rec: Records, cfg) -> Selection:
        t0 = time.time()
        values, info = score_fn(rec, cfg)
        kept, rank = keep_top_per_identity(_ranked(values, cfg), rec.labels, cfg.fraction,
                                                   cfg.min_samples_per_id, return_rank=True)
        return Selection(kept, values, {**info, "seconds": time.time() - t0}, rank=rank, nested=True)
    return select


def _ccs(score_fn):
    """A CCS selection over `score_fn`'s scores (higher = harder), seeded by --seed."""
    def select(rec: Records, cfg) -> Selection:
        t0 = time.time()
        values, info = score_fn(rec, cfg)
        kept, rank = ccs_keep(values, rec.labels, cfg.fraction, cfg.min_samples_per_id, beta=cfg.ccs_beta,
                                     strata=cfg.ccs_strata, seed=cfg.seed, return_rank=True)
        return Selection(kept, values, {**info, "beta": cfg.ccs_beta, "strata": cfg.ccs_strata, "seed": cfg.seed,
                                        "seconds": time.time() - t0}, rank=rank)
    return select


def _register_score(name, score_fn, *, title, needs, score_name, summary, script=None, reads=()):
    """`name`: per identity the highest scores; `ccs_<name>`: CCS over the same score. `reads`: the score's keys."""
    register_method(name, title=title, needs=needs, score_name=score_name, script=script, summary=summary,
                    reads=(*reads, "coreset_order"))(_keep_top(score_fn))
    register_method(f"ccs_{name}", title=f"CCS over {title}", needs=needs, score_name=score_name, seeded=True,
                    reads=(*reads, "ccs_beta", "ccs_strata"),
                    summary=f"CCS (Zheng et al. 2023) over the {title} score: the hardest dropped, the rest sampled "
                            f"across score strata")(_ccs(score_fn))


_register_score("entropy", _score_entropy, title="soft-label entropy", needs=("topk",), score_name="soft-label entropy",
                script=("coreset_entropy.py",),
                summary="per identity, the images whose epoch-averaged soft label is most uncertain")
_register_score("el2n", _score_el2n, title="EL2N", needs=("topk",), score_name="EL2N", reads=("score_epoch",),
                summary="per identity, the largest error L2 norm averaged over the epochs up to --score_epoch "
                        "(Paul et al. 2021)")
_register_score("forgetting", _score_forgetting, title="forgetting", needs=("topk",), score_name="forgetting events",
                summary="per identity, the most forgotten images (correct -> wrong between epochs; never learned "
                        "first; Toneva et al. 2019)")
_register_score("aum", _score_aum, title="AUM", needs=("topk",), score_name="- area under the margin",
                summary="per identity, the lowest area under the margin over epochs (Pleiss et al. 2020)")
_register_score("margin", _score_margin, title="margin", needs=("topk",), score_name="- (p1 - p2)",
                reads=("score_epoch",),
                summary="per identity, the smallest gap between the two most probable classes at --score_epoch")
_register_score("least_confidence", _score_least_confidence, title="least confidence", needs=("topk",),
                score_name="1 - max p", reads=("score_epoch",),
                summary="per identity, the lowest top-class probability at --score_epoch")
register_method("ccs_dynunc", title="CCS over DynUnc", needs=("prob_history",), score_name="DynUnc uncertainty",
                seeded=True, reads=("window", "ccs_beta", "ccs_strata"),
                summary="CCS (Zheng et al. 2023) over the DynUnc score: the hardest dropped, the rest sampled across "
                        "score strata")(_ccs(_score_dynunc))


def in_dataset(selection: Selection, index: np.ndarray, num_images: int) -> Selection:
    """A selection made on the samples `index` only (`Records.subset(index)`), in the dataset's sample indices:
    every other sample is dropped, unranked (-1) and without a score (NaN)."""
    def spread(values, fill, dtype):
        if values is None:
            return None
        out = np.full(num_images, fill, dtype=dtype)
        out[index] = values
        return out

    return dataclasses.replace(selection, kept=index[selection.kept],
                               scores=spread(selection.scores, np.nan, np.float64),
                               rank=spread(selection.rank, -1, np.int64),
                               sort_key=spread(selection.sort_key, np.nan, np.float64))


def run_selection(method: Method, rec: Records, cfg) -> Selection:
    """Check the config against the method, read what it needs, select."""
    if cfg.threshold is not None and not method.takes_threshold:
        raise InputError(f"{method.name} is set by --fraction; --threshold is for "
                         f"{', '.join(m.name for m in METHODS.values() if m.takes_threshold)}")
    rec = rec.load(method.needs)
    unscored = rec.unscored if "scores" in method.needs else np.empty(0, dtype=np.int64)
    try:
        if not unscored.size:
            return method.select(rec, cfg)
        scored = np.setdiff1d(np.arange(rec.labels.size, dtype=np.int64), unscored)
        selection = in_dataset(method.select(rec.subset(scored), cfg), scored, rec.labels.size)
        selection.info["unscored"] = unscored.tolist()
        return selection
    except InputError as e:  # values the method cannot use came from the files it read: name them
        raise ArtifactError(f"{', '.join(map(str, rec.inputs))}: {e}") from None
