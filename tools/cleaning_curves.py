"""Each cleaning rule's precision-recall curve against the injected noise, at several noise levels: a table, JSON and
a figure.

    python tools/cleaning_curves.py output/n1 output/n3 --out_md curves.md --out_json curves.json --out_png curves.png

Each folder is an experiment: run_pipeline.py's --out (or its runs/ folder) with an original model trained and scored
(`python run_pipeline.py --out DIR --stop_after 3`, or train_everything.py --is_original_train true, then
eval_trainset.py). Per rule, the quantity the rule thresholds (utils/cleaning/curves.py says which, rule by rule)
ranks the samples; sweeping the threshold gives a precision-recall curve against the dataset's noise.json (flips and
open-set images both count as noisy). Reported per curve: the precision at recall 0.8 (the largest at any threshold
that reaches it), the best F1 with its precision and recall, and the rule's default point (what the rule flags at its
defaults, run through utils/cleaning/registry.py), with whether that point lies on the curve. For center_angle, also
the point of its mislabeled branch alone (theta_y > theta_o: the threshold 0 of its curve); its outlier branch is a
second condition. Two references without a rule: AUM (Pleiss et al. 2020) from the top-k records, and confident
learning's normalized self-confidence p(label) / t_label.

The rules read the original model of `--original_net_loss` (default: the first original_* that is not
SubCenterArcFace). The subcenter rule reads a SubCenterArcFace original model's scores: one under the folder, or under
the `--subcenter_runs` folder given for it; without one its curve is skipped (a printed line). No rule reads
noise.json: it is only the yardstick.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.config import parse_config  # noqa: E402
from utils.artifacts import paths  # noqa: E402
from utils.artifacts.files import ArtifactError, atomic_path  # noqa: E402
from utils.artifacts.records import open_records  # noqa: E402
from utils.cleaning import curves, experiment, quality, registry  # noqa: E402
from utils.data.datasets import open_dataset  # noqa: E402
from utils.data.noise_file import noisy_mask  # noqa: E402
from utils.errors import InputError  # noqa: E402

TARGET = (0.8, 0.9)  # the region the figure shades: recall >= 0.8 at precision >= 0.9


def noise_title(noise: dict) -> str:
    """'5% flips + 2% open-set' from noise.json's rates (else its counts over its images)."""
    n = max(int(noise.get("num_images") or 1), 1)
    flip = noise.get("flip_rate", len(noise.get("flipped", [])) / n)
    open_ = noise.get("open_rate", len(noise.get("open_set", [])) / n)
    return f"{100 * flip:.3g}% flips + {100 * open_:.3g}% open-set"


def point(index, noise: dict, s: curves.Suspicion) -> dict:
    q = quality.cleaning_quality(index, noise)
    return {"flagged": q["removed"], "precision": q["precision"], "recall": q["recall"],
            "on_curve": curves.on_curve(index, s)}


def rule_curve(name: str, rec, cfg, noise: dict, noisy) -> dict:
    """One curve: the quantity, its points, its summary, the rule's default point (none for the AUM reference)."""
    fn, what = curves.QUANTITIES[name]
    s = fn(rec, cfg)
    c = curves.pr_curve(s, noisy)
    out = {"rule": name, "quantity": what, "points": curves.thinned(c), "n_points": int(c.flagged.size),
           **curves.summary(c), "default": None}
    if name in registry.RULES:
        flags = registry.run_rule(registry.get_rule(name), rec, cfg)
        out["default"] = point(flags.index, noise, s)
        if name == "center_angle":
            out["mislabeled_branch"] = point(flags.index[~flags.outlier], noise, s)
    return out


def subcenter_source(cfg, runs) -> tuple:
    """(config that reads a SubCenterArcFace original model's scores under `runs`, its folder), or (None, why not)."""
    trained = experiment.originals(runs).get(experiment.SUBCENTER_LOSS)
    if trained is None:
        return None, f"no original_*_{experiment.SUBCENTER_LOSS} model under {runs}"
    if Path(trained["rec"]).resolve() != Path(cfg.rec).resolve():
        return None, (f"the {experiment.SUBCENTER_LOSS} model under {runs} was trained on {trained['rec']}, "
                      f"not {cfg.rec}")
    sub_cfg = parse_config(experiment.base_args(runs, trained) + ["--clean_rule", "subcenter"])
    return sub_cfg, str(paths.original_dir(sub_cfg))


