"""The one-call GPU check (`bash tools/gpu_check.sh`): every figure the README's "Speed" section needs from a GPU.

    bash tools/gpu_check.sh                # one GPU: iresnet50 + CosFace at 112 px, batch 256 (< 8 min on an H200)
    bash tools/gpu_check.sh --dry-run      # the same sections on CPU at toy sizes (smallnet, 32 px, a few steps)

Sections, in order, each a header line `== name ==` and its numbers:
  env        torch, device, bf16 support
  data       a synthetic RecordIO dataset made for the loader and the loss curves
  train      images/s of the paper-style loop (fp32, NCHW, host-side scaling) and of ours (bf16 autocast,
             channels_last, without and with torch.compile) on batches already on the GPU, then the same
             loops fed by the real RecordIO loader (DataLoader, --workers processes), via tools/bench_train.py
  score      images/s of eval_trainset's inner loop (forward + head.score), on-device batches
  bf16       a short training run from the same weights on the same batches in fp32 and in bf16: the two
             loss curves side by side; they agree when the mean loss over the last 5 steps differs by at
             most 5% (bf16 keeps 8 bits of mantissa; a few dozen steps do not let the runs drift further)
  pipeline   `python run_pipeline.py --profile tiny` end to end on the device (the dry run: its first 3 steps
             on the data above, 3 training steps)

The dry run uses the CPU, forces bf16 autocast for the curves (the toolkit runs fp32 on CPU by default) and
compiles with torch.compile's "eager" backend (graph capture without inductor's C++ code generation, which
takes minutes on CPU), so the test suite runs it in about a minute and the script cannot rot.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# What each mode runs: model, sizes, steps, data.
MODES = {
    "gpu": dict(device="cuda", network="iresnet50", image_size=112, batch_size=256, embedding_size=512,
                num_classes=10572, steps=50, warmup=10, workers=8, num_ids=300, curve_steps=40,
                pipeline=["--profile", "tiny"], pipeline_on_data=False),
    "dry-run": dict(device="cpu", network="smallnet", image_size=32, batch_size=32, embedding_size=64,
                    num_classes=100, steps=3, warmup=1, workers=1, num_ids=12, curve_steps=6,
                    pipeline=["--profile", "tiny", "--stop-after", "3", "--set", "num_epoch=1", "lr_steps=1",
                              "max_steps_per_epoch=3"], pipeline_on_data=True),
}
CURVE_TOLERANCE = 0.05  # relative difference of the mean loss over the last 5 steps, bf16 vs fp32


def section(name: str):
    print(f"\n== {name} ==", flush=True)


# The dry run compiles with the "eager" backend: graph capture without inductor's C++ code generation.
_EAGER_COMPILE = ("import functools, runpy, sys, torch; "
                  "torch.compile = functools.partial(torch.compile, backend='eager'); "
                  "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def bench_train(mode: dict, loops: str, dry_run: bool, **over) -> list:
    """Rows {loop, dtype, compile, images_per_s, gflops, mfu} of tools/bench_train.py, run in its own process."""
    opts = dict(network=mode["network"], loss="CosFace", embedding_size=mode["embedding_size"],
                num_classes=mode["num_classes"], image_size=mode["image_size"], batch_size=mode["batch_size"],
                steps=mode["steps"], warmup=mode["warmup"], dtype="bf16", loader="synthetic",
                workers=mode["workers"], device=mode["device"], loops=loops)
    compiled = over.pop("compile", False)
    opts.update(over)
    cmd = [str(REPO / "tools" / "bench_train.py")] + [x for k, v in opts.items()
                                                      for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd += ["--compile"] if compiled else []
    cmd = [sys.executable, "-c", _EAGER_COMPILE, *cmd] if dry_run else [sys.executable, *cmd]
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in loops.split(",") and len(words) >= 7:  # loop device... dtype compile ips gflops mfu
            rows.append({"loop": words[0], "dtype": words[-5], "compile": words[-4], "images_per_s": float(words[-3]),
                         "gflops": float(words[-2]), "mfu": words[-1]})
    if len(rows) != len(loops.split(",")):
        raise RuntimeError(f"tools/bench_train.py printed no row for every loop of {loops}:\n{out}")
    return rows


def speed_row(label: str, r: dict):
    print(f"{label:<42} {r['dtype']:<6} compile={r['compile']:<5} {r['images_per_s']:>10.1f} images/s  "
          f"{r['gflops']:.2f} GFLOP/image  MFU {r['mfu']}", flush=True)


def make_dataset(mode: dict, folder: Path) -> Path:
    rec = folder / "synthetic"
    t = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "make_synthetic_dataset.py"), "--out", str(rec), "--num-ids",
                    str(mode["num_ids"]), "--image-size", str(mode["image_size"]), "--val-pairs", "200",
                    "--ijb-templates", "0", "--quiet"],
                   check=True, cwd=REPO)
    from utils.data import open_dataset

    print(f"synthetic RecordIO: {len(open_dataset(rec)):,} images of {mode['num_ids']} identities at "
          f"{mode['image_size']} px, made in {time.perf_counter() - t:.1f} s", flush=True)
    return rec


def loss_curves(mode: dict, rec: Path) -> bool:
    """fp32 and bf16 training from the same weights on the same batches; True when they agree."""
    from torch.utils.data import DataLoader

    from backbones import get_model
    from losses import ShardedClassifier
    from utils.data import open_dataset
    from utils.training import train_step

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
        optimizer = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=0.1,
                                    momentum=0.9, weight_decay=5e-4)
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
    mean32, mean16 = (sum(c[-last:]) / last for c in (curves["fp32"], curves["bf16"]))
    diff = abs(mean16 - mean32) / abs(mean32)
    agree = diff <= CURVE_TOLERANCE
    print(f"mean loss over the last {last} steps: fp32 {mean32:.4f}, bf16 {mean16:.4f}, relative difference "
          f"{diff:.4f} (tolerance {CURVE_TOLERANCE}): {'agree' if agree else 'DISAGREE'}", flush=True)
    return agree


def run_pipeline(mode: dict, folder: Path, rec: Path) -> bool:
    t = time.perf_counter()
    on_data = ["--rec", str(rec)] if mode["pipeline_on_data"] else []
    r = subprocess.run([sys.executable, str(REPO / "run_pipeline.py"), "--out", str(folder / "pipeline"), *on_data,
                        *mode["pipeline"]], cwd=REPO, capture_output=True, text=True)
    tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
    print("\n".join(tail))
    print(f"run_pipeline.py {' '.join(mode['pipeline'])}: exit status {r.returncode}, "
          f"{time.perf_counter() - t:.1f} s", flush=True)
    return r.returncode == 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the reduced form on CPU (what the test suite runs)")
    p.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    args = p.parse_args(argv)
    name = "dry-run" if args.dry_run else "gpu"
    mode = MODES[name]
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible; `bash tools/gpu_check.sh --dry-run` runs the reduced form on CPU",
              file=sys.stderr)
        return 2
    if args.dry_run:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    t0 = time.perf_counter()
    ok = True

    section("env")
    device = torch.device(mode["device"])
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else True
    print(f"mode {name}: torch {torch.__version__}, device {gpu}, bf16 {bf16}, {os.cpu_count()} CPU cores; "
          f"{mode['network']} + CosFace, batch {mode['batch_size']}, {mode['image_size']} px", flush=True)

    with tempfile.TemporaryDirectory(prefix="gpu_check-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        section("data")
        rec = make_dataset(mode, tmp)

        section("train")
        for loader, extra in (("synthetic", {}), ("recordio", {"loader": "recordio", "rec": rec})):
            where = "on-device batches" if loader == "synthetic" else f"RecordIO loader, {mode['workers']} workers"
            plain, ours = bench_train(mode, "plain,ours", args.dry_run, **extra)
            speed_row(f"paper fp32 ({where})", plain)
            speed_row(f"ours ({where})", ours)
            speed_row(f"ours ({where})", bench_train(mode, "ours", args.dry_run, compile=True, **extra)[0])

        section("score")
        speed_row("score (on-device batches)", bench_train(mode, "score", args.dry_run)[0])

        section("bf16")
        ok &= loss_curves(mode, rec)

        section("pipeline")
        ok &= run_pipeline(mode, tmp, rec)

    print(f"\ngpu_check ({name}): {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
