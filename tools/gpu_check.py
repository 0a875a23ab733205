"""The one-call GPU check (`bash tools/gpu_check.sh`): every GPU figure of docs/speed.md.

    bash tools/gpu_check.sh                          # one GPU: iresnet50 + CosFace at 112 px (about 7 min on an H200)
    bash tools/gpu_check.sh --json out/gpu.json      # the figures as JSON too
    bash tools/gpu_check.sh --dry_run                # the same sections on CPU at toy sizes (smallnet, 32 px)

Sections, in order, each a header line `== name ==` and its numbers:
  env        torch, device, bf16 support, CPU cores, the GPU's clocks and driver (nvidia-smi)
  data       a synthetic RecordIO dataset made for the loader and the loss curves (JPEG, like the real sets)
  loader     images/s of the RecordIO loader alone (decode + augmentation + collation in --workers processes):
             the ceiling of every end-to-end figure below
  train      images/s of the paper-style loop (fp32, NCHW, host-side scaling, SGD's loop over tensors) and of
             ours (bf16 autocast, channels_last, fused SGD, without and with torch.compile) on batches already
             on the GPU, then the same loops fed by the real RecordIO loader, via tools/bench_train.py; with
             the on-device runs, where a step's time goes (torch.profiler's operator table of 5 steps and the
             share of the step the device was busy)
  score      images/s of eval_trainset's inner loop (forward + head.score), eager and compiled, on-device
             batches and through the RecordIO loader
  bf16       a short training run from the same weights on the same batches in fp32 and in bf16: the two
             loss curves side by side; they agree when the mean loss over the last 5 steps differs by at
             most 5% (bf16 keeps 8 bits of mantissa; a few dozen steps do not let the runs drift further)
  torchrun   `torchrun --nproc_per_node=1 train_everything.py` for a few steps: the DDP code path (NCCL on a
             GPU, gloo on CPU) with the per-epoch recording, checkpoint and verification
  pipeline   `python run_pipeline.py --profile tiny` end to end on the device (the dry run: its first 3 steps
             on the data above, 3 training steps)
  summary    the figures against the targets (docs/speed.md)

A section that fails prints its error and the check goes on with the next one; the exit status is 1 if any
section failed or a figure disagrees. The dry run uses the CPU, forces bf16 autocast for the curves (the
toolkit runs fp32 on CPU by default) and compiles with torch.compile's "eager" backend (graph capture without
inductor's C++ code generation, which takes minutes on CPU), so the test suite runs it in about a minute and
the script cannot rot.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from utils.runtime.cli import flag  # noqa: E402

_CORES = os.cpu_count() or 2
# What each mode runs: model, sizes, steps, data.
MODES = {
    "gpu": dict(device="cuda", network="iresnet50", image_size=112, batch_size=256, score_batch_size=512,
                embedding_size=512, num_classes=10572, steps=40, warmup=8, workers=max(2, min(14, _CORES - 2)),
                num_ids=300, curve_steps=40, ddp_steps=20, ddp_batch=128, timeout=420,
                pipeline=["--profile", "tiny"], pipeline_on_data=False),
    "dry-run": dict(device="cpu", network="smallnet", image_size=32, batch_size=32, score_batch_size=32,
                    embedding_size=64, num_classes=100, steps=3, warmup=1, workers=1, num_ids=12, curve_steps=6,
                    ddp_steps=3, ddp_batch=16, timeout=600,
                    # one epoch: no epoch a dynamic method could prune, so the static methods only
                    pipeline=["--profile", "tiny", "--stop_after", "3", "--methods", "rand,dynunc,diffprob",
                              "--set", "num_epoch=1", "lr_steps=1", "max_steps_per_epoch=3"], pipeline_on_data=True),
}
CURVE_TOLERANCE = 0.05  # relative difference of the mean loss over the last 5 steps, bf16 vs fp32
# docs/speed.md: iresnet50 + CosFace at 112 px on one H200.
TARGETS = {"train_end_to_end": 8000.0, "train_speedup_vs_paper": 4.0, "score": 25000.0}


def section(name: str):
    print(f"\n== {name} ==", flush=True)


# The dry run compiles with the "eager" backend: graph capture without inductor's C++ code generation.
_EAGER_COMPILE = ("import functools, runpy, sys, torch; "
                  "torch.compile = functools.partial(torch.compile, backend='eager'); "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


class Check:
    """The figures and the failed sections of one run."""

    def __init__(self, mode: dict, dry_run: bool):
        self.mode, self.dry_run = mode, dry_run
        self.figures: dict = {}
        self.failed: list = []

    def run(self, name: str, fn, *args):
        """Run one section and return what it returns (False when it raised). An exception is printed with its
        traceback, the section counts as failed (as does one that returns False) and the check goes on."""
        section(name)
        t = time.perf_counter()
        try:
            ok = fn(*args)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            ok = False
        if ok is False:
            self.failed.append(name)
            print(f"section {name}: FAILED", flush=True)
        self.figures.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        sys.stdout.flush()
        return ok

    def bench_train(self, loops: str, **over) -> list:
        """Rows {loop, dtype, compile, images_per_s, gflops, mfu} of tools/bench_train.py, run in its own process;
        other lines it prints (a profile) are passed through."""
        mode = self.mode
        opts = dict(network=mode["network"], loss="CosFace", embedding_size=mode["embedding_size"],
                    num_classes=mode["num_classes"], image_size=mode["image_size"], batch_size=mode["batch_size"],
                    steps=mode["steps"], warmup=mode["warmup"], dtype="bf16", loader="synthetic",
                    workers=mode["workers"], device=mode["device"], loops=loops)
        flags = [f"--{k}" for k in ("compile", "profile") if over.pop(k, False)]
        opts.update(over)
        cmd = [str(REPO / "tools" / "bench_train.py")] + [x for k, v in opts.items()
                                                          for x in (f"--{k.replace('_', '-')}", str(v))] + flags
        cmd = [sys.executable, "-c", _EAGER_COMPILE, *cmd] if self.dry_run else [sys.executable, *cmd]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=mode["timeout"])
        if r.returncode != 0:
            raise RuntimeError(f"tools/bench_train.py exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
        rows = []
        for line in r.stdout.splitlines():
            words = line.split()
            if words and words[0] in loops.split(",") and len(words) >= 7:  # loop device... dtype compile ips gflops mfu
                rows.append({"loop": words[0], "dtype": words[-5], "compile": words[-4] == "True",
                             "images_per_s": float(words[-3]), "gflops": float(words[-2]), "mfu": words[-1]})
            elif "--profile" in flags:
                print(line)
        if len(rows) != len(loops.split(",")):
            raise RuntimeError(f"tools/bench_train.py printed no row for every loop of {loops}:\n{r.stdout}")
        return rows

    def speed(self, key: str, label: str, r: dict):
        self.figures[key] = {k: r[k] for k in ("images_per_s", "dtype", "compile", "gflops", "mfu")}
        print(f"{label:<44} {r['dtype']:<6} compile={str(r['compile']):<5} {r['images_per_s']:>10.1f} images/s  "
              f"{r['gflops']:.2f} GFLOP/image  MFU {r['mfu']}", flush=True)


def env_section(c: Check, name: str):
    mode = c.mode
    device = torch.device(mode["device"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    c.figures["env"] = {"mode": name, "torch": torch.__version__, "device": gpu, "cores": _CORES,
                        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"mode {name}: torch {torch.__version__} (CUDA {torch.version.cuda}), device {gpu}, bf16 {bf16}, "
          f"{_CORES} CPU cores, {c.figures['env']['date']}; {mode['network']} + CosFace, batch {mode['batch_size']}, "
          f"{mode['image_size']} px, {mode['workers']} loader workers", flush=True)
    if device.type == "cuda" and shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        r = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=60)
        print(f"nvidia-smi ({q}): {r.stdout.strip() or r.stderr.strip()}")
        c.figures["env"]["nvidia_smi"] = r.stdout.strip()


def make_dataset(c: Check, folder: Path) -> Path:
    mode = c.mode
    rec = folder / "synthetic"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "make_synthetic_dataset.py"), "--out", str(rec), "--num_ids",
                    str(mode["num_ids"]), "--image_size", str(mode["image_size"]), "--val_pairs", "200",
                    "--ijb_templates", "0", "--quiet"], check=True, cwd=REPO, timeout=mode["timeout"])
    from utils.data.datasets import open_dataset

    n = len(open_dataset(rec))
    size = sum(f.stat().st_size for f in rec.glob("train.rec")) / n
    print(f"synthetic RecordIO: {n:,} images of {mode['num_ids']} identities at {mode['image_size']} px "
          f"({size / 1024:.1f} KiB per record), made in {time.perf_counter() - t:.1f} s", flush=True)
    return rec


def loader_section(c: Check, rec: Path):
    r = c.bench_train("load", rec=rec, batch_size=c.mode["batch_size"], steps=4 * c.mode["steps"])[0]
    c.speed("loader", f"RecordIO loader alone ({c.mode['workers']} workers)", r)


def train_section(c: Check, rec: Path):
    workers = c.mode["workers"]
    for loader, extra in (("synthetic", {}), ("recordio", {"loader": "recordio", "rec": rec})):
        where = "on-device batches" if loader == "synthetic" else f"RecordIO loader, {workers} workers"
        tag = "device" if loader == "synthetic" else "end_to_end"
        profile = loader == "synthetic"  # where the step's time goes, in the same processes as the timing
        if profile:
            print("-- profiles of the paper-style loop and ours (eager), on-device batches", flush=True)
        plain, ours = c.bench_train("plain,ours", profile=profile, **extra)
        if profile:
            print("-- profile of ours (compiled), on-device batches", flush=True)
        compiled = c.bench_train("ours", compile=True, profile=profile, **extra)[0]
        if profile:
            print("-- images/s", flush=True)
        c.speed(f"train_paper_{tag}", f"paper fp32 ({where})", plain)
        c.speed(f"train_ours_{tag}", f"ours ({where})", ours)
        c.speed(f"train_ours_compiled_{tag}", f"ours ({where})", compiled)


def score_section(c: Check, rec: Path):
    batch = c.mode["score_batch_size"]
    c.speed("score_device", f"score, batch {batch} (on-device batches)", c.bench_train("score", batch_size=batch)[0])
    compiled = c.bench_train("score", batch_size=batch, compile=True)[0]
    c.speed("score_compiled_device", f"score, batch {batch} (on-device batches)", compiled)
    r = c.bench_train("score", batch_size=batch, loader="recordio", rec=rec)[0]
    c.speed("score_end_to_end", f"score, batch {batch} (RecordIO loader)", r)


def loss_curves(c: Check, rec: Path) -> bool:
    """fp32 and bf16 training from the same weights on the same batches; True when they agree."""
    from torch.utils.data import DataLoader

    from backbones import get_model
    from losses import ShardedClassifier
    from utils.data.datasets import open_dataset
    from utils.training.loop import train_step
    from utils.training.optimizer import make_sgd

    mode = c.mode
    device = torch.device(mode["device"])
    dataset = open_dataset(rec)
    loader = DataLoader(dataset, batch_size=mode["batch_size"], shuffle=False, drop_last=True,
                        num_workers=mode["workers"])
    batches = []
    for images, labels, _ in loader:  # a fixed sequence, on the device, cycled
        batches.append((images.to(device), labels.to(device)))
        if len(batches) == mode["curve_steps"]:
            break
    curves = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        backbone = get_model(mode["network"], num_features=mode["embedding_size"],
                             input_size=mode["image_size"]).to(device)
        head = ShardedClassifier("CosFace", mode["embedding_size"], dataset.num_classes).to(device)
        optimizer = make_sgd(backbone, head, device, lr=0.1, momentum=0.9, weight_decay=5e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        flips = torch.Generator().manual_seed(0)
        curve = []
        for step in range(mode["curve_steps"]):
            images, labels = batches[step % len(batches)]
            loss = train_step(backbone, head, optimizer, scaler, images, labels, device=device, amp_dtype=amp,
                              channels_last=device.type == "cuda", grad_clip=5.0,
                              clip_params=list(backbone.parameters()), flip_gen=flips)[0]
            curve.append(float(loss.detach()))
        curves[name] = curve
    print(f"{'step':>5} {'fp32 loss':>10} {'bf16 loss':>10} {'rel diff':>9}")
    for step, (a, b) in enumerate(zip(curves["fp32"], curves["bf16"]), start=1):
        print(f"{step:>5} {a:>10.4f} {b:>10.4f} {abs(b - a) / abs(a):>9.4f}")
    last = min(5, len(curves["fp32"]))
    mean32, mean16 = (sum(x[-last:]) / last for x in (curves["fp32"], curves["bf16"]))
    diff = abs(mean16 - mean32) / abs(mean32)
    agree = diff <= CURVE_TOLERANCE
    c.figures["bf16"] = {"fp32": curves["fp32"], "bf16": curves["bf16"], "relative_difference": diff,
                         "agree": agree}
    print(f"mean loss over the last {last} steps: fp32 {mean32:.4f}, bf16 {mean16:.4f}, relative difference "
          f"{diff:.4f} (tolerance {CURVE_TOLERANCE}): {'agree' if agree else 'DISAGREE'}", flush=True)
    return agree


def _tail(r: subprocess.CompletedProcess, ok: bool) -> str:
    lines = (r.stdout + r.stderr).strip().splitlines()
    return "\n".join(lines[-5:] if ok else lines[-60:])


def torchrun_section(c: Check, folder: Path, rec: Path) -> bool:
    """A few steps of train_everything.py under torchrun with one process: DDP, the recorder, a checkpoint."""
    mode = c.mode
    out = folder / "torchrun"
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "train_everything.py"), "--rec", str(rec), "--output", str(out), "--network", mode["network"],
           "--embedding_size", str(mode["embedding_size"]), "--batch_size", str(mode["ddp_batch"]),
           "--num_epoch", "1", "--lr_steps", "1", "--max_steps_per_epoch", str(mode["ddp_steps"]),
           "--num_workers", str(min(mode["workers"], 8)), "--frequent", "5", "--record_topk", "4",
           "--device", mode["device"]]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=mode["timeout"])
    ok = r.returncode == 0
    print(_tail(r, ok))
    ckpts = sorted(p.name for p in out.rglob("epoch_*.pt"))
    c.figures["torchrun"] = {"exit": r.returncode, "seconds": round(time.perf_counter() - t, 1), "checkpoints": ckpts}
    print(f"torchrun --nproc_per_node=1 train_everything.py ({mode['ddp_steps']} steps of {mode['ddp_batch']}): "
          f"exit status {r.returncode}, {time.perf_counter() - t:.1f} s; checkpoints {ckpts}", flush=True)
    return ok and bool(ckpts)


def pipeline_section(c: Check, folder: Path, rec: Path) -> bool:
    mode = c.mode
    t = time.perf_counter()
    on_data = ["--rec", str(rec)] if mode["pipeline_on_data"] else []
    r = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "--out", str(folder / "pipeline"), *on_data,
                        *mode["pipeline"]], cwd=REPO, capture_output=True, text=True, timeout=mode["timeout"])
    print(_tail(r, r.returncode == 0))
    c.figures["pipeline"] = {"exit": r.returncode, "seconds": round(time.perf_counter() - t, 1)}
    print(f"run_pipeline.py {' '.join(mode['pipeline'])}: exit status {r.returncode}, "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    return r.returncode == 0


def summary(c: Check) -> bool:
    """The figures against the targets; on CPU (the dry run) the targets are printed, not judged."""
    f = c.figures
    ips = {k: v["images_per_s"] for k, v in f.items() if isinstance(v, dict) and "images_per_s" in v}
    rows = []
    if "train_ours_compiled_end_to_end" in ips:
        rows.append(("training, ours compiled, end to end", ips["train_ours_compiled_end_to_end"],
                     TARGETS["train_end_to_end"], "images/s"))
    if "train_ours_compiled_end_to_end" in ips and "train_paper_end_to_end" in ips:
        rows.append(("  against the paper-style loop, end to end",
                     ips["train_ours_compiled_end_to_end"] / ips["train_paper_end_to_end"],
                     TARGETS["train_speedup_vs_paper"], "x"))
    best_score = max((ips[k] for k in ("score_device", "score_compiled_device") if k in ips), default=None)
    if best_score is not None:
        rows.append(("scoring, best on-device", best_score, TARGETS["score"], "images/s"))
    met = True
    for label, value, target, unit in rows:
        hit = value >= target
        met &= hit
        verdict = ("met" if hit else "MISSED") if not c.dry_run else "(not judged on CPU)"
        print(f"{label:<44} {value:>10.1f} {unit:<9} target >= {target:g}: {verdict}")
    if "loader" in ips and "train_ours_compiled_device" in ips:
        print(f"{'loader alone / model alone (ours compiled)':<44} {ips['loader']:>10.1f} / "
              f"{ips['train_ours_compiled_device']:.1f} images/s: the end-to-end ceiling is the smaller")
    f["targets_met"] = met
    return True  # a missed speed target is a finding to report, not a failure of the check


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(*flag("dry_run"), action="store_true", help="the reduced form on CPU (what the test suite runs)")
    p.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--only", default=None,
                   help="comma-separated sections to run (env, data and summary always run), e.g. train,score")
    args = p.parse_args(argv)
    name = "dry-run" if args.dry_run else "gpu"
    mode = MODES[name]
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; `bash tools/gpu_check.sh --dry_run` runs the reduced form on CPU",
              file=sys.stderr)
        return 2
    sections = ["loader", "train", "score", "bf16", "torchrun", "pipeline"]
    wanted = sections if args.only is None else args.only.split(",")
    unknown = sorted(set(wanted) - set(sections))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; choose from {sections}")
    if args.dry_run:
        torch.set_num_threads(max(1, _CORES - 1))
    t0 = time.perf_counter()
    c = Check(mode, args.dry_run)
    c.run("env", env_section, c, name)
    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        rec = c.run("data", make_dataset, c, tmp)
        steps = {"loader": (loader_section, c, rec), "train": (train_section, c, rec),
                 "score": (score_section, c, rec),
                 "bf16": (loss_curves, c, rec), "torchrun": (torchrun_section, c, tmp, rec),
                 "pipeline": (pipeline_section, c, tmp, rec)}
        for s in sections:
            if s in wanted:
                c.run(s, *steps[s])
    c.run("summary", summary, c)
    ok = not c.failed
    c.figures["failed_sections"] = c.failed
    c.figures["seconds_total"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(c.figures, indent=1))
    print(f"\ngpu_check ({name}): {'ok' if ok else 'FAILED: ' + ', '.join(c.failed)} in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
