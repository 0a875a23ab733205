"""The stages after an original training run, at real dataset scale, on simulated records.

    python tools/bench_scale.py --json scale.json                      # Glint360K: 17,091,657 images, 20 epochs
    python tools/bench_scale.py --json scale.json --scale casia        # CASIA-WebFace: 490,623 images, 34 epochs
    python tools/bench_scale.py --json scale.json --scale small        # 20,000 images: checks the tool itself

It writes, in a temporary folder under --dir, what a training run at that scale leaves on disk, the way the
run writes it: a RecordIO dataset of tiny records (InsightFace layout, the project's writer; log-normal
identity sizes), one `probs/epoch_XXX.npz` per epoch with its manifest (labelled-class probability float32,
top-10 margin-free logits float16 with their classes int32, the rest's mean float16; samples a drop_last epoch
leaves out are NaN / -1, as training gathers them) and the scoring stage's `scores/*.npz`. 2% of the samples
are flipped labels: another identity on top of every epoch's top k (the label outside it) and of the scoring
model's arg-max, so the cleaning rules have something to flag. Then it runs every later step in a fresh
process, so each step's peak memory is its own: reading the dataset layout from the record headers,
`assemble_history`, every cleaning rule of utils/cleaning/registry.py's registry and every selection method of
utils/selection/registry.py's registry (whatever they hold when it runs), the label map, writing a selection (kept
list, label map, summary, plot) and the export's index plan. Peak RSS is the process's high-water mark (VmHWM,
which also counts the pages of memory-mapped files it touched; the top-k records are read with file reads,
utils/dynamics/blocks.py); peak anon is the highest sampled RssAnon (allocations alone). A step whose anonymous memory
passes --mem_cap_gb is stopped (the machine is shared) and reported so.

Before writing, the free disk space is checked: the records take epochs x images x 68 bytes twice (the
epoch files and the assembled ones; the epoch files are deleted once assembled unless --keep). When they
do not fit, fewer epochs are simulated and the table says so; the assemble step's time then scales with
the epochs. Everything written is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from utils.runtime.cli import flag  # noqa: E402

# images, identities, largest identity, epochs of the original training
SCALES = {
    "glint360k": (17_091_657, 360_232, 1_500, 20),
    "casia": (490_623, 10_572, 804, 34),
    "small": (20_000, 400, 200, 12),
}
TOPK = 10
GLOBAL_BATCH = 4096  # drop_last leaves num_images % GLOBAL_BATCH samples out of each epoch
RECORD_BYTES = 4 + TOPK * 2 + TOPK * 4 + 2  # one sample of one epoch: prob f32, logits f16, index i32, rest f16
MARGIN_BYTES = 8 << 30  # disk left free for everyone else


# ------------------------------------------------------------------------------------- the run's files
def _config(work: Path, epochs: int):
    from config.config import parse_config

    return parse_config(["--rec", str(work / "rec"), "--output", str(work / "out"), "--num_epoch", str(epochs),
                         "--lr_steps", str(epochs), "--record_topk", str(TOPK), "--window", str(min(10, epochs - 1)),
                         "--fraction", "0.5"], preset_needed=False)  # a simulation: its own schedule, no preset


def _dataset(work: Path):
    """(labels int64, fingerprint) the read_layout step cached."""
    from utils.artifacts.files import Fingerprint

    fp = Fingerprint.from_dict(json.loads((work / "fingerprint.json").read_text()))
    return np.load(work / "labels.npy", mmap_mode="r"), fp


def _quality(n: int, seed: int) -> np.ndarray:
    """Per sample, the probability training converges to: mostly confident, a tail of hard samples."""
    rng = np.random.default_rng(seed)
    easy = rng.random(n) < 0.85
    return np.where(easy, rng.beta(8, 1, n), rng.beta(1.2, 3, n)).astype(np.float32)


def _disagrees(n: int, seed: int) -> np.ndarray:
    """The 2% of samples the simulated models put in another identity (the trajectory's top class and the
    scoring model's arg-max), so the cleaning steps have something to flag."""
    return np.random.default_rng([seed, 99]).random(n) < 0.02


def simulate_geometry(labels: np.ndarray, wrong: np.ndarray, quality: np.ndarray, num_classes: int, seed: int) -> dict:
    """Where the scoring model puts each sample among the class centres (eval_trainset.py's geometry, what the angle
    rules read): nearer its own centre the more confident it is, nearer the next identity's where it disagrees; three
    sub-centre cosines around its own (as a SubCenterArcFace model's scores would hold them)."""
    rng = np.random.default_rng([seed, 7])
    label_cos = (0.1 + 0.7 * quality).astype(np.float32)
    other_cos = np.where(wrong, label_cos + 0.1, rng.uniform(0.0, 0.3, labels.size)).astype(np.float32)
    subcenter = np.clip(label_cos[:, None] - rng.uniform(0.0, 0.3, (labels.size, 3)).astype(np.float32), -1, 1)
    subcenter[np.arange(labels.size), rng.integers(0, 3, labels.size)] = label_cos
    return {"label_cos": label_cos, "other_cos": np.minimum(other_cos, 1), "other_class": (labels + 1) % num_classes,
            "label_subcenter_cos": subcenter}


def simulate_epoch(labels: np.ndarray, num_classes: int, epoch: int, epochs: int, seed: int) -> dict:
    """One epoch's records as Recorder.write saves them (dtypes, NaN / -1 for the samples not seen)."""
    n = labels.size
    rng = np.random.default_rng([seed, epoch])
    q = _quality(n, seed)
    progress = np.float32((epoch + 1) / epochs)
    prob = q * progress + rng.random(n, dtype=np.float32) * np.float32(0.3) * (1 - progress)
    np.clip(prob, 0, 1, out=prob)
    steps = np.cumsum(rng.integers(1, 40, (n, TOPK - 1), dtype=np.int32), axis=1, dtype=np.int32)
    index = np.empty((n, TOPK), dtype=np.int32)
    index[:, 0] = labels
    np.add(labels[:, None], steps, out=index[:, 1:], casting="unsafe")
    index[:, 1:] %= num_classes  # distinct within a row: the steps add up to less than the classes
    wrong = _disagrees(n, seed)  # a flipped label: another identity on top in every epoch, the label not in the top k
    index[wrong, 0] = (labels[wrong] + 1) % num_classes
    index[wrong, 1:] = (labels[wrong, None] + 1 + steps[wrong]) % num_classes  # still distinct
    gaps = rng.random((n, TOPK), dtype=np.float32)
    gaps *= np.float32(3)
    logits = (np.float32(40) * q)[:, None] - np.cumsum(gaps, axis=1, dtype=np.float32)
    rest = rng.normal(0, 1, n).astype(np.float16)
    unseen = rng.choice(n, n % GLOBAL_BATCH, replace=False)
    prob[unseen] = np.nan
    logits[unseen] = np.nan
    index[unseen] = -1
    rest[unseen] = np.nan
    label_logit = np.where(wrong, rest, logits[:, 0]).astype(np.float16)  # a flipped label sits among the rest
    return {"gt_prob_with_margin": prob, "topk_logits": logits.astype(np.float16), "topk_index": index,
            "rest_mean_logit": rest, "label_logit": label_logit}


# ------------------------------------------------------------------------------------------ the steps
def write_tiny_recordio(folder: Path, scale: str, seed: int) -> int:
    """train.rec/.idx/property in the InsightFace layout (header, image records, one record per identity)
    with 4-byte payloads: the headers are what reading the layout reads. Identity sizes are log-normal."""
    from tools.bench_pruning import synthetic
    from utils.data.recordio import IRHeader, MXIndexedRecordIO, pack

    images, ids, largest, _ = SCALES[scale]
    counts = np.bincount(synthetic(images, ids, largest, seed)[1], minlength=ids)
    first_identity = images + 1
    ends = first_identity - images + np.cumsum(counts)  # end key of each identity's images
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "w") as rec:
        rec.write_idx(0, pack(IRHeader(2, [first_identity, first_identity + ids], 0, 0), b""))
        labels = np.repeat(np.arange(ids), counts)
        for key, label in enumerate(labels.tolist(), start=1):
            rec.write_idx(key, pack(IRHeader(0, float(label), key, 0), b"face"))
        for identity, (end, n) in enumerate(zip(ends.tolist(), counts.tolist())):
            rec.write_idx(first_identity + identity, pack(IRHeader(2, [end - n, end], 0, 0), b""))
    (folder / "property").write_text(f"{ids},112,112\n")
    return images


