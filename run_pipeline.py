"""The paper's whole experiment in one command (README: "The two commands").

    python run_pipeline.py                       # synthetic data, CPU profile, output/demo
    python run_pipeline.py --profile gpu         # iresnet50 at 112x112 on one GPU
    python run_pipeline.py --rec /data/faces_webface_112x112 --dataset webface --profile gpu

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
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

import torch

from config.config import DATASET_PRESETS, ConfigError, infer_dataset, parse_config, parse_value
from utils.artifacts import paths
from utils.artifacts.files import is_complete, read_manifest
from utils.data.datasets import dataset_fingerprint
from utils.errors import UserError
from utils.artifacts.locking import LOCK_NAME, LockError, OutputLock
from utils.artifacts.records import clean_round_dir, round_model_dir, round_scores_path, round_train_keys
from utils.data.noise_file import load_noise
from utils.evaluation.report import METHOD_LABELS, mean_accuracy, write_results
from utils.selection.registry import METHODS, canonical_name, list_methods
from utils.runtime.cli import add_bool, flag, parse_bool
from utils.pipeline.runner import RUNNERS, choose_runner, preload, run_forked, run_subprocess
from utils.training.loop import check_bins

REPO = Path(__file__).resolve().parent
STAGE_SCRIPTS = ("make_synthetic_dataset.py", "train_everything.py", "eval_trainset.py", "clean_trainset.py",
                 "generate_label_dict.py", *sorted({m.script[0] for m in METHODS.values()}), "eval_ijbc.py",
                 "export_trainset.py")


class Key(NamedTuple):
    """One trained model of the experiment."""
    method: str  # "full" or a selection method
    fraction: float  # requested kept fraction (1.0 for full)
    seed: int = 0  # offset from the base seed
    trainee: str = ""  # "<network>_<loss>" when it differs from the original model's (tables 2 and 3)


class StopPipeline(Exception):
    """Raised at --stop_after: the steps so far are complete, a re-run continues from there."""


@dataclass
class Profile:
    """One scale of the experiment: synthetic data arguments and training config keys."""
    description: str
    data: list
    train: dict
    fractions: tuple = (0.75, 0.5, 0.25)
    methods: tuple = ("rand", "dynunc", "diffprob", "diffprob_clean")
    extra_seeds: int = 1  # retrain the full-data model with this many other seeds: the seed spread
    ijb: bool = True


PROFILES = {
    # CI's end-to-end test: seconds per stage.
    "tiny": Profile(
        "a few seconds per stage (tests)",
        data=["--num_ids", "24", "--image_size", "32", "--seed", "0", "--val_pairs", "200"],
        train=dict(network="smallnet", embedding_size=64, batch_size=64, num_epoch=3, lr_steps=[2], lr=0.4,
                   num_workers=0, record_topk=4, window=2, frequent=20, verify_every_epoch=False),
        fractions=(0.5,), extra_seeds=0, methods=("rand", "dynunc", "diffprob", "diffprob_clean", "entropy")),
    # The default first run, CPU: within 10 minutes where tools/bench_train.py's paper-style loop makes 460
    # images/s (docs/results.md); 3,000 verification pairs per set.
    "demo": Profile(
        "the default without a GPU: 100 identities, 12 epochs; about 10 minutes at 460 images/s in tools/bench_train.py",
        data=["--num_ids", "100", "--image_size", "32", "--seed", "0", "--val_pairs", "1500"],
        train=dict(network="smallnet", embedding_size=128, batch_size=128, num_epoch=12, lr_steps=[8, 11], lr=0.4,
                   num_workers=0, record_topk=10, window=4, frequent=20, verify_every_epoch=False)),
    # The earlier default, 1.5x the identities and 4x the verification pairs: about twice the demo's time.
    "cpu": Profile(
        "150 identities, 12 epochs, 6,000 verification pairs per set: about twice the demo's time",
        data=["--num_ids", "150", "--image_size", "32", "--seed", "0"],
        train=dict(network="smallnet", embedding_size=128, batch_size=128, num_epoch=12, lr_steps=[8, 11], lr=0.4,
                   num_workers=0, record_topk=10, window=4, frequent=20, verify_every_epoch=False)),
    # One GPU: the paper's backbone at 112x112 on a larger synthetic set (or the real data with --rec).
    "gpu": Profile(
        "one GPU: iresnet50 at 112x112",
        data=["--num_ids", "2000", "--image_size", "112", "--seed", "0", "--workers", "8"],
        train=dict(network="iresnet50", embedding_size=512, batch_size=256, num_epoch=20, lr_steps=[12, 16, 18],
                   lr=0.1, num_workers=8, record_topk=10, window=10, frequent=50,
                   verify_every_epoch=False)),
}


# With a real --rec the dataset preset decides the schedule and the verification targets (the paper's recipe);
# a profile fills only these: the model, the batch per process, the loader and the logging.
REAL_DATA_PROFILE_KEYS = ("network", "embedding_size", "batch_size", "num_workers", "record_topk", "frequent")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _flag(value):
    if isinstance(value, dict):  # head_args
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class Pipeline:
    out: Path
    profile: Profile
    rec: Path = None
    dataset: str = "synthetic"
    nproc: int = 1
    overrides: dict = field(default_factory=dict)
    log_file: Path = None
    stop_after: int = 0  # stop after this many steps (0: run all); an interruption on purpose
    seeds: int = 1  # train every configuration with this many seeds (1: the profile's extra full-data seeds only)
    trainees: tuple = ()  # other (network, loss) pairs retrained on the same kept lists
    export: str = "best"  # the kept set written as a dataset: best, none, or <method>_<fraction>
    clean_rounds: int = 1  # iterative cleaning: at most this many rounds (1: clean once, the paper's)
    runner: str = "subprocess"  # how a stage runs: subprocess or fork (utils/pipeline/runner.py)
    data_args: list = None  # the synthetic generator's arguments (default: the profile's)
    data_config: dict = None  # the SyntheticConfig they give: an existing data folder must match it
    steps_run: list = field(default_factory=list)
    steps_skipped: list = field(default_factory=list)

    def __post_init__(self):
        self.out = Path(self.out)
        self.synthetic = self.rec is None
        self.rec = Path(self.rec) if self.rec else self.out / "data"
        self.runs = self.out / "runs"
        self.log_file = self.out / "pipeline.log"

    # ------------------------------------------------------------------------------------ plumbing
    def keys(self, **extra) -> list:
        train = self.profile.train if self.dataset == "synthetic" else \
            {k: v for k, v in self.profile.train.items() if k in REAL_DATA_PROFILE_KEYS}
        values = {"rec": self.rec, "output": self.runs, "dataset": self.dataset, **train, **self.overrides, **extra}
        return [x for k, v in values.items() for x in (f"--{k}", _flag(v))]

    def cfg(self, **extra):
        return parse_config(self.keys(**extra))

    def planned_work(self) -> tuple:
        """(training, other steps) the run will do: training in full-data trainings (a kept set of 50%: 0.5),
        the other steps counted. What the ETA is measured against."""
        one_set = 1.0 + sum(self.profile.fractions) * len(self.profile.methods)  # full data + every kept list
        seeds = (self.seeds - 1) * one_set if self.seeds > 1 else float(self.profile.extra_seeds)
        training = one_set + len(self.trainees) * one_set + seeds + (self.clean_rounds - 1)
        seeded = sum(METHODS[m].seeded for m in self.profile.methods)
        other = (int(self.synthetic) + 3 + 2 * (self.clean_rounds - 1) + len(self.profile.fractions)
                 * (len(self.profile.methods) + max(0, self.seeds - 1) * seeded)
                 + int(self.profile.ijb) + int(self.export != "none"))
        return training, other

    def progress(self, work: float, seconds: float) -> str:
        """'   (m:ss elapsed; about m:ss left)': the training still to do at this run's seconds per unit of
        training, plus the other steps still to run at their mean time so far."""
        key = "train" if work > 0 else "other"
        self.spent[key][0] += work if work > 0 else 1
        self.spent[key][1] += seconds
        if self.spent["train"][0] <= 0:
            return ""
        (train_done, train_s), (other_done, other_s) = self.spent["train"], self.spent["other"]
        train_left = max(0.0, self.work_total[0] - self.skipped["train"] - train_done)
        other_left = max(0.0, self.work_total[1] - self.skipped["other"] - other_done)
        left = train_left * train_s / train_done + (other_left * other_s / other_done if other_done else 0.0)
        return f"   ({_clock(time.time() - self.t_start)} elapsed; about {_clock(left)} left)"

    def step(self, title: str, script: list, done, *args, work: float = 0.0):
        """Run one stage script unless `done()` says its outputs are complete; `work` is its share of training
        (1: a full-data training) for the ETA."""
        n = len(self.steps_run) + len(self.steps_skipped) + 1
        if self.stop_after and n > self.stop_after:
            raise StopPipeline(n - 1)
        if done():
            self.steps_skipped.append(title)
            self.skipped["train" if work > 0 else "other"] += work if work > 0 else 1
            print(f"[{n:2d}] {title}: complete, skipped", flush=True)
            return
        cmd = [sys.executable]
        if self.nproc > 1 and script[0] in ("train_everything.py", "eval_trainset.py"):
            cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}"]
        cmd += [str(REPO / script[0]), *script[1:], *map(str, args)]
        print(f"[{n:2d}] {title} ...", end="", flush=True)
        t0 = time.time()
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_file, "a") as logf:
            logf.write(f"\n===== {title}\n$ {' '.join(cmd)}\n")
        if self.runner == "fork":  # never with torchrun: choose_runner forks only a one-process run
            code = run_forked(cmd[1], cmd[2:], self.log_file, REPO, env)
        else:
            code = run_subprocess(cmd, self.log_file, REPO, env)
        if code != 0:
            print(" FAILED", flush=True)
            tail = self.log_file.read_text().splitlines()[-25:]
            raise SystemExit(f"run_pipeline: step '{title}' failed (exit {code}); last lines of "
                             f"{self.log_file}:\n" + "\n".join(tail))
        self.steps_run.append(title)
        print(f" {time.time() - t0:.0f} s{self.progress(work, time.time() - t0)}", flush=True)

    # --------------------------------------------------------------------------------------- steps
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = self.t_start = time.time()
        self.work_total, self.spent, self.skipped = self.planned_work(), {"train": [0.0, 0.0], "other": [0.0, 0.0]}, \
            {"train": 0.0, "other": 0.0}
        if self.runner == "fork":  # the stages' imports, once
            preload(REPO / s for s in STAGE_SCRIPTS)
        if self.synthetic:
            self.check_existing_data()
            self.step("make the synthetic dataset", ["make_synthetic_dataset.py"],
                      lambda: (self.rec / "train.idx").exists() and (self.rec / "dataset.json").exists(),
                      "--out", self.rec, *(self.data_args if self.data_args is not None else self.profile.data))
        elif not (self.rec / "train.rec").exists():
            raise SystemExit(f"run_pipeline: {self.rec}/train.rec not found (--rec must be a RecordIO dataset folder)")
        fp = self.fp = dataset_fingerprint(self.rec)
        base = self.cfg()
        require_bins(base)  # before hours of training, not after
        original = paths.original_dir(base, base.network, base.loss)
        self.step("train the original model (records per-epoch probabilities)", ["train_everything.py"],
                  lambda: (original / "train_summary.json").exists(),
                  *self.keys(is_original_train=True, resume=True), work=1.0)
        self.step("score the training set", ["eval_trainset.py"], lambda: is_complete(paths.scores_path(base), fp),
                  *self.keys())
        rounds = {"clean_round": 1} if self.clean_rounds > 1 else {}
        self.step("clean the training set", ["clean_trainset.py"],
                  lambda: is_complete((clean_round_dir(base, 1) if rounds else paths.clean_dir(base)) / "kept_index.npy",
                                      fp), *self.keys(**rounds))
        for r in range(2, self.clean_rounds + 1):
            if self.clean_round(base, r):
                break
        self.step("label dictionary", ["generate_label_dict.py"],
                  lambda: is_complete(paths.label_dict_path(base), fp), *self.keys())
        models = {Key("full", 1.0): original}
        for fraction in self.profile.fractions:
            for method in self.profile.methods:
                cfg = self.cfg(coreset_method=method, fraction=fraction)
                self.step(f"prune: {METHOD_LABELS[method]} {fraction:.0%}", list(METHODS[method].script),
                          lambda: is_complete(paths.kept_index_path(cfg, method), fp),
                          *self.keys(fraction=fraction))
        for fraction in self.profile.fractions:
            for method in self.profile.methods:
                models[Key(method, fraction)] = self.retrain(Key(method, fraction))
        for network, loss in self.trainees:  # the same kept lists, other networks and losses
            for fraction in self.profile.fractions:
                for method in ("full", *self.profile.methods):
                    key = Key(method, 1.0 if method == "full" else fraction, 0, f"{network}_{loss}")
                    models[key] = self.retrain(key)
        if self.seeds > 1:  # every configuration again with seeds +1 .. +N-1
            for seed in range(1, self.seeds):
                models[Key("full", 1.0, seed)] = self.retrain(Key("full", 1.0, seed))
                for fraction in self.profile.fractions:
                    for method in self.profile.methods:
                        models[Key(method, fraction, seed)] = self.retrain(Key(method, fraction, seed))
        else:
            for seed in range(1, self.profile.extra_seeds + 1):
                models[Key("full", 1.0, seed)] = self.retrain(Key("full", 1.0, seed))
        ijb = {}
        if self.profile.ijb and paths.ijb_root(base).is_dir():
            ijb = self.evaluate_ijb(models)
        results = self.collect(models, ijb, fp)
        if self.export != "none":
            results["export"] = self.export_kept_set(results)
        results["seeds"] = self.seeds
        results["pipeline_seconds"] = time.time() - t0
        write_results(self.out, results)
        print(f"pipeline finished in {time.time() - t0:.0f} s ({len(self.steps_run)} steps run, "
              f"{len(self.steps_skipped)} skipped); results in {self.out}")
        return results

    def check_existing_data(self):
        """A resumed run must not reuse synthetic data made with other generator options (--data, profile)."""
        desc = self.rec / "dataset.json"
        if self.data_config is None or not desc.exists():
            return
        made = json.loads(desc.read_text()).get("config", {})
        diff = {k: (made.get(k), v) for k, v in self.data_config.items() if made.get(k) != v}
        if diff:
            said = ", ".join(f"{k}={old!r} (asked: {new!r})" for k, (old, new) in sorted(diff.items()))
            raise SystemExit(f"run_pipeline: {self.rec} was made with other generator options: {said}; "
                             f"use another --out, or --fresh to start over")

    def clean_round(self, base, r: int) -> bool:
        """Cleaning round r: retrain on round r-1's kept list, score the full set with that model, clean
        again. True when the flagged set changed by less than `clean_tolerance` (the rounds stop)."""
        model, folder = round_model_dir(base, r - 1), clean_round_dir(base, r)
        self.step(f"clean round {r}: retrain on round {r - 1}'s kept list", ["train_everything.py"],
                  lambda: (model / "train_summary.json").exists(), *self.keys(**round_train_keys(base, r - 1), resume=True),
                  work=1.0)
        self.step(f"clean round {r}: score every sample with it", ["eval_trainset.py"],
                  lambda: is_complete(round_scores_path(base, r), self.fp), *self.keys(clean_round=r))
        self.step(f"clean round {r}: clean", ["clean_trainset.py"],
                  lambda: is_complete(folder / "kept_index.npy", self.fp), *self.keys(clean_round=r))
        summary = json.loads((folder / "summary.json").read_text())
        if summary.get("converged"):
            print(f"cleaning converged in round {r}: the flagged set changed by {summary['change']:.1%}")
        return bool(summary.get("converged"))

    def retrain(self, key: Key) -> Path:
        base = self.cfg()
        seed = int(base.seed) + key.seed
        extra = dict(is_original_train=False, coreset_method=key.method, fraction=key.fraction, resume=True, seed=seed)
        if key.trainee:  # another network / loss on the original model's kept list
            network, loss = key.trainee.rsplit("_", 1)
            extra.update(network=network, loss=loss, original_network=base.network, original_net_loss=base.loss)
        label = f"retrain: {METHOD_LABELS[key.method]} {key.fraction:.0%}"
        if key.seed:  # another seed trains (and, for a seeded method, selects) in a folder of its own
            extra["output"] = self.runs / f"seed{seed}"
            label += f" (seed {seed})"
            if key.method != "full":
                chosen = self.cfg(coreset_method=key.method, fraction=key.fraction)
                if METHODS[key.method].seeded:
                    mine = self.cfg(coreset_method=key.method, fraction=key.fraction, output=extra["output"], seed=seed)
                    self.step(f"prune: {METHOD_LABELS[key.method]} {key.fraction:.0%} (seed {seed})",
                              list(METHODS[key.method].script),
                              lambda: is_complete(paths.kept_index_path(mine, key.method), self.fp),
                              *self.keys(fraction=key.fraction, output=extra["output"], seed=seed))
                else:
                    extra.update(kept_index=paths.kept_index_path(chosen, key.method),
                                 label_map=paths.label_map_path(chosen, key.method))
        if key.trainee:
            label += f" [{key.trainee}]"
        out = paths.train_dir(self.cfg(**extra))
        self.step(label, ["train_everything.py"], lambda: (out / "train_summary.json").exists(), *self.keys(**extra),
                  work=key.fraction)
        return out

    def export_kept_set(self, results: dict) -> dict:
        """Write one kept set as a dataset of its own (export_trainset.py) and report the size saving.

        `best`: of the pruned models of the original network, the kept set with the highest mean verification
        accuracy, averaged over the seeds when there are several (the smaller kept fraction on a tie); or the
        one `--export <method>_<fraction>` names."""
        runs = [r for r in results["runs"] if r["method"] != "full" and r["trainee"] == results["runs"][0]["trainee"]]
        named = {}
        for r in runs:  # every seed of one kept set
            named.setdefault(f"{r['method']}_{r['requested_fraction']:.2f}", []).append(r)
        accuracy = {tag: sum(map(mean_accuracy, rs)) / len(rs) for tag, rs in named.items()}
        if self.export == "best":
            tag = max(named, key=lambda t: (accuracy[t], -named[t][0]["kept_fraction"]))
        elif self.export not in named:
            raise SystemExit(f"run_pipeline: --export {self.export}: not a kept set of this run; "
                             f"one of {', '.join(named)} (or best, none)")
        else:
            tag = self.export
        run = next(r for r in named[tag] if not r["seed_offset"])
        cfg = self.cfg(coreset_method=run["method"], fraction=run["requested_fraction"])
        tag = paths.coreset_tag(cfg, run["method"])
        dst = self.out / "export" / tag
        self.step(f"export {METHOD_LABELS[run['method']]} {run['requested_fraction']:.0%} as a dataset",
                  ["export_trainset.py"], lambda: (dst / "export.json").exists(), "--rec", self.rec,
                  "--kept_index", paths.kept_index_path(cfg, run["method"]),
                  "--label_map", paths.label_map_path(cfg, run["method"]), "--out", dst)
        manifest = json.loads((dst / "export.json").read_text())
        before, after = manifest["bytes"]["before"], manifest["bytes"]["after"]
        return {"kept_set": tag, "folder": str(dst), "images": manifest["counts"]["images_after"],
                "identities": manifest["counts"]["identities_after"], "bytes_before": before, "bytes_after": after,
                "saving_percent": 100.0 * (1 - after / before), "mean_accuracy": accuracy[tag],
                "seeds": len(named[tag])}

    def evaluate_ijb(self, models: dict) -> dict:
        out = self.out / "ijb"
        # the folders' epoch checkpoints describe their network (a plain backbone.pth would not)
        spec = ",".join(f"{_model_name(k)}={v}" for k, v in models.items())
        done = out / "ijb_results.json"

        def complete():
            if not done.exists():
                return False
            have = json.loads(done.read_text()).get("models", {})
            return all(_model_name(k) in have for k in models)

        target = self.cfg().ijb_target.upper().replace("IJB", "IJB-")
        self.step(f"evaluate {len(models)} models on {target} (1:1 and 1:N)", ["eval_ijbc.py"], complete,
                  *self.keys(), "--models", spec, "--out", out)
        return json.loads(done.read_text())["models"]

    def collect(self, models: dict, ijb: dict, fp) -> dict:
        runs = []
        base = self.cfg()
        for key, model_dir in models.items():
            summary = json.loads((model_dir / "train_summary.json").read_text())
            runs.append({
                "method": key.method, "kept_fraction": summary["num_images"] / fp.num_images,
                "requested_fraction": key.fraction, "seed_offset": key.seed, "seed": int(base.seed) + key.seed,
                "scorer": paths.scorer_tag(base), "trainee": key.trainee or f"{base.network}_{base.loss}",
                "num_images": summary["num_images"], "num_classes": summary["num_classes"],
                "verification": summary["verification"], "verification_pairs": summary.get("verification_pairs", {}),
                "ijb": {k: v for k, v in ijb.get(_model_name(key), {}).get("1:1", {}).items()},
                "ijb_1n": ijb.get(_model_name(key), {}).get("1:N", {}),
                "train_seconds": summary["train_seconds"],
                "model_dir": str(model_dir)})
        dataset = {"name": "synthetic faces" if self.synthetic else self.rec.name, "rec": str(self.rec),
                   "synthetic": self.synthetic, "num_images": fp.num_images,
                   "num_classes": fp.num_classes, "profile": self.profile.description}
        if self.synthetic and (self.rec / "dataset.json").exists():
            dataset["generator"] = json.loads((self.rec / "dataset.json").read_text()).get("config")
        scores = paths.scores_path(base)
        if scores.exists():  # measured by eval_trainset.py with the original model
            dataset["redundancy"] = read_manifest(scores).get("info", {}).get("redundancy")
        results = {"dataset": dataset, "runs": runs}
        clean_summary = paths.clean_dir(self.cfg()) / "summary.json"
        if load_noise(self.rec) is not None and clean_summary.exists():
            q = json.loads(clean_summary.read_text()).get("quality", {})
            results["cleaning"] = {k: q.get(k) for k in ("removed", "precision", "recall", "noisy",
                                                         "recall_flipped", "recall_open_set")}
            rounds = sorted(paths.clean_dir(base).glob("round_*/summary.json"), key=lambda f: int(f.parent.name[6:]))
            if rounds:  # --clean_rounds: each round's counts and quality
                results["cleaning_rounds"] = [
                    {"round": s.get("round"), "change": s.get("change"), **{k: s.get("quality", {}).get(k) for k in
                                                                            ("removed", "precision", "recall")}}
                    for s in (json.loads(f.read_text()) for f in rounds)]
        seeds = [r for r in runs if r["method"] == "full"]
        if len(seeds) > 1:
            means = [mean_accuracy(r) for r in seeds]
            results["seed_spread"] = {"full_mean_accuracy": means, "spread": max(means) - min(means)}
        return results


def _model_name(key: Key) -> str:
    return (f"{key.method}_{key.fraction:.2f}" + (f"_seed{key.seed}" if key.seed else "")
            + (f"_{key.trainee}" if key.trainee else ""))


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


def require_bins(cfg):
    """The verification sets of a real dataset's preset, all there; else exit with the one-line reason."""
    try:
        check_bins(cfg)
    except UserError as e:
        raise SystemExit(f"run_pipeline: error: {e}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description="Run the DiffProb paper's experiment end to end: data, original model, "
                                "scoring, cleaning, pruning (Rand, DynUnc, DiffProb, cleaning + DiffProb), "
                                "retraining, evaluation and the results table and plot.")
    p.add_argument("--out", default="output/demo", help="output folder (default: output/demo)")
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
                   f"(the paper's names {', '.join(n for n in list_methods(aliases=True) if n not in METHODS)} too)")
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
    p.add_argument(*flag("clean-rounds"), type=int, default=1, metavar="N",
                   help="iterative cleaning: clean, retrain on the cleaned set, score every sample with that model, "
                        "clean again; at most N rounds, fewer when the flagged set changes by less than "
                        "--set clean_tolerance=T (default 1: clean once)")
    p.add_argument("--data", nargs="*", metavar="KEY=VALUE",
                   help="synthetic generator options over the profile's (make_synthetic_dataset.py --help lists "
                        "them), e.g. --data redundancy=0.5 redundant_id_share=1 for a highly redundant set")
    p.add_argument(*flag("show_config"), type=parse_bool, nargs="?", const=True, default=False, metavar="BOOL",
                   help="print the original model's resolved training config (schedule, targets, batch, lr) and "
                        "check that the verification sets are there, then exit without running anything")
    p.add_argument("--runner", default="auto", choices=RUNNERS,
                   help="how each stage runs: fork (CPU, one process: a forked copy of the pipeline with the imports "
                        "done once), subprocess (a new interpreter: GPUs and torchrun), auto (fork where it can)")
    add_bool(p, "fresh", "delete --out first instead of resuming")
    p.add_argument(*flag("stop-after"), type=int, default=0, metavar="N",
                   help="stop after the first N steps (a re-run resumes from step N+1)")
    args = p.parse_args(argv)
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
        bad = [m for m in ms if m not in METHODS]
        if bad:
            p.error(f"--methods: unknown {bad}; valid: {', '.join(list_methods(aliases=True))}")
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
    data_args, data_config = synthetic_args(profile, args.data) if args.rec is None else (None, None)
    trainees = _trainees(p, args, {**profile.train, **overrides})
    nproc = args.nproc or max(1, gpus)
    try:
        runner = choose_runner(args.runner, gpus, nproc)
    except ValueError as e:
        p.error(str(e))
    pipe = Pipeline(Path(args.out), profile, rec=args.rec, dataset=dataset, nproc=nproc,
                    overrides=overrides, stop_after=args.stop_after, seeds=args.seeds, trainees=trainees,
                    clean_rounds=args.clean_rounds, data_args=data_args, data_config=data_config, runner=runner)
    if args.show_config:
        return show_config(pipe)
    try:
        with OutputLock(args.out, what="run_pipeline.py"):  # one pipeline per output folder
            if args.fresh:  # what an earlier run left, but not the lock just taken
                for entry in Path(args.out).iterdir():
                    if entry.name != LOCK_NAME:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            return pipe.run()
    except LockError as e:
        raise SystemExit(f"run_pipeline: error: {e}") from None
    except StopPipeline as e:
        print(f"stopped after step {e.args[0]} (--stop_after); run again without it to continue")
        return None


if __name__ == "__main__":
    main()
