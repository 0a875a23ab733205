"""The pipeline's steps: which stage script runs with which config keys and in which order, what makes a step
complete (an interrupted run resumes where it stopped), the progress line with its ETA, and the results files.

run_pipeline.py is its command line; a step runs a stage script as a user would (utils/pipeline/runner.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from config.config import parse_config
from utils.artifacts import paths
from utils.artifacts.files import check_bins, is_complete, read_manifest
from utils.artifacts.records import clean_round_dir, round_model_dir, round_scores_path, round_train_keys
from utils.data.datasets import dataset_fingerprint
from utils.data.noise_file import load_noise
from utils.errors import UserError
from utils.evaluation.report import mean_accuracy, write_results
from utils.pipeline.profiles import REAL_DATA_PROFILE_KEYS, Profile
from utils.pipeline.runner import Started, preload, start_forked, start_subprocess, usable_cores
from utils.selection.registry import METHODS, method_labels
from utils.training.dynamic import DYNAMIC_METHODS, dynamic_labels, ratio_for_cost

REPO = Path(__file__).resolve().parents[2]
STAGE_SCRIPTS = ("make_synthetic_dataset.py", "train_everything.py", "eval_trainset.py", "clean_trainset.py",
                 "generate_label_dict.py", *sorted({m.script[0] for m in METHODS.values()}), "eval_ijbc.py",
                 "export_trainset.py")
# the selection methods (static: a kept list), then the dynamic ones (pruned as the model trains)
METHOD_LABELS = {**method_labels(), **dynamic_labels()}


class Key(NamedTuple):
    """One trained model of the experiment."""
    method: str  # "full" or a selection method
    fraction: float  # requested kept fraction (1.0 for full)
    seed: int = 0  # offset from the base seed
    trainee: str = ""  # "<network>_<loss>" when it differs from the original model's (tables 2 and 3)
    score_epochs: int = 0  # early scoring: selected from the original run's first K epochs (0: every epoch)


class StopPipeline(Exception):
    """Raised at --stop_after: the steps so far are complete, a re-run continues from there."""


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def flag_value(value):
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
    jobs: int = 1  # trainings run at once where they do not depend on each other (CPU; 1: one after another)
    score_epochs: int = 0  # also select with every scored static method from the original run's first K epochs
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
        self.queued, self.batching = [], False
        # static methods select a kept list in a pruning step; dynamic ones prune inside their training
        self.static_methods = tuple(m for m in self.profile.methods if m not in DYNAMIC_METHODS)
        # early scoring: the static methods that read the original model's scores or records, again from K epochs
        self.early_methods = tuple(m for m in self.static_methods if METHODS[m].needs) if self.score_epochs else ()

    # ------------------------------------------------------------------------------------ plumbing
    @staticmethod
    def model_key(method: str, fraction: float, seed: int = 0) -> Key:
        """The key of one trained model (what `evaluate_ijb` names it by)."""
        return Key(method, fraction, seed)

    @staticmethod
    def ijb_name(key: Key) -> str:
        """The name `evaluate_ijb` gives the model of `key` in its results."""
        return model_name(key)

    def keys(self, **extra) -> list:
        train = self.profile.train if self.dataset == "synthetic" else \
            {k: v for k, v in self.profile.train.items() if k in REAL_DATA_PROFILE_KEYS}
        values = {"rec": self.rec, "output": self.runs, "dataset": self.dataset, **train, **self.overrides, **extra}
        return [x for k, v in values.items() for x in (f"--{k}", flag_value(v))]

    def cfg(self, **extra):
        return parse_config(self.keys(**extra))

    def planned_work(self) -> tuple:
        """(training, other steps) the run will do: training in full-data trainings (a kept set of 50%: 0.5),
        the other steps counted. What the ETA is measured against."""
        one_set = 1.0 + sum(self.profile.fractions) * (len(self.profile.methods) + len(self.early_methods))
        seeds = (self.seeds - 1) * one_set if self.seeds > 1 else float(self.profile.extra_seeds)
        training = one_set + len(self.trainees) * one_set + seeds + (self.clean_rounds - 1)
        seeded = sum(METHODS[m].seeded for m in self.static_methods)
        other = (int(self.synthetic) + 3 + 2 * (self.clean_rounds - 1) + len(self.profile.fractions)
                 * (len(self.static_methods) + len(self.early_methods) + max(0, self.seeds - 1) * seeded)
                 + 2 * bool(self.early_methods)
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
        (1: a full-data training) for the ETA. Inside `concurrently()` a training is queued instead."""
        n = len(self.steps_run) + len(self.steps_skipped) + len(self.queued) + 1
        if self.stop_after and n > self.stop_after:
            self.run_queued()
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
        if self.batching and script[0] == "train_everything.py":
            cmd += ["--threads", self.job_threads()]
            self.queued.append((n, title, cmd, work))
            return
        print(f"[{n:2d}] {title} ...", end="", flush=True)
        t0 = time.time()
        with open(self.log_file, "a") as logf:
            logf.write(f"\n===== {title}\n$ {' '.join(cmd)}\n")
        code = self.start(cmd, self.log_file).wait()
        if code != 0:
            print(" FAILED", flush=True)
            self.fail(title, code, self.log_file)
        self.steps_run.append(title)
        print(f" {time.time() - t0:.0f} s{self.progress(work, time.time() - t0)}", flush=True)

    def start(self, cmd: list, log_path: Path) -> Started:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        if self.runner == "fork":  # never with torchrun: choose_runner forks only a one-process run
            return start_forked(cmd[1], cmd[2:], log_path, REPO, env)
        return start_subprocess(cmd, log_path, REPO, env)

    def fail(self, title: str, code: int, log_path: Path):
        tail = log_path.read_text().splitlines()[-25:]
        if log_path != self.log_file:  # a concurrent step's own log: already added to pipeline.log
            log_path.unlink()
        raise SystemExit(f"run_pipeline: step '{title}' failed (exit {code}); last lines of "
                         f"{self.log_file}:\n" + "\n".join(tail))

    def job_threads(self) -> str:
        """--threads of a training that runs beside others: the profile's or --set's, else the cores shared out
        (oversubscribed cores made CPU training several times slower)."""
        given = {**self.profile.train, **self.overrides}.get("threads")
        return str(given) if given is not None else str(max(1, usable_cores() // self.jobs))

    @contextmanager
    def concurrently(self):
        """The trainings stepped inside run `self.jobs` at a time when the block ends (they must not depend on
        each other); the other steps run at once, in order. One job: each training runs when stepped."""
        self.batching = self.jobs > 1
        try:
            yield
        except BaseException:
            self.queued.clear()
            raise
        finally:
            self.batching = False
        self.run_queued()

    def run_queued(self):
        """Run the queued trainings, `self.jobs` at a time, the longest first (the last to end is then a short
        one). Each writes a log of its own, added to pipeline.log whole when it ends. After a failure the
        running ones finish and no other starts; then the pipeline stops with the failed step's lines."""
        queued, self.queued = sorted(self.queued, key=lambda q: -q[3]), []
        if not queued:
            return
        if len(queued) > 1:
            print(f"running {len(queued)} trainings, {min(self.jobs, len(queued))} at a time (--jobs {self.jobs}; "
                  f"{self.job_threads()} thread(s) each)", flush=True)
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        running, failed, last = {}, None, time.time()
        try:
            while queued or running:
                while queued and not failed and len(running) < self.jobs:
                    n, title, cmd, work = job = queued.pop(0)
                    log_path = logs / f"step_{n:02d}.log"
                    log_path.write_text(f"\n===== {title}\n$ {' '.join(cmd)}\n")
                    running[n] = (job, self.start(cmd, log_path), log_path, time.time())
                if failed:
                    queued.clear()
                time.sleep(0.05)
                for n, (job, started, log_path, t0) in list(running.items()):
                    code = started.poll()
                    if code is None:
                        continue
                    del running[n]
                    title, work = job[1], job[3]
                    with open(self.log_file, "a") as logf:
                        logf.write(log_path.read_text())
                    if code != 0:
                        print(f"[{n:2d}] {title} ... FAILED", flush=True)
                        failed = failed or (title, code, log_path)
                        continue
                    log_path.unlink()
                    self.steps_run.append(title)
                    now = time.time()  # the ETA counts wall time: the jobs' seconds overlap
                    print(f"[{n:2d}] {title} ... {now - t0:.0f} s{self.progress(work, now - last)}", flush=True)
                    last = now
        except KeyboardInterrupt:  # Ctrl-C reaches the children too: let them stop cleanly, then stop
            for _, started, _, _ in running.values():
                started.wait()
            raise
        try:
            if failed:
                self.fail(*failed)
        finally:
            if not any(logs.iterdir()):
                logs.rmdir()

    # --------------------------------------------------------------------------------------- steps
    def begin(self, planned: tuple) -> float:
        """What every experiment does first: the output folder, the clocks and the ETA's `planned` work, the stages'
        imports (fork runner), the synthetic data (or a check of --rec), the dataset's fingerprint (`self.fp`) and
        the verification sets (before hours of training, not after). Returns the start time."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.time()
        self.work_total, self.spent = planned, {"train": [0.0, 0.0], "other": [0.0, 0.0]}
        self.skipped = {"train": 0.0, "other": 0.0}
        if self.runner == "fork":  # the stages' imports, once
            preload(REPO / s for s in STAGE_SCRIPTS)
        if self.synthetic:
            self.check_existing_data()
            self.step("make the synthetic dataset", ["make_synthetic_dataset.py"],
                      lambda: (self.rec / "train.idx").exists() and (self.rec / "dataset.json").exists(),
                      "--out", self.rec, *(self.data_args if self.data_args is not None else self.profile.data))
        elif not (self.rec / "train.rec").exists():
            raise SystemExit(f"run_pipeline: {self.rec}/train.rec not found (--rec must be a RecordIO dataset folder)")
        self.fp = dataset_fingerprint(self.rec)
        require_bins(self.cfg())
        return self.t_start

    def run(self) -> dict:
        t0 = self.begin(self.planned_work())
        fp, base = self.fp, self.cfg()
        original = paths.original_dir(base, base.network, base.loss)
        full_seeds = range(1, self.seeds) if self.seeds > 1 else range(1, self.profile.extra_seeds + 1)
        with self.concurrently():  # the full-data models of the other seeds need nothing of the original's
            self.step("train the original model (records per-epoch probabilities)", ["train_everything.py"],
                      lambda: (original / "train_summary.json").exists(),
                      *self.keys(is_original_train=True, resume=True), work=1.0)
            full = {seed: self.retrain(Key("full", 1.0, seed)) for seed in full_seeds}
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
            for method in self.static_methods:
                cfg = self.cfg(coreset_method=method, fraction=fraction)
                self.step(f"prune: {METHOD_LABELS[method]} {fraction:.0%}", list(METHODS[method].script),
                          lambda: is_complete(paths.kept_index_path(cfg, method), fp),
                          *self.keys(fraction=fraction))
        if self.early_methods:
            self.early_selections(fp)
        with self.concurrently():  # every retraining reads only its kept list
            for fraction in self.profile.fractions:
                for method in self.profile.methods:
                    models[Key(method, fraction)] = self.retrain(Key(method, fraction))
                for method in self.early_methods:
                    key = Key(method, fraction, score_epochs=self.score_epochs)
                    models[key] = self.retrain(key)
            for network, loss in self.trainees:  # the same kept lists, other networks and losses
                for fraction in self.profile.fractions:
                    for method in ("full", *self.profile.methods):
                        key = Key(method, 1.0 if method == "full" else fraction, 0, f"{network}_{loss}")
                        models[key] = self.retrain(key)
            for seed in full_seeds:  # every configuration again with seeds +1 .. +N-1 (or the full data only)
                models[Key("full", 1.0, seed)] = full[seed]
                if self.seeds > 1:
                    for fraction in self.profile.fractions:
                        for method in self.profile.methods:
                            models[Key(method, fraction, seed)] = self.retrain(Key(method, fraction, seed))
                        for method in self.early_methods:
                            key = Key(method, fraction, seed, score_epochs=self.score_epochs)
                            models[key] = self.retrain(key)
        ijb = {}
        if self.profile.ijb and paths.ijb_root(base).is_dir():
            ijb = self.evaluate_ijb(models)
        results = self.collect(models, ijb, fp)
        if self.export != "none":
            results["export"] = self.export_kept_set(results)
        results["seeds"] = self.seeds
        results["pipeline_seconds"] = time.time() - t0
        write_results(self.out, results, METHOD_LABELS)
        print(f"pipeline finished in {time.time() - t0:.0f} s ({len(self.steps_run)} steps run, "
              f"{len(self.steps_skipped)} skipped); results in {self.out}")
        return results

    def early_selections(self, fp):
        """Early scoring: score with the original model's checkpoint K, clean from it, and select with every scored
        static method from the first K epochs' records, under the scorer tag `<net>_<loss>_e<K>`."""
        early = {"score_epochs": self.score_epochs}
        cfg, k = self.cfg(**early), self.score_epochs
        self.step(f"score the training set with epoch {k}'s model", ["eval_trainset.py"],
                  lambda: is_complete(paths.scores_path(cfg), fp), *self.keys(**early))
        if any("clean" in METHODS[m].needs for m in self.early_methods):
            self.step(f"clean the training set (scored at epoch {k})", ["clean_trainset.py"],
                      lambda: is_complete(paths.clean_dir(cfg) / "kept_index.npy", fp), *self.keys(**early))
        for fraction in self.profile.fractions:
            for method in self.early_methods:
                chosen = self.cfg(coreset_method=method, fraction=fraction, **early)
                self.step(f"prune: {METHOD_LABELS[method]} {fraction:.0%} (epochs 1-{k})", list(METHODS[method].script),
                          lambda: is_complete(paths.kept_index_path(chosen, method), fp),
                          *self.keys(fraction=fraction, **early))

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
        early = {"score_epochs": key.score_epochs} if key.score_epochs else {}
        extra.update(early)
        if key.method in DYNAMIC_METHODS:  # the full data, pruned as it trains, at the ratio of the cost asked
            extra.update(coreset_method="full", dynamic_method=key.method,
                         dynamic_ratio=ratio_for_cost(base, key.fraction))
        if key.trainee:  # another network / loss on the original model's kept list
            network, loss = key.trainee.rsplit("_", 1)
            extra.update(network=network, loss=loss, original_network=base.network, original_net_loss=base.loss)
        label = f"retrain: {METHOD_LABELS[key.method]} {key.fraction:.0%}" + \
            (f" (epochs 1-{key.score_epochs})" if key.score_epochs else "")
        if key.seed:  # another seed trains (and, for a seeded method, selects) in a folder of its own
            extra["output"] = self.runs / f"seed{seed}"
            label += f" (seed {seed})"
            if key.method in METHODS:
                chosen = self.cfg(coreset_method=key.method, fraction=key.fraction, **early)
                if METHODS[key.method].seeded:
                    mine = self.cfg(coreset_method=key.method, fraction=key.fraction, output=extra["output"], seed=seed,
                                    **early)
                    self.step(f"prune: {METHOD_LABELS[key.method]} {key.fraction:.0%} (seed {seed})",
                              list(METHODS[key.method].script),
                              lambda: is_complete(paths.kept_index_path(mine, key.method), self.fp),
                              *self.keys(fraction=key.fraction, output=extra["output"], seed=seed, **early))
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
        runs = [r for r in results["runs"] if r["method"] in METHODS and r["trainee"] == results["runs"][0]["trainee"]
                and not r.get("score_epochs")]
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
        spec = ",".join(f"{model_name(k)}={v}" for k, v in models.items())
        done = out / "ijb_results.json"

        def complete():
            if not done.exists():
                return False
            have = json.loads(done.read_text()).get("models", {})
            return all(model_name(k) in have for k in models)

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
                "ijb": {k: v for k, v in ijb.get(model_name(key), {}).get("1:1", {}).items()},
                "ijb_1n": ijb.get(model_name(key), {}).get("1:N", {}),
                "train_seconds": summary["train_seconds"], "sample_passes": _sample_passes(summary),
                "dynamic": summary.get("dynamic", {"method": "none"}), "score_epochs": key.score_epochs,
                "model_dir": str(model_dir)})
        original = json.loads((models[Key("full", 1.0)] / "train_summary.json").read_text())
        add_costs(runs, {m for m in METHODS if METHODS[m].needs}, original.get("samples_per_epoch"))
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