def step_write_recordio(work: Path, scale: str, epochs: int, seed: int) -> dict:
    (work / "rec").mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    images = write_tiny_recordio(work / "rec", scale, seed)
    return {"seconds": time.perf_counter() - t,
            "note": f"{images:,} records, train.rec {(work / 'rec' / 'train.rec').stat().st_size / 2**20:,.0f} MB"}


def step_read_layout(work: Path, scale: str, epochs: int, seed: int) -> dict:
    from utils.artifacts.files import atomic_save_npy
    from utils.data.recordio import read_layout

    t = time.perf_counter()
    layout = read_layout(work / "rec")
    seconds = time.perf_counter() - t
    atomic_save_npy(work / "labels.npy", layout.labels)
    (work / "fingerprint.json").write_text(json.dumps(layout.fingerprint.to_dict()))
    return {"seconds": seconds, "note": f"labels of {layout.num_images:,} records from their headers"}


def step_write_epoch_records(work: Path, scale: str, epochs: int, seed: int) -> dict:
    """What Recorder.write does at the end of every epoch (per-epoch npz + manifest), plus the scoring
    stage's scores file; the time is the writing alone (simulating the values is not timed)."""
    from utils.artifacts import paths
    from utils.artifacts.files import save_array
    from utils.training.recording import record_kind

    labels, fp = _dataset(work)
    labels = np.asarray(labels)
    cfg = _config(work, epochs)
    out = paths.original_dir(cfg, cfg.network, cfg.loss)
    seconds = 0.0
    for e in range(epochs):
        arrays = simulate_epoch(labels, fp.num_classes, e, epochs, seed)
        t = time.perf_counter()
        save_array(out / "probs" / f"epoch_{e + 1:03d}.npz", arrays, "train_everything.record", fp, cfg,
                   info={"epoch": e + 1, "seen": int(np.isfinite(arrays["gt_prob_with_margin"]).sum()),
                         **record_kind(cfg)})
        seconds += time.perf_counter() - t
        del arrays
    q = _quality(labels.size, seed)
    pred = labels.copy()
    wrong = _disagrees(labels.size, seed)  # the model disagrees with 2% of the labels
    pred[wrong] = (labels[wrong] + 1) % fp.num_classes
    save_array(paths.scores_path(cfg), {"gt_prob_with_margin": q, "gt_prob": q, "pred": pred,
                                        "pred_prob": np.maximum(q, np.float32(0.5)), "label": labels,
                                        **simulate_geometry(labels, wrong, q, fp.num_classes, seed)},
               "eval_trainset", fp, cfg)
    size = sum(f.stat().st_size for f in (out / "probs").glob("*.npz"))
    return {"seconds": seconds, "note": f"{epochs} epoch files, {size / 2**30:.1f} GiB; "
                                        f"{seconds / epochs:.1f} s per epoch"}


