"""How well does each cleaning rule find the injected label noise? A table from an experiment folder.

    python tools/measure_cleaning.py --out output/demo          # run_pipeline.py's --out (or its runs/)

Reads the original model's records and scores there (train and score first: `run_pipeline.py --stop_after 4` with
the demo profile), runs every rule with its options through `utils/cleaning/registry.py` (no file is written) and
measures the flagged sets against the dataset's `noise.json`: flagged, precision, recall, F1; for the samples flagged
with a suggested label, against the flips: precision, recall, relabel accuracy (suggestion = true identity); for
the outliers, against the open-set images. Reference rows: cleanlab's `find_label_issues` on the same
probabilities as `confident_learning` (the soft labels, made dense: each unlisted class at the rest
probability), with its default filter and with 'confident_learning'; their suggestion is the row's
arg-max. Rows per cleaning round come from the `clean/<scorer>/round_<R>/summary.json` files
(`run_pipeline.py --clean_rounds N`). No rule reads noise.json: it is only the yardstick here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config.config import parse_config  # noqa: E402
from utils.artifacts import paths  # noqa: E402
from utils.cleaning import experiment, probabilities, quality, registry  # noqa: E402
from utils.artifacts.files import ArtifactError, atomic_write_json  # noqa: E402
from utils.errors import InputError  # noqa: E402
from utils.data.datasets import open_dataset  # noqa: E402
from utils.artifacts.records import open_records  # noqa: E402

DENSE_LIMIT = 5e7  # probabilities the cleanlab reference may hold densely (N x K float64: 400 MB)


def rule_rows(num_epochs: int) -> list:
    """(rule, options) of every row: each rule at its defaults, then the options that change what it reads."""
    late = f"{num_epochs // 2 + 1}-{num_epochs}"
    return [("argmax", []), ("trajectory", []), ("trajectory", ["--clean_epochs", late]),
            ("trajectory", ["--clean_epochs", f"1-{max(1, num_epochs // 3)}"]),
            ("trajectory", ["--clean_margin_quantile", "0.1"]), ("trajectory", ["--clean_margin_quantile", "0.5"]),
            ("trajectory", ["--clean_agree", "argmax"]), ("confident_learning", []),
            ("confident_learning", ["--clean_probs", "scores"]), ("confident_learning", ["--clean_agree", "argmax"]),
            ("center_angle", []), ("center_angle", ["--clean_agree", "trajectory"]), ("subcenter", [])]


def table_row(name: str, options: str, q: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    p, r = q["precision"], q["recall"]
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    m, o = q.get("mislabeled", {}), q.get("outliers", {})
    return (f"| {name} | {options or 'defaults'} | {q['removed']} | {f(p)} | {f(r)} | {f(f1)} | "
            f"{f(m.get('precision'))} / {f(m.get('recall'))} / {f(m.get('relabel_accuracy'))} | "
            f"{f(o.get('precision'))} / {f(o.get('recall'))} |")


def cleanlab_rows(rec, cfg, noise) -> list:
    """cleanlab's find_label_issues on the confident_learning rule's probabilities, made dense."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return ["| cleanlab | not installed (pip install -r requirements-dev.txt) | | | | | | |"]
    probs = probabilities.trajectory_probs(rec, cfg)
    n, k = len(rec.labels), rec.num_classes
    if n * k > DENSE_LIMIT:
        return [f"| cleanlab | skipped: {n} x {k} dense probabilities | | | | | | |"]
    seen = np.isfinite(probs.label_prob)
    dense = np.repeat(np.nan_to_num(probs.rest_prob)[:, None], k, axis=1)
    rows, cols = np.nonzero(probs.classes >= 0)
    dense[rows, probs.classes[rows, cols]] = probs.probs[rows, cols]
    dense[np.arange(n), rec.labels] = np.nan_to_num(probs.label_prob)
    dense[~seen] = 1.0 / k
    dense /= dense.sum(axis=1, keepdims=True)
    out = []
    for filter_by in ("prune_by_noise_rate", "confident_learning"):
        issue = find_label_issues(rec.labels, dense, filter_by=filter_by)
        index = np.flatnonzero(issue)
        q = quality.cleaning_quality(index, noise, dense[index].argmax(axis=1), np.zeros(index.size, bool))
        out.append(table_row("cleanlab find_label_issues", f"filter_by={filter_by}, trajectory soft labels", q))
    return out