def _sample_passes(summary: dict) -> int:
    """The images a run trained on (train_summary.json; before 2026-12-05: every epoch's images)."""
    if "sample_passes" in summary:
        return int(summary["sample_passes"])
    return int(summary["num_images"]) * int(summary["epochs"])


def add_costs(runs: list, scored: set, original_per_epoch: list = None):
    """Each run's `cost`: its sample passes over those of the full-data run of the same network, loss and seed (or
    seed 0); `cost_with_scoring`: plus, for a method in `scored` (one that reads the original model's scores or
    records), the passes of the run that scored the data: the original model's (the first run of the table), or
    its first `score_epochs` epochs (`original_per_epoch`: its images per epoch) for an early-scored run. That run
    is paid once and shared by every fraction and seed of every static method; a dynamic method and Rand need
    none."""
    full = {(r["trainee"], r["seed_offset"]): r["sample_passes"] for r in runs if r["method"] == "full"}
    original = full.get((runs[0]["trainee"], 0)) if runs else None
    for r in runs:
        reference = full.get((r["trainee"], r["seed_offset"]), full.get((r["trainee"], 0), original))
        r["cost"] = r["sample_passes"] / reference if reference else None
        scoring = original
        if r.get("score_epochs") and original_per_epoch:
            scoring = sum(original_per_epoch[:r["score_epochs"]])
        extra = scoring / reference if r["method"] in scored and reference and scoring else 0.0
        r["cost_with_scoring"] = None if r["cost"] is None else r["cost"] + extra


def model_name(key: Key) -> str:
    return (f"{key.method}_{key.fraction:.2f}" + (f"_e{key.score_epochs}" if key.score_epochs else "")
            + (f"_seed{key.seed}" if key.seed else "") + (f"_{key.trainee}" if key.trainee else ""))


def require_bins(cfg):
    """The verification sets of a real dataset's preset, all there; else exit with the one-line reason."""
    try:
        check_bins(cfg)
    except UserError as e:
        raise SystemExit(f"run_pipeline: error: {e}") from None