def step_assemble_history(work: Path, scale: str, epochs: int, seed: int) -> dict:
    from utils.artifacts import paths
    from utils.training.recording import assemble_history

    _, fp = _dataset(work)
    cfg = _config(work, epochs)
    t = time.perf_counter()
    assemble_history(cfg, fp)
    seconds = time.perf_counter() - t
    out = paths.original_dir(cfg)
    size = sum((out / f).stat().st_size for f in ("prob_history.npy", "topk_logits.npz"))
    return {"seconds": seconds, "note": f"prob_history.npy + topk_logits.npz, {size / 2**30:.1f} GiB"}


def _timed(fn):
    """(fn(), seconds it took)."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _records(work: Path, epochs: int):
    from utils.artifacts.records import Records

    labels, fp = _dataset(work)
    cfg = _config(work, epochs)
    return cfg, Records(cfg, np.asarray(labels), fp, fp.num_classes, inputs=[])


def step_clean(work: Path, scale: str, epochs: int, seed: int, rule_name: str) -> dict:
    from utils.artifacts import paths
    from utils.cleaning.registry import get_rule, run_rule
    from utils.artifacts.kept_sets import write_kept_set

    cfg, rec = _records(work, epochs)
    rule = get_rule(rule_name)
    flags, seconds = _timed(lambda: run_rule(rule, rec, cfg))
    if rule.name == cfg.clean_rule:  # the cleaned kept list diffprob_clean reads
        kept = np.setdiff1d(np.arange(rec.labels.size, dtype=np.int64), flags.index)
        write_kept_set(paths.clean_dir(cfg), "clean_trainset", kept, rec.labels, rec.fingerprint, cfg, rec.inputs,
                       {"rule": rule.name})
    return {"seconds": seconds, "note": f"flags {flags.index.size:,}"}


def step_select(work: Path, scale: str, epochs: int, seed: int, method_name: str) -> dict:
    from utils.selection.registry import get_method, run_selection

    cfg, rec = _records(work, epochs)
    method = get_method(method_name)
    selection, seconds = _timed(lambda: run_selection(method, rec, cfg))
    (work / "kept").mkdir(exist_ok=True)
    np.save(work / "kept" / f"{method.name}.npy", selection.kept)
    if selection.scores is not None:
        np.save(work / "kept" / f"{method.name}.scores.npy", selection.scores)
    return {"seconds": seconds, "note": f"keeps {selection.kept.size / rec.labels.size:.3f}"}


def _kept(work: Path) -> tuple:
    """(method name, kept indices, scores or None) of the first selection that ran (DiffProb's when it did)."""
    files = sorted((work / "kept").glob("*.npy"), key=lambda f: (f.stem != "diffprob", f.stem))
    f = next(f for f in files if not f.stem.endswith(".scores"))
    scores = f.with_name(f"{f.stem}.scores.npy")
    return f.stem, np.load(f), (np.load(scores) if scores.exists() else None)


def step_label_map(work: Path, scale: str, epochs: int, seed: int) -> dict:
    from utils.pruning import label_map_for

    labels, _ = _dataset(work)
    labels = np.asarray(labels)
    name, kept, _ = _kept(work)
    t = time.perf_counter()
    label_map = label_map_for(kept, labels)
    return {"seconds": time.perf_counter() - t, "note": f"{name}: {len(label_map):,} identities kept"}


def step_write_selection(work: Path, scale: str, epochs: int, seed: int) -> dict:
    from utils.artifacts import paths
    from utils.artifacts.kept_sets import write_selection
    from utils.selection.registry import Selection, get_method

    cfg, rec = _records(work, epochs)
    name, kept, scores = _kept(work)
    method = get_method(name)
    t = time.perf_counter()
    write_selection(cfg, paths.coreset_dir(cfg, name), method, Selection(kept, scores), rec)
    return {"seconds": time.perf_counter() - t, "note": f"{name}: ranking, kept_index.npy, label_map.json, summary, plot"}


def step_plan_export(work: Path, scale: str, epochs: int, seed: int) -> dict:
    from utils.artifacts import paths
    from utils.data.datasets import open_dataset
    from utils.data.export import plan_export

    cfg = _config(work, epochs)
    name, _, _ = _kept(work)
    dataset = open_dataset(cfg.rec)  # read_layout, timed in its own step
    t = time.perf_counter()
    plan = plan_export(dataset, paths.kept_index_path(cfg, name), paths.label_map_path(cfg, name))
    return {"seconds": time.perf_counter() - t,
            "note": f"{name}: {plan.origin_index.size:,} records, {plan.num_classes:,} classes"}


FIXED_STEPS = {"write_recordio": step_write_recordio, "read_layout": step_read_layout,
               "write_epoch_records": step_write_epoch_records, "assemble_history": step_assemble_history}
LATE_STEPS = {"label_map": step_label_map, "write_selection": step_write_selection, "plan_export": step_plan_export}


def step_names() -> list:
    """Every step in order; the registries' entries are read now, so new rules and methods are included."""
    from utils.cleaning.registry import RULES
    from utils.selection.registry import METHODS

    return [*FIXED_STEPS, *(f"clean:{r}" for r in RULES), *(f"select:{m}" for m in METHODS), *LATE_STEPS]


def run_step(name: str, work: Path, scale: str, epochs: int, seed: int) -> dict:
    kind, _, arg = name.partition(":")
    if kind == "clean":
        return step_clean(work, scale, epochs, seed, arg)
    if kind == "select":
        return step_select(work, scale, epochs, seed, arg)
    return {**FIXED_STEPS, **LATE_STEPS}[name](work, scale, epochs, seed)


# ------------------------------------------------------------------------------------ running a step
def _status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) if m else 0


