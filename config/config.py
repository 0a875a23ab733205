"""The one configuration of every stage: edit the defaults here, override any key on the command line.

    python train_everything.py --dataset webface --rec /data/faces_webface_112x112 --loss ArcFace

Keys whose default is None are filled when the config is resolved: from the dataset preset table
(epoch schedule, verification targets), from the loss table (s, m), or from the dataset itself
(`num_classes`, `num_image` and the image size are always read from `property` / the record headers,
never typed in by hand).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
import typing
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from utils.errors import ToolkitError


@dataclass
class Config:
    # ---- data -------------------------------------------------------------------------------
    dataset: str = "auto"  # preset: webface (CASIA-WebFace), ms1mv2, glint360k, synthetic; auto: synthetic for a
    #                        folder make_synthetic_dataset.py wrote, else read from the class count in `property`
    rec: str = "data/synthetic"  # dataset folder: train.rec, train.idx, property, *.bin, ijb/
    output: str = "output"  # experiment folder; every stage reads and writes below it
    val_targets: Optional[List[str]] = None  # .bin names in `rec` (None: the preset's)
    num_workers: int = 2  # DataLoader worker processes per rank
    threads: int = 0  # CPU: torch's threads per process (0: the cores per rank less num_workers). Kernels sum in
    #                   another order with another thread count, so a fixed number gives the same digits on
    #                   machines with more or fewer cores (the CPU profiles of run_pipeline.py use 1)
    skip_bad_images: bool = False  # images OpenCV cannot decode do not stop a stage: training goes without them
    #                                (each logged once), eval_trainset.py gives them no score (NaN, listed as
    #                                `unscored`), and cleaning and selection leave them out of their kept lists
    # ---- model -------------------------------------------------------------------------------
    network: str = "iresnet50"  # backbones registry name
    SE: bool = False  # squeeze-and-excitation blocks in the iresnets
    dropout: Optional[float] = None  # before the embedding layer of the iresnets (None: the paper's 0.4 for
    #                                  iresnet18/34/50, 0 for the others)
    embedding_size: int = 512
    loss: str = "CosFace"  # losses registry name of the margin head
    s: Optional[float] = None  # scale (None: the loss table's)
    m: Optional[float] = None  # margin (None: the loss table's)
    std: Optional[float] = None  # margin std of the Elastic heads (None: the loss table's)
    head_args: Dict[str, float] = field(default_factory=dict)  # the head's other parameters, NAME=VALUE,... (e.g.
    #                                `--head_args m1=-0.2,t=0.3` for RobustFace; --help lists every head's); a
    #                                parameter not given keeps the loss table's value; s, m, std: the keys above
    sample_rate: float = 1.0  # Partial FC: share of each rank's class centres in a training step (positives
    #                           always; 1: every class). With < 1 the records hold the full-softmax probability
    interclass_filter: float = 0.0  # in [0, 1), 0: off. A training step leaves out of its loss (the mean over the
    #                                 rest) each sample whose cosine to another identity's centre exceeds this
    # ---- optimisation (paper recipe) ----------------------------------------------------------
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256  # per process
    lr: float = 0.1  # for a global batch of 512; the run uses lr * global_batch / 512
    num_epoch: Optional[int] = None  # None: the preset's
    warmup_epoch: int = 0
    lr_steps: Optional[List[int]] = None  # epochs at which lr is multiplied by lr_decay
    lr_decay: float = 0.1
    grad_clip: float = 5.0  # max gradient norm (0: off)
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU) | fp32 | fp16 | bf16
    channels_last: bool = True  # NHWC backbone and batches: +15-20% images/s on 2 CPU cores (docs/results.md), the GPU default
    compile: bool = False  # torch.compile the backbone (training and scoring)
    compile_mode: str = "default"  # torch.compile's mode for training: default | reduce-overhead (CUDA graphs of
    #                                the backbone's forward and backward: +21% images/s on one H200,
    #                                docs/speed.md) | max-autotune-no-cudagraphs. Scoring compiles in the default mode
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False  # continue from the last complete checkpoint of this run
    eval_step: int = 0  # verification every N steps (0: at each epoch end only)
    verify_every_epoch: bool = True  # verification on the .bin targets after every epoch (false: after the last)
    frequent: int = 50  # log a line every N steps
    max_steps_per_epoch: int = 0  # 0: the whole epoch (a positive value is for smoke tests)
    # ---- dynamic pruning: train on less, epoch by epoch (utils/training/dynamic.py) ------------------------
    dynamic_method: str = "none"  # a method of utils/training/dynamic.py's registry (none: every sample, every epoch)
    dynamic_ratio: float = 0.5  # the share a pruning epoch prunes (InfoBatch: of the samples below the mean loss)
    dynamic_anneal: float = 0.875  # epochs 1 .. anneal * num_epoch prune; the rest train on every sample, weight 1
    dynamic_ema: float = 0.8  # ucb: decay of each sample's moving loss mean and variance
    dynamic_ucb_c: float = 1.0  # ucb: the score is the loss mean + c * its standard deviation
    # ---- original training and scoring -------------------------------------------------------
    is_original_train: bool = True  # full dataset + per-epoch probability recording (DynUnc input)
    original_net_loss: str = "CosFace"  # loss of the original model whose scores the pruning reads
    original_network: Optional[str] = None  # its network (None: --network); retraining other networks on its lists
    record_topk: int = 10  # margin-free top-k logits recorded per sample and epoch (what methods and rules that read top-k records use)
    eval_epoch: int = -1  # checkpoint epoch to score (1-based; -1: the last; score_epochs K: K)
    score_epochs: int = 0  # early scoring: the static methods read the original run's first K epochs (records of
    #                        epochs 1..K, checkpoint K) and write under a scorer tag of their own (0: every epoch)
    use_all_epochs: bool = False  # score every saved epoch and average
    checkpoint: str = ""  # explicit checkpoint / backbone.pth to score or evaluate
    head_checkpoint: str = ""  # head state dict to pair with a plain backbone.pth
    score_batch_size: int = 512
    # ---- pruning and cleaning ------------------------------------------------------------------
    coreset_method: str = field(default_factory=lambda: registry_default("coreset_method"))  # a selection method of
    #                                   utils/selection/registry.py's registry (its default: the paper's; the kept list
    #                                   retraining uses), or full / relabel (every image; cleaning's flagged
    #                                   ones with their suggested label); the paper's names are aliases
    clean_rule: str = field(default_factory=lambda: registry_default("clean_rule"))  # a cleaning rule of
    #                                   utils/cleaning/registry.py's registry (its default: the paper's)
    clean_agree: Optional[List[str]] = None  # other rules that must flag a sample too (agreement; None: none)
    clean_epochs: str = ""  # rules on soft labels: the recorded epochs "A-B" (1-based, inclusive); "": all
    clean_probs: str = field(default_factory=lambda: registry_default("clean_probs"))  # the probabilities a rule
    #                                   reads where it lets you choose (utils/cleaning/probabilities.py)
    clean_margin_quantile: float = 0.25  # soft-label margin rule: flag when another identity beats the label by the
    #                                      clean majority's margin at this quantile (0 < q < 1)
    clean_angle: float = 75.0  # the sub-center rule's largest angle (degrees) to an identity's dominant sub-center (the
    #                            paper's 75; 0: a bound from the data, the identity's median + Tukey's fence)
    clean_round: int = 0  # iterative cleaning: round R >= 1 (R >= 2 scores with round R-1's retrained model)
    clean_tolerance: float = 0.01  # rounds stop when the flagged set changes by less (share of the last)
    fraction: float = 0.5  # kept fraction (per identity, or overall for a threshold method: the method table)
    threshold: Optional[float] = None  # a threshold method's t (None: searched for `fraction`)
    window: int = 10  # window J (epochs) of methods that read p(label) per epoch
    min_samples_per_id: int = 5
    coreset_order: str = "descending"  # score methods: keep the highest (descending) or lowest scores
    score_epoch: int = -1  # EL2N averages the epochs up to it; margin / least confidence read it (1-based; -1: last)
    ccs_beta: float = 0.1  # CCS: share of the hardest samples dropped first, per identity
    ccs_strata: int = 50  # CCS: equal-width score strata the budget is spread over
    relabel: bool = False  # cleaning: also write the suggested label of each flagged sample
    write_text_kept_index: bool = False  # also write the paper repository's `kept_index = [...]` text form
    kept_index: str = ""  # explicit kept list (.npy or the paper's text form) for retraining
    label_map: str = ""  # explicit label map for retraining
    # ---- evaluation ----------------------------------------------------------------------------
    ijb_root: str = ""  # IJB release folder (loose_crop/, meta/); "" : <rec>/ijb
    ijb_target: str = "ijbc"  # ijbc | ijbb
    eval_batch_size: int = 256


# Dataset presets: the schedule each dataset is trained with (paper: CASIA-WebFace, 34 epochs).
DATASET_PRESETS = {
    # the paper's CASIA-WebFace runs also verify on CFP-FF
    "webface": dict(num_epoch=34, lr_steps=[20, 28, 32],
                    val_targets=["lfw", "cfp_fp", "cfp_ff", "agedb_30", "calfw", "cplfw"]),
    "ms1mv2": dict(num_epoch=26, lr_steps=[8, 14, 20, 25], val_targets=["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]),
    "glint360k": dict(num_epoch=20, lr_steps=[8, 12, 15, 18], val_targets=["lfw", "cfp_fp", "agedb_30", "calfw", "cplfw"]),
    "synthetic": dict(num_epoch=12, lr_steps=[8, 10], val_targets=["syn_frontal", "syn_pose"]),
}

# The class count in `property` of the public releases (InsightFace's dataset zoo): how `dataset=auto` tells them.
PRESET_CLASSES = {10572: "webface", 85742: "ms1mv2", 360232: "glint360k"}


def infer_dataset(rec) -> tuple:
    """(preset, how it was told) of the dataset folder `rec` for `dataset=auto`; ConfigError when it cannot be told.

    Synthetic: the folder has the generator's dataset.json, or the synthetic verification sets (an exported or
    noisy copy of a synthetic set). A real release: its class count. A missing folder resolves to synthetic
    (the stage that reads it then says what is missing)."""
    from pathlib import Path

    rec = Path(rec)
    if not rec.exists() or (rec / "dataset.json").exists() or (rec / "syn_frontal.bin").exists():
        return "synthetic", "a synthetic dataset"
    try:
        classes = int((rec / "property").read_text().split(",")[0])
    except (OSError, ValueError):  # not a dataset folder (yet): the stage reading it says what is wrong
        return "synthetic", "no readable property file"
    if classes in PRESET_CLASSES:
        return PRESET_CLASSES[classes], f"{classes:,} classes in {rec / 'property'}"
    raise ConfigError(f"dataset=auto cannot tell which dataset {rec} is ({classes:,} classes, not a synthetic "
                      f"one): pass --dataset {' | '.join(DATASET_PRESETS)}")


# Allowed values per key that config itself knows; `choices(key)` adds the keys a registry owns.
CHOICES = {
    "dtype": ("auto", "fp32", "fp16", "bf16"),
    "device": ("auto", "cpu", "cuda"),
    "coreset_order": ("descending", "ascending"),
    "ijb_target": ("ijbc", "ijbb"),
    "dataset": ("auto", *DATASET_PRESETS),
    "compile_mode": ("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
}


# Keys whose values a registry owns: {key: (module, function giving the values, function giving aliases or None,
# function giving the default or None: the dataclass's)}.
# config asks the registry when a config is checked or a --help is built, by module name: the registries import
# modules that import config, so config cannot import them (nor does importing a registry change config).
REGISTRY_KEYS = {
    "coreset_method": ("utils.selection.registry", "coreset_method_choices", "coreset_method_aliases",
                       "default_coreset_method"),
    "clean_rule": ("utils.cleaning.registry", "rule_choices", None, "default_rule"),
    "clean_probs": ("utils.cleaning.probabilities", "prob_source_choices", None, "default_prob_source"),
    "dynamic_method": ("utils.training.dynamic", "dynamic_choices", None, None),
}


def _registry(key: str, which: int):
    module, *functions = REGISTRY_KEYS[key]
    name = functions[which]
    return getattr(importlib.import_module(module), name)() if name else {}


def registry_default(key: str) -> str:
    """The default value of a key a registry owns, from the registry (config names no method or rule itself)."""
    return _registry(key, 2)


def choices(key: str):
    """The values `key` accepts: config's own list or the owning registry's; None where any value goes."""
    if key in REGISTRY_KEYS:
        return tuple(_registry(key, 0))
    return CHOICES.get(key)


def aliases(key: str) -> dict:
    """Other names `key` accepts for a value (the paper repository's method names) -> the registered ones."""
    return _registry(key, 1) if key in REGISTRY_KEYS else {}


class ConfigError(ToolkitError, ValueError):
    """A config value a user gave is not valid."""


def _base_type(tp):
    """(base type, is_list) of a field annotation such as Optional[List[int]] (dict for a Dict[...] field)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, List):
        return typing.get_args(tp)[0], True
    if origin in (dict, Dict):
        return dict, False
    return tp, False


TRUE_WORDS = {"1", "true", "yes", "on"}  # what a boolean key accepts (utils/runtime/cli.py too)
FALSE_WORDS = {"0", "false", "no", "off"}


def _parse_scalar(key, text, tp):
    if tp is bool:
        low = text.strip().lower()
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
        raise ConfigError(f"--{key}: expected a boolean (true/false), got {text!r}")
    try:
        return tp(text)
    except ValueError:
        raise ConfigError(f"--{key}: expected {tp.__name__}, got {text!r}") from None


def _parse_mapping(key, text) -> dict:
    """`NAME=VALUE,NAME=VALUE` -> {NAME: "VALUE"} ("" -> {}); the values are converted when the config is resolved."""
    out = {}
    for item in text.replace(",", " ").split():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"--{key}: expected NAME=VALUE items separated by commas, got {item!r}")
        if name in out:
            raise ConfigError(f"--{key}: {name} is given twice")
        out[name] = value
    return out


def parse_value(key: str, text: str):
    """Parse command-line text for `key` into the field's type ('none' clears an Optional key)."""
    tp = typing.get_type_hints(Config)[key]
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    base, is_list = _base_type(tp)
    if base is dict:
        return _parse_mapping(key, text)
    if is_list:
        return [_parse_scalar(key, t, base) for t in text.replace(",", " ").split()]
    return _parse_scalar(key, text, base)


def _describe_keys():
    return ", ".join(f.name for f in dataclasses.fields(Config))


def _check(cfg: Config):
    """Value checks that do not need the dataset."""
    for key in (*CHOICES, *REGISTRY_KEYS):
        allowed = choices(key)
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if not 0 <= cfg.ccs_beta < 1 or cfg.ccs_strata < 1:
        raise ConfigError(f"ccs_beta={cfg.ccs_beta} must be in [0, 1) and ccs_strata={cfg.ccs_strata} >= 1")
    if cfg.score_epoch == 0 or cfg.score_epoch < -1:
        raise ConfigError(f"score_epoch={cfg.score_epoch} must be -1 (the last) or an epoch >= 1")
    if not 0 < cfg.fraction <= 1:
        raise ConfigError(f"fraction={cfg.fraction} must be in (0, 1]")
    if not 0 < cfg.sample_rate <= 1:
        raise ConfigError(f"sample_rate={cfg.sample_rate} must be in (0, 1] (Partial FC's share of the class "
                          f"centres; 1: every class)")
    if not 0 <= cfg.interclass_filter < 1:
        raise ConfigError(f"interclass_filter={cfg.interclass_filter} must be in [0, 1) (a cosine threshold; 0: off)")
    if cfg.threshold is not None and cfg.threshold < 0:
        raise ConfigError(f"threshold={cfg.threshold} must be >= 0")
    for key in ("batch_size", "embedding_size", "window", "score_batch_size", "eval_batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 1")
    if cfg.window < 2:
        raise ConfigError(f"window={cfg.window} must be >= 2 (a standard deviation needs two epochs)")
    if cfg.min_samples_per_id < 1:
        raise ConfigError(f"min_samples_per_id={cfg.min_samples_per_id} must be >= 1")
    if cfg.num_workers < 0 or cfg.lr <= 0:
        raise ConfigError("num_workers must be >= 0 and lr > 0")
    errors = importlib.import_module("utils.training.dynamic").dynamic_config_errors(cfg)  # the registry's keys
    if errors:
        raise ConfigError("; ".join(errors))
    if cfg.threads < 0:
        raise ConfigError(f"threads={cfg.threads} must be >= 0 (0: the cores per rank less num_workers)")
    if cfg.num_epoch is not None and cfg.num_epoch < 1:
        raise ConfigError(f"num_epoch={cfg.num_epoch} must be >= 1")


# Head parameters with a config key of their own; head_args holds the others of HEAD_DEFAULTS' row.
HEAD_KEYS = ("s", "m", "std")


def _head_args(loss: str, given) -> dict:
    """The head_args of `loss` as {name: float}; ConfigError naming the loss and its keys, or the bad value."""
    from losses.registry import HEAD_DEFAULTS

    if not isinstance(given, dict):
        raise ConfigError(f"head_args must be NAME=VALUE pairs, got {given!r}")
    valid = [k for k in HEAD_DEFAULTS[loss] if k not in HEAD_KEYS]
    own = [k for k in HEAD_DEFAULTS[loss] if k in HEAD_KEYS]
    listing = f"{', '.join(valid) or 'none'} ({', '.join(own)}: --{', --'.join(own)})"
    keys = sorted(k for k in given if k in HEAD_KEYS)
    if keys:
        raise ConfigError(f"head_args {', '.join(keys)}: give {'them' if len(keys) > 1 else 'it'} as "
                          f"{', '.join('--' + k for k in keys)}, not in head_args; head_args of loss={loss}: {listing}")
    unknown = sorted(k for k in given if k not in valid)
    if unknown:
        raise ConfigError(f"head_args {', '.join(unknown)}: not a parameter of loss={loss}; its head_args: {listing}")
    out = {}
    for name in valid:  # in the table's order
        if name in given:
            value = given[name]
            try:
                number = math.nan if isinstance(value, bool) else float(value)
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise ConfigError(f"head_args {name}={value!r}: expected a finite number")
            out[name] = number
    return out


def head_params(cfg) -> dict:
    """Every constructor parameter of the head of a resolved config: the loss table's row, then s, m, std and
    head_args as the config gives them (what training builds the head with and records in the checkpoint)."""
    from losses.registry import HEAD_DEFAULTS

    row = HEAD_DEFAULTS[cfg.loss]
    given = {k: getattr(cfg, k) for k in HEAD_KEYS if k in row and getattr(cfg, k) is not None}
    return {**row, **given, **cfg.head_args}


def head_params_help() -> str:
    """Every head's parameters with the loss table's defaults (the --help text of head_args)."""
    from losses.registry import HEAD_DEFAULTS

    rows = "; ".join(f"{name}: {', '.join(f'{k}={v:g}' for k, v in row.items())}"
                     for name, row in HEAD_DEFAULTS.items())
    return (f"the head's parameters other than {', '.join(HEAD_KEYS)} (those: --{', --'.join(HEAD_KEYS)}), "
            f"NAME=VALUE,...; each head's parameters and defaults: {rows}")


def resolve(cfg: Config, preset_needed: bool = True) -> Config:
    """Fill the None keys from the preset and loss tables; checks values. Returns a new Config."""
    from losses.registry import HEAD_DEFAULTS, get_head

    values = dataclasses.asdict(cfg)
    for key in REGISTRY_KEYS:
        values[key] = aliases(key).get(values[key], values[key])
    if values["dataset"] == "auto":
        try:
            values["dataset"], how = infer_dataset(values["rec"])
        except ConfigError:
            if preset_needed:
                raise
            how = None  # a stage that reads no schedule or targets (pruning, cleaning, export) runs on any folder
        if values["dataset"] not in ("synthetic", "auto"):
            print(f"dataset: {values['dataset']} ({how}); --dataset chooses another preset", file=sys.stderr)
    cfg = Config(**values)
    _check(cfg)
    # dataset=auto left unresolved (a stage without a schedule): the synthetic row fills the keys nobody reads
    for key, value in DATASET_PRESETS["synthetic" if cfg.dataset == "auto" else cfg.dataset].items():
        if values[key] is None:
            values[key] = list(value) if isinstance(value, list) else value
    by_lower = {name.lower(): name for name in HEAD_DEFAULTS}
    if cfg.loss.lower() not in by_lower:
        raise ConfigError(f"loss={cfg.loss!r} is not a known head; valid: {', '.join(HEAD_DEFAULTS)}")
    loss = values["loss"] = by_lower[cfg.loss.lower()]
    values["original_net_loss"] = by_lower.get(cfg.original_net_loss.lower(), cfg.original_net_loss)
    for key in HEAD_KEYS:
        if values[key] is None:
            values[key] = HEAD_DEFAULTS[loss].get(key)
    values["head_args"] = _head_args(loss, values["head_args"])
    try:  # the head's own checks of its values (e.g. RobustFace's mu), on a head of two 1-d class centres
        get_head(loss, 1, 2, **head_params(Config(**values)))
    except ValueError as e:  # the heads' messages name the head
        raise ConfigError(str(e)) from None
    if values["dropout"] is None:
        values["dropout"] = 0.4 if values["network"] in ("iresnet18", "iresnet34", "iresnet50") else 0.0
    if not 0 <= values["dropout"] < 1:
        raise ConfigError(f"dropout={values['dropout']} must be in [0, 1)")
    if values["dropout"] and not values["network"].startswith("iresnet"):
        raise ConfigError(f"dropout={values['dropout']}: only the iresnets have a dropout layer, not {values['network']}")
    if values["score_epochs"]:
        if not 0 < values["score_epochs"] <= values["num_epoch"]:
            raise ConfigError(f"score_epochs={values['score_epochs']} must be an epoch in 1..{values['num_epoch']} "
                              f"(0: every epoch)")
        if values["eval_epoch"] not in (-1, values["score_epochs"]):
            raise ConfigError(f"eval_epoch={values['eval_epoch']} and score_epochs={values['score_epochs']} disagree: "
                              f"early scoring reads the checkpoint of epoch score_epochs")
        values["eval_epoch"] = values["score_epochs"]
    beyond = [s for s in values["lr_steps"] if s > values["num_epoch"]]
    if beyond:
        # A user who only lowered num_epoch keeps the schedule's earlier steps, as the paper's schedule does.
        warnings.warn(f"lr_steps {beyond} lie beyond num_epoch={values['num_epoch']} and are ignored", stacklevel=2)
        values["lr_steps"] = [s for s in values["lr_steps"] if s <= values["num_epoch"]]
    return Config(**values)


def build_parser(description: str = "", stage: str = None, argv=()) -> argparse.ArgumentParser:
    """The parser of every config key. With `stage` (a stage script's name), `--help` shows the keys that stage
    reads (config/stage_keys.py) and names the others, which it still accepts; `--help-all` shows every key."""
    shown = None  # only for --help: reading the sources is start-up work no run needs
    if stage is not None and {"-h", "--help"} & set(argv) and "--help-all" not in argv:
        from config.stage_keys import REPO, stage_keys

        shown = stage_keys(REPO / f"{stage}.py", [f.name for f in dataclasses.fields(Config)])
    others = [f.name for f in dataclasses.fields(Config) if shown is not None and f.name not in shown]
    epilog = ("Keys: --KEY VALUE (lists: comma-separated; head_args: NAME=VALUE,...; booleans: true/false; Optional "
              "keys: none).")
    if others:
        epilog += (f"\n\nThe shared config's other keys are accepted but not read by {stage}: {', '.join(others)} "
                   f"(--help-all lists every key with its default).")
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=epilog)
    parser.add_argument("--help-all", action="help", help="show every key of the shared config and exit")
    defaults = Config()
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        base, is_list = _base_type(hints[f.name])
        kind = f"list of {base.__name__}" if is_list else base.__name__
        allowed = choices(f.name)
        one_of = f"; one of {', '.join(allowed)}" if allowed else ""
        if base is dict:
            kind, one_of = "name=value,...", f"; {head_params_help()}"
        hidden = shown is not None and f.name not in shown
        parser.add_argument(f"--{f.name}", metavar=kind.upper().replace(" ", "_"), default=None,
                            help=argparse.SUPPRESS if hidden else f"default: {getattr(defaults, f.name)!r}{one_of}")
    return parser