def round_rows(cfg) -> list:
    files = sorted(paths.clean_dir(cfg).glob("round_*/summary.json"), key=lambda f: int(f.parent.name[6:]))
    out = []
    for f in files:
        s = json.loads(f.read_text())
        if "quality" in s:
            change = f", changed {s['change']:.1%}" if "change" in s else ""
            agree = s.get("agree", {}).get("rules", [])[1:]
            name = s["rule"] + (f" + agree {','.join(agree)}" if agree else "")
            out.append(table_row(f"{name} (round {s.get('round')})", f"clean/{f.parent.name}{change}", s["quality"]))
    return out


def measure(out: Path, loss: str = None, defaults_only: bool = False, measured: dict = None) -> str:
    """The table of every rule (at its defaults only with `defaults_only`) on the original model of `loss` (default:
    the first original_* folder that is not SubCenterArcFace's); each row's quality also lands in `measured`
    ({rule: cleaning_quality}) if given."""
    cfg, base, noise = experiment.open_experiment(out, loss)
    rec = open_records(cfg, open_dataset(cfg.rec))
    num_epochs = rec.topk["topk_logits"].shape[0]
    lines = ["| rule | options | flagged | precision | recall | F1 | flips: precision / recall / relabel acc. "
             "| open-set: precision / recall |", "|---|---|---|---|---|---|---|---|"]
    subcenter = experiment.originals(experiment.runs_folder(out)).get(experiment.SUBCENTER_LOSS)
    for name, options in rule_rows(num_epochs):
        if defaults_only and options:
            continue
        rule_cfg = parse_config(base + ["--clean_rule", name, *options])
        rule_rec = rec
        if name == "subcenter" and subcenter is not None:  # read the sub-center model's scores
            rule_cfg = parse_config(base + ["--clean_rule", name, "--original_net_loss", experiment.SUBCENTER_LOSS,
                                            *options])
            rule_rec = open_records(rule_cfg, open_dataset(cfg.rec))
        try:
            flags = registry.run_rule(registry.get_rule(name), rule_rec, rule_cfg)
        except (InputError, ArtifactError) as e:  # a rule this run has no input for
            lines.append(f"| {name} | not measured: {str(e).split(':')[0]} | - | - | - | - | - | - |")
            continue
        q = quality.cleaning_quality(flags.index, noise, flags.suggested_label, flags.outlier)
        lines.append(table_row(name, " ".join(options), q))
        if measured is not None and not options:
            measured[name] = q
    lines += [] if defaults_only else cleanlab_rows(rec, cfg, noise)
    lines += round_rows(cfg)
    flips, opens = len(noise.get("flipped", [])), len(noise.get("open_set", []))
    head = (f"{cfg.rec}: {len(rec.labels)} images, {rec.num_classes} identities, {flips} flips and {opens} open-set "
            f"images in noise.json; original model {paths.scorer_tag(cfg)}, {num_epochs} recorded epochs.")
    return head + "\n\n" + "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run_pipeline.py's --out folder (or its runs/ folder)")
    p.add_argument("--loss", default=None, help="the original model whose records and scores the rules read (default: "
                                                "the first original_<network>_<loss> folder; subcenter reads the "
                                                "SubCenterArcFace one where there is one)")
    p.add_argument("--defaults_only", action="store_true", help="each rule at its defaults only, no cleanlab rows")
    p.add_argument("--json", type=Path, default=None, help="also write each rule's quality at its defaults here")
    args = p.parse_args(argv)
    try:
        measured = {}
        print(measure(args.out, args.loss, args.defaults_only, measured))
        if args.json:
            atomic_write_json(args.json, measured)
    except ArtifactError as e:
        raise SystemExit(f"measure_cleaning: error: {e}") from None


if __name__ == "__main__":
    main()