def in_fresh_process(name: str, args, work: Path) -> dict:
    """Run one step in a new interpreter; its seconds (the step's own timer), peak RSS and peak anon memory."""
    result_file = work / f"result-{name.replace(':', '_')}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--work", str(work), "--scale", args.scale,
           "--epochs", str(args.epochs), "--seed", str(args.seed)]
    if hasattr(os, "sync"):
        os.sync()  # the previous step's writes reach the disk first, not during this step's timing
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    cap_kb, peak_anon, over = args.mem_cap_gb * 2**20, 0, False
    while True:
        waited, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if waited:
            break
        anon = _status_kb(proc.pid, "RssAnon")
        peak_anon = max(peak_anon, anon)
        if anon > cap_kb and not over:
            over = True
            proc.kill()
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    wall = time.perf_counter() - t
    row = {"seconds": wall, "peak_rss_gb": usage.ru_maxrss / 2**20, "peak_anon_gb": peak_anon / 2**20,
           "process_seconds": wall}
    if over:
        return {**row, "status": "over memory cap", "note": f"stopped: anonymous memory passed {args.mem_cap_gb} GB"}
    if proc.returncode != 0 or not result_file.exists():
        last = [line.strip() for line in output if line.strip()][-1:] or ["no output"]
        status = "skipped" if "ArtifactError" in "".join(output) or "missing" in last[0] else "failed"
        return {**row, "status": status, "note": last[0][:300]}
    return {**row, "status": "ok", **json.loads(result_file.read_text())}