def parse_config(argv=None, description: str = "", extra=None, defaults: Config = None, preset_needed: bool = True,
                 stage: str = None):
    """Defaults of config/config.py + `--key value` overrides, resolved and checked.

    An unknown key or a value of the wrong type exits with status 2 and names the valid keys.
    `extra` is an optional callable adding stage-specific arguments to the parser; the parsed
    namespace is then returned too: (cfg, args). `preset_needed`: the stage reads the dataset preset's
    schedule or verification targets, so `dataset=auto` must tell the dataset (else it may stay `auto`).
    `stage`: the stage script's name, whose `--help` then lists the keys it reads.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(description, stage, argv)
    if extra is not None:
        extra(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.print_usage(sys.stderr)
        print(f"error: unknown argument(s) {' '.join(unknown)}; valid keys: {_describe_keys()}", file=sys.stderr)
        raise SystemExit(2)
    base = defaults if defaults is not None else Config()
    overrides = {}
    try:
        for f in dataclasses.fields(Config):
            text = getattr(args, f.name)
            if text is not None:
                overrides[f.name] = parse_value(f.name, text)
        if overrides.get("threshold") is not None and "fraction" in overrides:
            raise ConfigError(f"--threshold {overrides['threshold']:g} and --fraction {overrides['fraction']:g} both "
                              f"given: a threshold decides the kept fraction itself; give one of them")
        cfg = resolve(dataclasses.replace(base, **overrides), preset_needed=preset_needed)
    except ConfigError as e:
        parser.print_usage(sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return (cfg, args) if extra is not None else cfg


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config from a saved dict (unknown keys, e.g. from a newer version, are an error)."""
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config keys {sorted(unknown)}; valid keys: {_describe_keys()}")
    return Config(**values)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=1, sort_keys=True)


