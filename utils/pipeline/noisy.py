"""The noisy-data experiment (`run_pipeline.py --experiment noisy`): on a set with injected noise (close-set label
flips and open-set intruders; synthetic by default at the RobustFace setting, 15% + 5%), which road loses the
least: train a plain margin loss through the noise, train a noise-robust head through it, filter in the loss,
clean first and then train, or clean iteratively; and CosFace on the noise-free subset as the ceiling.

Roads (each trained with every seed; the models of a seed live in `runs/` for the base seed, `runs/seed<S>/`):
    cosface, arcface, robustface, subcenter   the full noisy set with that head (original runs: they record the
                                              training, so the cleaning rules can read them)
    interclass                                CosFace, each step leaving out the samples whose cosine to another
                                              identity's centre exceeds `--set interclass_filter=T` (default 0.4)
    clean                                     the `--set clean_rule=R` rule (default center_angle) on the CosFace
                                              model's scores, then CosFace on the kept samples
    iterative                                 RobustFace: clean (the same rule, on its scores), retrain on the kept
                                              samples, score every sample with that model, clean again, at most
                                              `--clean_rounds N` rounds (default 3), then RobustFace on the last list
    noise_free                                CosFace on the samples noise.json does not list (the ceiling)

Beside the models, every cleaning rule is measured on every seed's CosFace model (subcenter on the Sub-center
ArcFace model) against noise.json: precision and recall, split into flips and intruders. No rule or threshold
reads noise.json; it is the yardstick only. Results: `noisy_results.json`, `noisy_results.md` (the tables) and
`noisy_results.png`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from utils.artifacts import paths
from utils.artifacts.files import atomic_save_npy, atomic_write_json, atomic_write_text, is_complete
from utils.artifacts.records import clean_round_dir, round_model_dir, round_scores_path
from utils.cleaning import quality
from utils.data.noise_file import load_noise, noisy_mask
from utils.evaluation.report import TAR_KEY, mean_accuracy

NOISY_DATA = ("flip_rate=0.15", "open_rate=0.05")  # RobustFace's MS1MCON setting: 15% close-set + 5% open-set
INTERCLASS_DEFAULT = 0.4  # not tuned on this data: a cosine well above the typical nearest other centre (~0.3)
RULE_DEFAULT = "center_angle"  # the best F1 at its defaults over the demo noise and three times it (docs/noisy.md)
ROUNDS_DEFAULT = 3
HEADS = ("CosFace", "ArcFace", "RobustFace", "SubCenterArcFace")
ROADS = {
    "cosface": "CosFace on the noisy set",
    "arcface": "ArcFace on the noisy set",
    "robustface": "RobustFace head on the noisy set",
    "subcenter": "Sub-center ArcFace (k=3) on the noisy set",
    "interclass": "CosFace + inter-class filtering",
    "clean": "clean, then CosFace",
    "iterative": "RobustFace: clean, retrain, repeat",
    "noise_free": "CosFace on the noise-free subset (ceiling)",
}


class NoisyExperiment:
    """The noisy-data experiment: its own steps on a Pipeline's plumbing (utils/pipeline/steps.py: steps, resume,
    concurrency, the ETA, IJB), which it is given rather than inherits (this module stays below the steps)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.rule = pipe.overrides.get("clean_rule", RULE_DEFAULT)
        self.threshold = float(pipe.overrides.get("interclass_filter", INTERCLASS_DEFAULT))
        self.cfg(clean_rule=self.rule)  # an unknown rule: one line now, not after the trainings

    def __getattr__(self, name):  # the pipeline's plumbing and settings: step, keys, cfg, out, rec, seeds, ...
        return getattr(self.pipe, name)

    # ------------------------------------------------------------------------------------------ plumbing
    def seed_keys(self, k: int, **extra) -> dict:
        """The config keys of seed offset k's runs: its seed and its folder."""
        base = self.cfg()
        out = self.runs if k == 0 else self.runs / f"seed{int(base.seed) + k}"
        return {"seed": int(base.seed) + k, "output": str(out), "clean_rule": self.rule, **extra}

    def head_keys(self, k: int, loss: str, **extra) -> dict:
        return self.seed_keys(k, loss=loss, original_net_loss=loss, **extra)

    def planned_work(self) -> tuple:
        training = self.seeds * (len(HEADS) + 3 + self.clean_rounds)
        other = int(self.synthetic) + 1 + self.seeds * (3 + 1 + 1 + 3 * (self.clean_rounds - 1)) + int(self.profile.ijb)
        return float(training), other

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        t0 = self.pipe.begin(self.planned_work())
        fp = self.fp
        noise = load_noise(self.rec)
        if noise is None:
            raise SystemExit(f"run_pipeline: --experiment noisy measures against injected noise: {self.rec} has no "
                             f"noise.json (make one with make_noisy_dataset.py, or leave out --rec)")
        noise_free = self.out / "noise_free_kept.npy"
        if not noise_free.exists():
            atomic_save_npy(noise_free, np.flatnonzero(~noisy_mask(noise, fp.num_images)).astype(np.int64))
        seeds = range(self.seeds)
        models = {}
        with self.concurrently():  # the roads that need nothing but the data
            for k in seeds:
                for loss in HEADS:
                    cfg = self.cfg(**self.head_keys(k, loss, is_original_train=True))
                    self.step(f"train {loss} on the noisy set (seed {cfg.seed})", ["train_everything.py"],
                              self._trained(paths.original_dir(cfg, cfg.network, loss)),
                              *self.keys(**self.head_keys(k, loss, is_original_train=True, resume=True)), work=1.0)
                    road = {"CosFace": "cosface", "ArcFace": "arcface", "RobustFace": "robustface",
                            "SubCenterArcFace": "subcenter"}[loss]
                    models[self.model_key(road, 1.0, k)] = paths.original_dir(cfg, cfg.network, loss)
                models[self.model_key("interclass", 1.0, k)] = self.train_road(
                    k, "CosFace", f"interclass filter {self.threshold:g}", work=1.0, interclass_filter=self.threshold,
                    coreset_method="full", output=self.seed_keys(k)["output"] + "/interclass")
                models[self.model_key("noise_free", 1.0, k)] = self.train_road(
                    k, "CosFace", "the noise-free subset", work=len(np.load(noise_free)) / fp.num_images,
                    coreset_method="full", kept_index=str(noise_free))
        lists = {}
        for k in seeds:  # scoring and cleaning, one seed after another (each round needs the one before)
            for loss in ("CosFace", "SubCenterArcFace", "RobustFace"):
                cfg = self.cfg(**self.head_keys(k, loss))
                self.step(f"score the training set with {loss} (seed {cfg.seed})", ["eval_trainset.py"],
                          lambda cfg=cfg: is_complete(paths.scores_path(cfg), fp), *self.keys(**self.head_keys(k, loss)))
            cfg = self.cfg(**self.head_keys(k, "CosFace"))
            self.step(f"clean ({self.rule}, CosFace's scores, seed {cfg.seed})", ["clean_trainset.py"],
                      lambda cfg=cfg: is_complete(paths.clean_dir(cfg) / "kept_index.npy", fp),
                      *self.keys(**self.head_keys(k, "CosFace")))
            lists[k] = (paths.clean_dir(cfg), self.iterate(k))
            seed_runs = Path(self.seed_keys(k)["output"])
            self.step(f"measure every cleaning rule against noise.json (seed {cfg.seed})", ["tools/measure_cleaning.py"],
                      lambda f=seed_runs / "cleaning_quality.json": f.exists(), "--out", seed_runs, "--loss", "CosFace",
                      "--defaults_only", "--json", seed_runs / "cleaning_quality.json")
        with self.concurrently():  # the retrainings on the cleaned sets
            for k in seeds:
                clean, last = lists[k]
                models[self.model_key("clean", 1.0, k)] = self.train_road(
                    k, "CosFace", f"the {self.rule} kept list", work=0.9, coreset_method="full",
                    kept_index=str(clean / "kept_index.npy"), label_map=str(clean / "label_map.json"))
                models[self.model_key("iterative", 1.0, k)] = self.train_road(
                    k, "RobustFace", f"the last round's kept list ({last.name})", work=0.9, **list_keys(last))
        ijb = self.evaluate_ijb(models) if self.profile.ijb and paths.ijb_root(self.cfg()).is_dir() else {}
        results = self.collect_noisy(models, ijb, noise, lists)
        results["pipeline_seconds"] = time.time() - t0
        write_noisy_results(self.out, results)
        print(f"pipeline finished in {time.time() - t0:.0f} s ({len(self.steps_run)} steps run, "
              f"{len(self.steps_skipped)} skipped); results in {self.out}")
        return results

    @staticmethod
    def _trained(folder):
        return lambda: (folder / "train_summary.json").exists()

    def train_road(self, k: int, loss: str, what: str, work: float, **extra):
        keys = {**self.head_keys(k, loss, is_original_train=False, resume=True), **extra}
        cfg = self.cfg(**keys)
        folder = paths.train_dir(cfg)
        self.step(f"train {loss} on {what} (seed {cfg.seed})", ["train_everything.py"], self._trained(folder),
                  *self.keys(**keys), work=work)
        return folder

    def iterate(self, k: int):
        """The iterative road of seed offset k: cleaning rounds on the RobustFace model's scores; the folder of the
        last round's kept list."""
        keys = self.head_keys(k, "RobustFace")
        cfg = self.cfg(**keys)
        rounds = {"clean_round": 1} if self.clean_rounds > 1 else {}
        first = clean_round_dir(cfg, 1) if rounds else paths.clean_dir(cfg)
        self.step(f"clean round 1 ({self.rule}, RobustFace's scores, seed {cfg.seed})", ["clean_trainset.py"],
                  lambda: is_complete(first / "kept_index.npy", self.fp), *self.keys(**keys, **rounds))
        if not rounds:
            return first
        for r in range(2, self.clean_rounds + 1):
            model = round_model_dir(cfg, r - 1)
            self.step(f"clean round {r}: retrain RobustFace on round {r - 1}'s kept list (seed {cfg.seed})",
                      ["train_everything.py"], self._trained(model),
                      *self.keys(**{**keys, **list_keys(clean_round_dir(cfg, r - 1)), "resume": True}), work=0.9)
            self.step(f"clean round {r}: score every sample with it (seed {cfg.seed})", ["eval_trainset.py"],
                      lambda r=r: is_complete(round_scores_path(cfg, r), self.fp), *self.keys(**keys, clean_round=r))
            self.step(f"clean round {r}: clean (seed {cfg.seed})", ["clean_trainset.py"],
                      lambda r=r: is_complete(clean_round_dir(cfg, r) / "kept_index.npy", self.fp),
                      *self.keys(**keys, clean_round=r))
            if json.loads((clean_round_dir(cfg, r) / "summary.json").read_text()).get("converged"):
                return clean_round_dir(cfg, r)
        return clean_round_dir(cfg, self.clean_rounds)

    # ------------------------------------------------------------------------------------------ results
    def collect_noisy(self, models: dict, ijb: dict, noise: dict, lists: dict) -> dict:
        runs = []
        full = {}
        for key, folder in models.items():
            summary = json.loads((folder / "train_summary.json").read_text())
            run = {"road": key.method, "seed_offset": key.seed, "seed": int(self.cfg().seed) + key.seed,
                   "num_images": summary["num_images"], "verification": summary["verification"],
                   "ijb": ijb.get(self.ijb_name(key), {}).get("1:1", {}), "sample_passes": summary["sample_passes"],
                   "interclass_filtered": summary.get("interclass_filtered"), "model_dir": str(folder)}
            run["mean_accuracy"] = mean_accuracy(run)
            runs.append(run)
            if key.method == "cosface":
                full[key.seed] = summary["sample_passes"]
        for run in runs:  # cost: every training the road needs, over one training on the full noisy set
            k = run["seed_offset"]
            extra = {"clean": full[k], "iterative": _robust_passes(self, k, lists[k][1])}.get(run["road"], 0)
            run["cost"] = (run["sample_passes"] + extra) / full[k]
        cleaning = [self.measure_rules(k, noise) for k in range(self.seeds)]
        dataset = {"rec": str(self.rec), "synthetic": self.synthetic, "num_images": self.fp.num_images,
                   "num_classes": self.fp.num_classes, "flip_rate": noise.get("flip_rate"),
                   "open_rate": noise.get("open_rate"), "flipped": len(noise.get("flipped", [])),
                   "open_set": len(noise.get("open_set", [])), "profile": self.profile.description}
        if self.synthetic and (self.rec / "dataset.json").exists():
            dataset["generator"] = json.loads((self.rec / "dataset.json").read_text()).get("config")
        return {"experiment": "noisy", "dataset": dataset, "seeds": self.seeds, "rule": self.rule,
                "interclass_filter": self.threshold, "clean_rounds": self.clean_rounds, "runs": runs,
                "cleaning": cleaning}

    def measure_rules(self, k: int, noise: dict) -> dict:
        """Every rule at its defaults on seed offset k's models against noise.json (tools/measure_cleaning.py's
        step: subcenter on the Sub-center ArcFace model, the others on CosFace's); and the iterative rounds."""
        measured = json.loads((Path(self.seed_keys(k)["output"]) / "cleaning_quality.json").read_text())
        out = {rule: _summary(q) for rule, q in measured.items()}
        robust = self.cfg(**self.head_keys(k, "RobustFace"))
        for r in range(1, self.clean_rounds + 1):
            summary = clean_round_dir(robust, r) / "summary.json" if self.clean_rounds > 1 else \
                paths.clean_dir(robust) / "summary.json"
            if summary.exists():
                s = json.loads(summary.read_text())
                kept = np.load(summary.parent / "kept_index.npy")
                flagged = np.setdiff1d(np.arange(self.fp.num_images), kept)
                out[f"iterative round {r}"] = {**_summary(quality.cleaning_quality(flagged, noise)),
                                               "change": s.get("change")}
        return out