def disk_plan(work_dir: Path, scale: str, epochs: int, keep: bool) -> tuple:
    """(epochs that fit, message or None): the records need epochs x images x RECORD_BYTES twice while assembling."""
    images = SCALES[scale][0]
    free = shutil.disk_usage(work_dir).free - MARGIN_BYTES
    fixed = images * (40 + 20 + 32)  # train.rec + train.idx + scores
    per_epoch = 2 * images * RECORD_BYTES
    fit = max(0, (free - fixed) // per_epoch)
    if fit >= epochs:
        return epochs, None
    if fit < 2:
        raise SystemExit(f"bench_scale: {free / 2**30:.1f} GiB free under {work_dir} (after leaving "
                         f"{MARGIN_BYTES / 2**30:.0f} GiB) holds not even 2 epochs of {images:,} samples "
                         f"({per_epoch / 2**30:.1f} GiB each); use --dir on a larger disk or --scale casia")
    return int(fit), (f"disk: {epochs} epochs need {(fixed + epochs * per_epoch) / 2**30:.0f} GiB, "
                      f"{free / 2**30:.0f} GiB free: simulating {fit} epochs; the records and the assemble "
                      f"step grow linearly with the epochs (x{epochs / fit:.2f} for {epochs})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write {step: {seconds, peak_rss_gb, ...}} to this file")
    p.add_argument("--scale", choices=sorted(SCALES), default="glint360k")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the simulated training (default: the scale's)")
    p.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(*flag("mem_cap_gb"), type=float, default=13.0, help="stop a step whose anonymous memory passes this")
    p.add_argument("--keep", action="store_true", help="keep the epoch files after assembling, and the folder")
    p.add_argument("--only", default=None, metavar="STEP,...",
                   help="run only these steps after the set-up (the records are always written), e.g. "
                        "clean:trajectory,select:entropy; the steps after the selections need a select: step")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.epochs = args.epochs or SCALES[args.scale][3]

    if args.step:  # a child: one step, its result beside the work folder's files
        work = Path(args.work)
        result = run_step(args.step, work, args.scale, args.epochs, args.seed)
        (work / f"result-{args.step.replace(':', '_')}.json").write_text(json.dumps(result))
        return 0

    names = step_names()
    if args.only:
        asked_steps = [x.strip() for x in args.only.split(",") if x.strip()]
        unknown = [x for x in asked_steps if x not in names]
        if unknown:
            p.error(f"--only: unknown steps {unknown}; valid: {', '.join(names)}")
        if set(asked_steps) & set(LATE_STEPS) and not any(x.startswith("select:") for x in asked_steps):
            p.error("--only: label_map, write_selection and plan_export read a selection's kept list: name a "
                    "select: step too (select:diffprob is used first)")
        names = [n for n in names if n in FIXED_STEPS or n in asked_steps]
    base = Path(args.dir or tempfile.gettempdir())
    epochs, disk_note = disk_plan(base, args.scale, args.epochs, args.keep)
    asked = args.epochs
    args.epochs = epochs
    images, ids, _, _ = SCALES[args.scale]
    print(f"bench_scale: {args.scale}, {images:,} images, {ids:,} identities, {epochs} epochs, top-{TOPK}; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    if disk_note:
        print(disk_note, flush=True)
    rows = {}
    work = Path(tempfile.mkdtemp(prefix="bench_scale-", dir=base))
    try:
        for name in names:
            row = in_fresh_process(name, args, work)
            rows[name] = row
            print(f"  {name:<28} {row['seconds']:>8.1f} s  peak RSS {row['peak_rss_gb']:6.2f} GB  "
                  f"anon {row['peak_anon_gb']:6.2f} GB  {row['status']}: {row.get('note', '')}", flush=True)
            if name == "assemble_history" and not args.keep:  # free the disk: the epoch files are assembled
                from utils.artifacts import paths

                shutil.rmtree(paths.original_dir(_config(work, epochs)) / "probs", ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    print(f"\n{args.scale}: {images:,} images, {ids:,} identities, {epochs} epochs"
          + (f" (of {asked}: {disk_note})" if disk_note else ""))
    print("| step | seconds | peak RSS GB | peak anon GB | status | note |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} | {r['peak_anon_gb']:.2f} | {r['status']} | "
              f"{r.get('note', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    failed = [n for n, r in rows.items() if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