def folder_curves(out, loss: str = None, subcenter_runs=None, say=print) -> dict:
    """Every rule's curve (and the references') on one experiment folder; `say` gets a line per curve skipped."""
    cfg, base, noise = experiment.open_experiment(out, loss)
    dataset = open_dataset(cfg.rec)
    rec = open_records(cfg, dataset)
    noisy = noisy_mask(noise, len(rec.labels))
    result = {"folder": str(out), "title": noise_title(noise), "images": int(len(rec.labels)),
              "identities": int(rec.num_classes), "flipped": len(noise.get("flipped", [])),
              "open_set": len(noise.get("open_set", [])), "original": paths.scorer_tag(cfg), "subcenter_original": None,
              "curves": [], "skipped": {}}
    for name in [*registry.RULES, *curves.REFERENCES]:
        rule_rec, rule_cfg = rec, parse_config(base + (["--clean_rule", name] if name in registry.RULES else []))
        if name not in curves.QUANTITIES:
            result["skipped"][name] = "no quantity for this rule in utils/cleaning/curves.py"
        elif name == "subcenter":
            rule_cfg, where = subcenter_source(cfg, experiment.runs_folder(subcenter_runs or out))
            if rule_cfg is None:
                result["skipped"][name] = where
            else:
                result["subcenter_original"] = where
                rule_rec = open_records(rule_cfg, dataset)
        if name not in result["skipped"]:
            try:
                result["curves"].append(rule_curve(name, rule_rec, rule_cfg, noise, noisy))
            except (InputError, ArtifactError) as e:  # an input this experiment lacks
                result["skipped"][name] = str(e)
        if name in result["skipped"]:
            say(f"{out}: {name}: skipped: {result['skipped'][name]}")
    return result


# ------------------------------------------------------------------------------------------------------ output
def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(results: list) -> str:
    lines = [f"| noise | rule | quantity (flagged first) | P at R >= {curves.TARGET_RECALL} | best F1 (P / R) | "
             "default: flagged, P / R | on curve |", "|---|---|---|---|---|---|---|"]
    for r in results:
        for c in r["curves"]:
            b, d = c["best_f1"] or {}, c["default"]
            default = on = "-"
            if d is not None:
                default = f"{d['flagged']}, {_f(d['precision'])} / {_f(d['recall'])}"
                on = "yes" if d["on_curve"] else "no"
            if "mislabeled_branch" in c:
                m = c["mislabeled_branch"]
                default += f" (theta_y > theta_o alone: {m['flagged']}, {_f(m['precision'])} / {_f(m['recall'])})"
            lines.append(f"| {r['title']} | {c['rule']} | {c['quantity']} | {_f(c['precision_at_recall'])} | "
                         f"{_f(b.get('f1'))} ({_f(b.get('precision'))} / {_f(b.get('recall'))}) | {default} | {on} |")
    return "\n".join(lines)


def describe(results: list) -> str:
    lines = []
    for r in results:
        skipped = "".join(f"; {k} skipped ({v})" for k, v in r["skipped"].items())
        sub = f", sub-centers: {r['subcenter_original']}" if r["subcenter_original"] else ""
        lines.append(f"- {r['title']}: `{r['folder']}`, {r['images']} images, {r['identities']} identities, "
                     f"{r['flipped']} flips and {r['open_set']} open-set images; original model {r['original']}"
                     f"{sub}{skipped}.")
    return "\n".join(lines)