def list_keys(folder) -> dict:
    """The config keys that train on the kept list cleaning wrote to `folder`, the model landing inside it (as a
    cleaning round's: utils/artifacts/records.py round_train_keys)."""
    return {"output": str(folder), "is_original_train": False, "coreset_method": "full",
            "kept_index": str(folder / "kept_index.npy"), "label_map": str(folder / "label_map.json")}


def _robust_passes(pipe: NoisyExperiment, k: int, last) -> int:
    """The sample passes the iterative road spent before its last training: the RobustFace original and each
    round's retraining (rounds 1 .. R-1 of a last list in round_<R>)."""
    robust = pipe.cfg(**pipe.head_keys(k, "RobustFace"))
    folders = [paths.original_dir(robust, robust.network, "RobustFace")]
    if last.name.startswith("round_"):
        folders += [round_model_dir(robust, r) for r in range(1, int(last.name[6:]))]
    return sum(json.loads((f / "train_summary.json").read_text())["sample_passes"] for f in folders)


def _summary(q: dict) -> dict:
    """The table's figures of a `cleaning_quality` result: flagged, precision, recall, F1, recall of the flips and
    of the intruders."""
    p, r = q["precision"], q["recall"]
    return {"flagged": q["removed"], "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "recall_flips": q["recall_flipped"], "recall_intruders": q["recall_open_set"]}


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def noisy_markdown(results: dict) -> str:
    d, runs = results["dataset"], results["runs"]
    lines = [f"Noisy-data experiment: {d['num_images']} images, {d['num_classes']} identities, {d['flipped']} flips and "
             f"{d['open_set']} open-set intruders injected; {results['seeds']} seed(s), mean ± std over seeds. "
             f"Cleaning rule {results['rule']}, inter-class filter {results['interclass_filter']:g}, at most "
             f"{results['clean_rounds']} rounds.", "",
             f"| road | images | mean verification accuracy | {' | '.join(sorted(runs[0]['verification']))} | "
             f"IJB-C {TAR_KEY} | cost |",
             "|---|---|---|" + "---|" * len(runs[0]["verification"]) + "---|---|"]
    for road, title in ROADS.items():
        rs = [r for r in runs if r["road"] == road]
        if not rs:
            continue
        targets = " | ".join(_mean_std([r["verification"].get(t) for r in rs]) for t in sorted(rs[0]["verification"]))
        lines.append(f"| {title} | {int(np.mean([r['num_images'] for r in rs]))} | "
                     f"{_mean_std([r['mean_accuracy'] for r in rs])} | {targets} | "
                     f"{_mean_std([r['ijb'].get(TAR_KEY) for r in rs])} | {np.mean([r['cost'] for r in rs]):.2f} |")
    lines += ["", "cost: the images every training of the road trained on, over one training on the full noisy set "
                  "(clean: the CosFace run that scored the data plus the retraining; iterative: the RobustFace run, "
                  "each round's retraining and the last).", "",
              "| rule (at its defaults) | flagged | precision | recall | F1 | flips caught | intruders caught |",
              "|---|---|---|---|---|---|---|"]
    for rule in results["cleaning"][0]:
        qs = [c[rule] for c in results["cleaning"] if rule in c]
        lines.append(f"| {rule} | {np.mean([q['flagged'] for q in qs]):.0f} | {_mean_std([q['precision'] for q in qs])}"
                     f" | {_mean_std([q['recall'] for q in qs])} | {_mean_std([q['f1'] for q in qs])} | "
                     f"{_mean_std([q['recall_flips'] for q in qs])} | {_mean_std([q['recall_intruders'] for q in qs])} |")
    return "\n".join(lines) + "\n"


def write_noisy_results(out, results: dict):
    """noisy_results.json, noisy_results.md (printed) and noisy_results.png in `out`."""
    atomic_write_json(out / "noisy_results.json", results)
    text = noisy_markdown(results)
    atomic_write_text(out / "noisy_results.md", text)
    plot_noisy(results, out / "noisy_results.png")
    print(text)


def plot_noisy(results: dict, path):
    """Each road's mean verification accuracy and IJB-C TAR@1e-4, a bar per road with the seeds' spread."""
    # only here: the pipeline's other steps do not need matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roads = [r for r in ROADS if any(x["road"] == r for x in results["runs"])]
    has_tar = any(TAR_KEY in x["ijb"] for x in results["runs"])
    fig = Figure(figsize=(11 if has_tar else 6, 4.5))
    FigureCanvasAgg(fig)
    panels = [("mean verification accuracy", lambda x: x["mean_accuracy"])]
    if has_tar:
        panels.append((f"IJB-C {TAR_KEY}", lambda x: x["ijb"].get(TAR_KEY, np.nan)))
    for i, (title, value) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        values = [[value(x) for x in results["runs"] if x["road"] == r] for r in roads]
        ax.barh(range(len(roads)), [np.nanmean(v) for v in values], xerr=[np.nanstd(v) for v in values],
                color=["#888888" if r == "noise_free" else "#4477aa" for r in roads], capsize=3)
        ax.set_yticks(range(len(roads)))
        ax.set_yticklabels([ROADS[r] for r in roads] if i == 0 else [])
        ax.invert_yaxis()
        lo = np.nanmin([np.nanmean(v) - np.nanstd(v) for v in values])
        ax.set_xlim(max(0.0, lo - 0.05), min(1.0, np.nanmax([np.nanmax(v) for v in values]) + 0.02))
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    d = results["dataset"]
    fig.suptitle(f"{d['flipped']} flips + {d['open_set']} intruders in {d['num_images']} images; "
                 f"{results['seeds']} seed(s), bars: mean, whiskers: std")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
