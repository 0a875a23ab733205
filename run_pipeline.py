"""The paper's whole experiment in one command (README: "The two commands").

    python run_pipeline.py                       # synthetic data, CPU profile, output/demo
    python run_pipeline.py --profile gpu         # iresnet50 at 112x112 on one GPU
    python run_pipeline.py --rec /data/faces_webface_112x112 --dataset webface --profile gpu
    python run_pipeline.py --experiment noisy --seeds 3   # noisy data: clean it or train through it?

Every step runs a stage script with explicit config keys (forked on CPU, a subprocess on GPUs), so the files and logs are
exactly those of a manual run: make the data (synthetic), train the original model, score the training
set, clean it, build the label dictionary, prune with every method at every fraction, retrain on each kept
list (and the full data with another seed, for the seed spread), evaluate on IJB-C, and write
results.json / .csv / .md / .png. A step whose outputs are complete and valid is skipped, so an
interrupted run resumes where it stopped (training itself resumes from its last epoch).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import time  # noqa: F401  (a test patches run_pipeline.time.time)
from pathlib import Path

import torch

from config.config import DATASET_PRESETS, ConfigError, infer_dataset, parse_config, parse_value
from utils.artifacts.locking import LOCK_NAME, LockError, OutputLock
from utils.pipeline.noisy import NOISY_DATA, ROUNDS_DEFAULT, NoisyExperiment
from utils.pipeline.profiles import PROFILES, Profile
from utils.pipeline.runner import RUNNERS, choose_jobs, choose_runner
from utils.pipeline.steps import METHOD_LABELS, Key, Pipeline, StopPipeline, flag_value, require_bins  # noqa: F401
from utils.runtime.cli import add_bool, flag, parse_bool
from utils.selection.registry import METHODS, canonical_name, list_methods, method_config_errors
from utils.training.dynamic import DYNAMIC_METHODS, ratio_for_cost


def parse_set(items) -> dict:
    """`--set key=value` overrides of config keys, checked against config/config.py."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"run_pipeline: --set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            parse_value(k, v)
        except KeyError:
            raise SystemExit(f"run_pipeline: --set {k}: not a key of config/config.py") from None
        except ConfigError as e:
            raise SystemExit(f"run_pipeline: {e}") from None
        out[k] = v
    return out


def synthetic_args(profile: Profile, items) -> tuple:
    """The generator's arguments: the profile's, then `--data key=value` overrides (e.g. redundancy=0.5
    redundant_id_share=1), checked by make_synthetic_dataset.py's own parser and SyntheticConfig.validate.
    Returns (argument list, the SyntheticConfig they give, as a dict)."""
    from make_synthetic_dataset import build_arg_parser
    from utils.synthetic.generator import SyntheticConfig

    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    extra = []
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"run_pipeline: --data expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in fields:
            raise SystemExit(f"run_pipeline: --data {k}: not an option of the synthetic generator; valid: "
                             f"{', '.join(sorted(fields))}")
        extra += ["--" + k.replace("_", "-"), v]
    parser = build_arg_parser()
    parser.exit_on_error = False
    try:
        args = parser.parse_args(["--out", "-", *profile.data, *extra])
        cfg = SyntheticConfig(**{f: getattr(args, f) for f in fields}).validate()
    except (argparse.ArgumentError, ValueError) as e:
        raise SystemExit(f"run_pipeline: --data: {e}") from None
    return [*profile.data, *extra], dataclasses.asdict(cfg)


def _trainees(p, args, train: dict) -> tuple:
    """(network, loss) pairs to retrain besides the original model's: every pair of the named networks and
    losses (each list defaults to the original's), the original pair itself left out."""
    from backbones import list_models

    base_net, base_loss = train.get("network", "iresnet50"), parse_config(["--loss", train.get("loss", "CosFace")]).loss
    nets = args.retrain_networks.split(",") if args.retrain_networks else [base_net]
    losses = [parse_config(["--loss", x]).loss for x in args.retrain_losses.split(",")] if args.retrain_losses \
        else [base_loss]
    bad = [n for n in nets if n not in list_models()]
    if bad:
        p.error(f"--retrain_networks: unknown {bad}; valid: {', '.join(list_models())}")
    if args.retrain_networks is None and args.retrain_losses is None:
        return ()
    return tuple((n, x) for n in nets for x in losses if (n, x) != (base_net, base_loss))