def page(results: list, argv: list, png=None, md_path=None) -> str:
    """The markdown page: the date line, how to reproduce, the experiments, the table, the figure."""
    command = "python tools/cleaning_curves.py " + " ".join(shlex.quote(a) for a in argv)
    how = "\n\n".join(__doc__.split("\n\n")[2:])  # what is measured: this docstring past its usage line
    figure = ""
    if png is not None:
        rel = os.path.relpath(Path(png).resolve(), Path(md_path).resolve().parent) if md_path else str(png)
        figure = f"\n\n![precision-recall curves of the cleaning rules]({rel})"
    return (f"# Cleaning rules: precision-recall curves\n\nMeasured {datetime.date.today().isoformat()} with "
            f"`{command}`.\n\n[Back to the README](../README.md)\n\n{how}"
            f"\nExperiments:\n\n{describe(results)}\n\n{table(results)}{figure}\n")


def plot(results: list, path) -> None:
    """One panel per experiment: every curve, the default points (filled) and center_angle's mislabeled branch
    (hollow), the target region shaded."""
    # matplotlib (0.5 s to import) for the figure only: the table and JSON do not load it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * len(results), 5.2))
    FigureCanvasAgg(fig)
    colors = {name: f"C{i}" for i, name in enumerate([*curves.QUANTITIES])}
    for i, r in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        ax.fill_between([TARGET[0], 1.0], TARGET[1], 1.0, color="green", alpha=0.12, lw=0,
                        label=f"target: P >= {TARGET[1]} at R >= {TARGET[0]}")
        for c in r["curves"]:
            p = c["points"]
            color = colors.get(c["rule"], "k")
            at = _f(c["precision_at_recall"])
            ax.plot(p["recall"], p["precision"], color=color, lw=1.2, ls="--" if c["default"] is None else "-",
                    label=f"{c['rule']} (P@R{curves.TARGET_RECALL}: {at})")
            if c["default"] is not None:
                d = c["default"]
                ax.plot([d["recall"]], [d["precision"]], "o", color=color, ms=7, mec="k", mew=0.6)
            if "mislabeled_branch" in c:
                m = c["mislabeled_branch"]
                ax.plot([m["recall"]], [m["precision"]], "s", mfc="none", mec=color, ms=8, mew=1.2)
        ax.set_xlim(0, 1.0)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall (of flips + open-set)")
        ax.set_ylabel("precision")
        ax.set_title(r["title"])
        ax.grid(linestyle="--", linewidth=0.5)
        ax.legend(loc="lower left", fontsize=7,
                  title="o: default point; square: center_angle's theta_y > theta_o alone", title_fontsize=7)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="experiment folders: run_pipeline.py's --out (or runs/)")
    p.add_argument("--original_net_loss", default=None,
                   help="the loss of the original model the rules read (default: the first original_* that is not "
                        "SubCenterArcFace)")
    p.add_argument("--subcenter_runs", nargs="+", type=Path, default=None,
                   help="per folder, in order, the runs folder holding its SubCenterArcFace original model (default: "
                        "the folder itself)")
    p.add_argument("--out_md", type=Path, help="write the markdown page here")
    p.add_argument("--out_json", type=Path, help="write the curves and their summaries here")
    p.add_argument("--out_png", type=Path, help="write the figure here (one panel per folder)")
    args = p.parse_args(argv)
    sub = args.subcenter_runs or [None] * len(args.folders)
    if len(sub) != len(args.folders):
        p.error(f"--subcenter_runs: give one runs folder per experiment folder ({len(args.folders)}), in order")
    try:
        results = [folder_curves(f, args.original_net_loss, s) for f, s in zip(args.folders, sub)]
    except (ArtifactError, InputError) as e:
        raise SystemExit(f"cleaning_curves: error: {e}") from None
    print(describe(results) + "\n\n" + table(results))
    if args.out_png:
        plot(results, args.out_png)
    if args.out_md:
        write_text(args.out_md, page(results, argv, args.out_png, args.out_md))
    if args.out_json:
        text = json.dumps({"target": {"recall": TARGET[0], "precision": TARGET[1]}, "experiments": results}, indent=1)
        write_text(args.out_json, re.sub(r"\[[-0-9.,\s]*\]", lambda m: " ".join(m.group(0).split()), text))
    return results


if __name__ == "__main__":
    main()