def check_against_dataset(cfg: Config, num_images: int, num_classes: int, image_size=None, *, class_counts=None,
                          world_size: int = 1):
    """Checks of a resolved config that need the dataset; raises ConfigError naming the keys and the dataset.

    `image_size` is the side (or (H, W)) of the dataset's images; `class_counts` (images per identity,
    e.g. np.bincount(labels)) enables the min_samples_per_id check; `world_size` is the number of processes.
    """
    errors = []
    if num_classes < 2:
        errors.append(f"the dataset has {num_classes} identities; a margin head needs at least 2")
    if cfg.record_topk < 0:
        errors.append(f"record_topk={cfg.record_topk} must be >= 0 (0: record no top-k logits)")
    elif cfg.is_original_train and cfg.record_topk > num_classes:
        errors.append(f"record_topk={cfg.record_topk} exceeds the dataset's {num_classes} identities")
    if cfg.eval_epoch == 0 or cfg.eval_epoch < -1 or cfg.eval_epoch > cfg.num_epoch:
        errors.append(f"eval_epoch={cfg.eval_epoch} must be -1 (the last) or an epoch in 1..{cfg.num_epoch} "
                      f"(num_epoch)")
    if not 0 <= cfg.warmup_epoch <= cfg.num_epoch:
        errors.append(f"warmup_epoch={cfg.warmup_epoch} must be in 0..{cfg.num_epoch} (num_epoch)")
    if cfg.max_steps_per_epoch < 0:
        errors.append(f"max_steps_per_epoch={cfg.max_steps_per_epoch} must be >= 0 (0: the whole epoch)")
    global_batch = cfg.batch_size * world_size
    if global_batch > num_images:
        errors.append(f"batch_size={cfg.batch_size} x {world_size} process(es) = {global_batch} exceeds the "
                      f"dataset's {num_images} images: with drop_last no step would run")
    # what the selection method reads, checked by its registry entry (by name: see REGISTRY_KEYS)
    errors += importlib.import_module("utils.selection.registry").method_config_errors(cfg, num_images, class_counts)
    if image_size is not None:
        from backbones.common import final_map_size

        h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
        try:
            if h != w:
                raise ValueError(f"{cfg.network}: the backbones take square images")
            final_map_size(h, cfg.network)
        except ValueError as e:
            errors.append(f"the dataset's images are {h}x{w}; {e}")
    if errors:
        raise ConfigError("; ".join(errors))