def show_config(pipe: Pipeline) -> dict:
    """--show_config: what the original model's training will use, in one screen; exit 2 if a .bin is missing."""
    cfg = pipe.cfg(is_original_train=True)
    world = max(1, pipe.nproc)
    keys = ("dataset", "rec", "network", "loss", "s", "m", "embedding_size", "num_epoch", "lr_steps", "lr_decay",
            "warmup_epoch", "batch_size", "momentum", "weight_decay", "grad_clip", "val_targets", "ijb_root",
            "ijb_target", "num_workers", "dtype")
    shown = {k: getattr(cfg, k) for k in keys}
    for k, v in shown.items():
        print(f"{k:<16} {v}")
    global_batch = cfg.batch_size * world
    print(f"{'processes':<16} {world} (global batch {global_batch}, lr {cfg.lr} x {global_batch}/512 = "
          f"{cfg.lr * global_batch / 512:g})")
    require_bins(cfg)
    return shown


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the DiffProb paper's experiment end to end: data, original model, "
                                "scoring, cleaning, pruning (Rand, DynUnc, DiffProb, cleaning + DiffProb), "
                                "retraining, evaluation and the results table and plot.")
    p.add_argument("--experiment", default="paper", choices=["paper", "noisy"],
                   help="paper: the DiffProb paper's pruning experiment; noisy: clean or train through the noise? "
                        "(CosFace, ArcFace, RobustFace, Sub-center ArcFace and inter-class filtering on a set with 15%% "
                        "flips + 5%% intruders, cleaning then CosFace, iterative cleaning, the noise-free ceiling; "
                        "utils/pipeline/noisy.py)")
    p.add_argument("--out", default=None, help="output folder (default: output/demo, output/noisy)")
    p.add_argument("--rec", default=None, help="a real RecordIO dataset folder (default: make a synthetic one)")
    p.add_argument("--profile", default=None, choices=sorted(PROFILES),
                   help="scale: " + "; ".join(f"{k}: {v.description}" for k, v in PROFILES.items())
                   + " (default: gpu when a GPU is visible, else demo)")
    p.add_argument("--dataset", default=None, choices=list(DATASET_PRESETS),
                   help="the preset of a real --rec: its epochs, lr steps and verification sets (default: told "
                        "from the class count in its property file, with a printed line)")
    p.add_argument("--ijb_root", default=None, metavar="DIR",
                   help="IJB release folder (loose_crop/, meta/) to evaluate every model on (default: <rec>/ijb "
                        "when it exists)")
    p.add_argument("--ijb_target", default=None, choices=["ijbc", "ijbb"], help="which IJB set (default: ijbc)")
    p.add_argument("--fractions", default=None, help="kept fractions, comma-separated (default: the profile's)")
    p.add_argument("--methods", default=None, help=f"pruning methods, comma-separated, from {', '.join(list_methods())} "
                   f"(the paper's names {', '.join(n for n in list_methods(aliases=True) if n not in METHODS)} too), "
                   f"and the dynamic ones ({', '.join(DYNAMIC_METHODS)}: the full data pruned as it trains, at the "
                   f"ratio whose cost is the fraction)")
    p.add_argument("--nproc", type=int, default=None, help="processes per node for torchrun (default: visible GPUs)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config keys for every stage, e.g. --set seed=1")
    p.add_argument("--export", default="best", metavar="KEPT_SET",
                   help="write a kept set as a dataset folder (<out>/export/<set>) and report the size saving: "
                        "best (the pruned model with the highest mean accuracy), <method>_<fraction>, or none")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="train every configuration (full data, every method x fraction) with N seeds: the training "
                        "seed and, for a seeded selection (Rand), the selection seed; the tables give mean +- std")
    p.add_argument(*flag("retrain-networks"), default=None, metavar="NET,...",
                   help="also retrain the same kept lists with these networks (the paper's table 3)")
    p.add_argument(*flag("retrain-losses"), default=None, metavar="LOSS,...",
                   help="also retrain the same kept lists with these losses (the paper's table 2)")
    p.add_argument(*flag("clean-rounds"), type=int, default=None, metavar="N",
                   help="iterative cleaning: clean, retrain on the cleaned set, score every sample with that model, "
                        "clean again; at most N rounds, fewer when the flagged set changes by less than "
                        "--set clean_tolerance=T (default 1: clean once; 3 in --experiment noisy)")
    p.add_argument("--data", nargs="*", metavar="KEY=VALUE",
                   help="synthetic generator options over the profile's (make_synthetic_dataset.py --help lists "
                        "them), e.g. --data redundancy=0.5 redundant_id_share=1 for a highly redundant set")
    p.add_argument(*flag("show_config"), type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="print the original model's resolved training config (schedule, targets, batch, lr) and "
                        "check that the verification sets are there, then exit without running anything")
    p.add_argument("--runner", default="auto", choices=RUNNERS,
                   help="how each stage runs: fork (CPU, one process: a forked copy of the pipeline with the imports "
                        "done once), subprocess (a new interpreter: GPUs and torchrun), auto (fork where it can)")
    p.add_argument("--jobs", default="auto", metavar="N",
                   help="CPU: how many trainings run at once where they do not depend on each other (the retrainings; "
                        "the original model beside the full data's other seeds), each on --set threads=T threads "
                        "(default: the profile's, else the cores shared out); auto: one per core, at most 8 (1 on GPUs)")
    p.add_argument(*flag("score_epochs"), type=int, default=0, metavar="K",
                   help="early scoring: also select with every static method that reads the original model's scores or "
                        "records from its first K epochs (records of epochs 1..K, checkpoint K), and retrain on those "
                        "lists; their cost with scoring counts K epochs of the original run (default 0: none)")
    add_bool(p, "fresh", "delete --out first instead of resuming")
    p.add_argument(*flag("stop-after"), type=int, default=0, metavar="N",
                   help="stop after the first N steps (a re-run resumes from step N+1)")
    args = p.parse_args(argv)
    noisy = args.experiment == "noisy"
    args.out = args.out or ("output/noisy" if noisy else "output/demo")
    args.clean_rounds = args.clean_rounds if args.clean_rounds is not None else (ROUNDS_DEFAULT if noisy else 1)
    if noisy:
        given = [f"--{k}" for k in ("fractions", "methods", "retrain_networks", "retrain_losses", "score_epochs")
                 if getattr(args, k)]
        if given:
            p.error(f"--experiment noisy trains its own roads: {', '.join(given)} do not apply")
    gpus = torch.cuda.device_count()
    profile = PROFILES[args.profile or ("gpu" if gpus else "demo")]
    if args.fractions:
        try:
            fr = tuple(float(x) for x in args.fractions.split(","))
        except ValueError:
            p.error(f"--fractions: expected numbers, got {args.fractions!r}")
        if not all(0 < f <= 1 for f in fr):
            p.error("--fractions must be in (0, 1]")
        profile = Profile(**{**profile.__dict__, "fractions": fr})
    if args.methods:
        ms = tuple(canonical_name(m) for m in args.methods.split(","))
        bad = [m for m in ms if m not in METHODS and m not in DYNAMIC_METHODS]
        if bad:
            p.error(f"--methods: unknown {bad}; valid: {', '.join(list_methods(aliases=True))}, and the dynamic "
                    f"{', '.join(DYNAMIC_METHODS)}")
        profile = Profile(**{**profile.__dict__, "methods": ms})
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.clean_rounds < 1:
        p.error("--clean_rounds must be >= 1")
    if args.data and args.rec is not None:
        p.error("--data sets the synthetic generator's options; it does not apply to --rec")
    if args.rec is None:
        if args.dataset:
            p.error("--dataset names the preset of a real --rec; the synthetic data has its own")
        dataset = "synthetic"
    else:
        if not (Path(args.rec) / "train.rec").exists():
            p.error(f"--rec {args.rec}: no train.rec there (a RecordIO dataset folder: train.rec, train.idx, property)")
        dataset = args.dataset
        if dataset is None:
            try:
                dataset, how = infer_dataset(args.rec)
            except ConfigError as e:
                p.error(str(e).replace("dataset=auto", "--dataset not given:"))
            print(f"dataset: {dataset} ({how}); --dataset chooses another preset", flush=True)
    overrides = parse_set(args.set)
    for key in ("ijb_root", "ijb_target"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.ijb_root is not None and not (Path(args.ijb_root) / "meta").is_dir():
        p.error(f"--ijb_root {args.ijb_root}: not an IJB release folder (expected loose_crop/ and meta/ in it)")
    data_items = [*NOISY_DATA, *(args.data or [])] if noisy else args.data
    data_args, data_config = synthetic_args(profile, data_items) if args.rec is None else (None, None)
    trainees = _trainees(p, args, {**profile.train, **overrides})

    nproc = args.nproc or max(1, gpus)
    try:
        runner = choose_runner(args.runner, gpus, nproc)
        jobs = choose_jobs(args.jobs, gpus, nproc)
    except ValueError as e:
        p.error(str(e))
    pipe = Pipeline(Path(args.out), profile, rec=args.rec, dataset=dataset, nproc=nproc,
                    overrides=overrides, stop_after=args.stop_after, seeds=args.seeds, trainees=trainees,
                    clean_rounds=args.clean_rounds, data_args=data_args, data_config=data_config, runner=runner,
                    jobs=jobs, score_epochs=args.score_epochs, export=args.export)
    if any(m in DYNAMIC_METHODS for m in profile.methods):  # every fraction must be a cost the schedule can reach
        for fraction in profile.fractions:
            try:
                ratio_for_cost(pipe.cfg(), fraction)
            except ValueError as e:
                p.error(f"--fractions {fraction:g} for the dynamic methods: {e}")
    named = [f"{m}_{f:.2f}" for f in profile.fractions for m in pipe.static_methods]
    if args.export not in ("best", "none", *named):  # before the training, not after it
        p.error(f"--export {args.export}: not a kept set of this run; one of {', '.join(named)} (or best, none)")
    if args.score_epochs:  # one line and exit 2 when K is not an epoch of the run
        early = parse_config(pipe.keys(score_epochs=args.score_epochs))
        for method in pipe.early_methods:
            for error in method_config_errors(dataclasses.replace(early, coreset_method=method)):
                p.error(f"--score_epochs {args.score_epochs}: {error}")
    if args.show_config:
        return show_config(pipe)
    try:
        with OutputLock(args.out, what="run_pipeline.py"):  # one pipeline per output folder
            if args.fresh:  # what an earlier run left, but not the lock just taken
                for entry in Path(args.out).iterdir():
                    if entry.name != LOCK_NAME:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            return NoisyExperiment(pipe).run() if noisy else pipe.run()
    except LockError as e:
        raise SystemExit(f"run_pipeline: error: {e}") from None
    except StopPipeline as e:
        print(f"stopped after step {e.args[0]} (--stop_after); run again without it to continue")
        return None


if __name__ == "__main__":
    main()
