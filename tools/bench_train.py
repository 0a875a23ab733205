"""Training-step throughput: images/s and model FLOPs utilisation, for docs/speed.md.

Two inputs:
  synthetic  uint8 batches already on the device: the step alone (backbone + head + optimizer)
  recordio   the real loader (RecordDataset + DataLoader workers) feeding the same step: end to end

and two loops:
  ours       utils.training.loop.train_step: flip/scale on the device, autocast (bf16 on GPUs that have it),
             channels_last, fused SGD (on CUDA), optional torch.compile
  plain      the paper repository's recipe: fp32, NCHW, images scaled on the host

    python tools/bench_train.py --network iresnet50 --batch_size 256 --num_classes 10572        # on a GPU
    python tools/bench_train.py --network smallnet --image_size 32 --batch_size 64 --device cpu
    python tools/bench_train.py --rec data/synthetic --loader recordio --workers 8

With --dynamic METHOD it also times dynamic pruning's bookkeeping (utils/training/dynamic.py) in the toolkit's step,
as train_one_epoch pays it at a training set of --num_samples (CASIA-WebFace: 490,623 images): per step the lr set
by epochs, `batch_weights`, the weighted head that returns per-sample losses and `add`; per epoch `begin` (plan the
epoch) and `end` (gather and fold its losses into the store), amortised over the planned epoch's steps. The two
steps, ours without and with it, alternate one by one on one model, so noise reaches both alike; each of --rounds
rounds (a pruning epoch) gives a ratio of the median steps, and the median ratio is reported:

    python tools/bench_train.py --network smallnet --image_size 32 --batch_size 64 --num_classes 500 \
        --embedding_size 128 --device cpu --dynamic infobatch
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbones import get_model  # noqa: E402
from config.config import CHOICES, DATASET_PRESETS, Config  # noqa: E402
from losses import ShardedClassifier  # noqa: E402
from utils.runtime.context import Context  # noqa: E402
from utils.training.dynamic import DYNAMIC_METHODS, DynamicPruning  # noqa: E402
from utils.training.loop import train_step  # noqa: E402
from utils.training.optimizer import epoch_lr_factor, make_sgd  # noqa: E402
from utils.models.embedding import amp_dtype, forward_uint8  # noqa: E402
from utils.runtime.cli import flag  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) used for MFU; fp32 runs are still reported against bf16 peak.
PEAK_FLOPS = {"H200": 790e12, "H100": 790e12, "A100": 312e12}


def peak_flops(device: torch.device, override: float | None):
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_image(model, image_size: int, device) -> float:
    """Forward FLOPs of one image, counted by torch's FlopCounterMode (x3 for forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(2, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2


def synthetic_batches(args, device, num_classes):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=g).to(device)
    labels = torch.randint(0, num_classes, (args.batch_size,), generator=g).to(device)
    while True:
        yield images, labels


def recordio_batches(args):
    from torch.utils.data import DataLoader

    from utils.data.datasets import open_dataset

    ds = open_dataset(args.rec)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=args.workers > 0,
                        prefetch_factor=4 if args.workers else None)
    while True:
        for images, labels, _ in loader:
            yield images, labels


def plain_step(backbone, head, optimizer, images, labels, device):
    """The paper repository's step: host-side scaling, fp32, NCHW, backbone-only grad clip."""
    x = images.float().sub_(127.5).div_(127.5)
    flip = torch.rand(x.shape[0]) < 0.5
    x[flip] = x[flip].flip(-1)
    x, labels = x.to(device), labels.to(device)
    loss, _ = head(backbone(x), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5.0)
    optimizer.step()
    return loss


def bench_loader(args, device) -> dict:
    """The RecordIO loader alone (decode, augmentation, collation in --workers processes): its images/s is
    the most any training loop fed by it can reach."""
    batches = recordio_batches(args)
    for _ in range(args.warmup):
        next(batches)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    ips = args.steps * args.batch_size / (time.perf_counter() - t0)
    return {"loop": "load", "device": "cpu", "images_per_s": ips, "gflops_per_image": 0.0, "mfu": None,
            "dtype": "uint8", "compile": False}


def profile_steps(step, device, step_ms: float, steps: int = 5, rows: int = 15):
    """torch.profiler over `steps` more steps: where one step's time goes, by operator (device time on CUDA),
    and the share of a step (`step_ms`, timed without the profiler) during which the device was busy."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {steps} steps, sorted by {key} (times per {steps} steps):")
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))
    if device.type == "cuda":  # kernel time alone: the operators' rows hold their kernels' time again
        from torch.autograd import DeviceType

        busy = sum(e.self_device_time_total for e in prof.key_averages()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3 / steps
        print(f"profile: device busy {busy:.2f} ms per step, against {step_ms:.2f} ms per step timed without the "
              f"profiler: the device idles {max(0.0, 100 * (1 - busy / step_ms)):.0f}% of a step")


def pick_device(args) -> torch.device:
    return torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def build(args, loop: str, device: torch.device) -> SimpleNamespace:
    """The model, head, optimizer and batches of a training or scoring loop (`loop`: plain, ours, score)."""
    torch.manual_seed(0)
    backbone = get_model(args.network, num_features=args.embedding_size, input_size=args.image_size).to(device)
    head = ShardedClassifier(args.loss, args.embedding_size, args.num_classes).to(device)
    ours = loop in ("ours", "score")
    optimizer = make_sgd(backbone, head, device if ours else torch.device("cpu"), lr=0.01, momentum=0.9,
                         weight_decay=5e-4)  # ours: fused on CUDA (the toolkit's); plain: the loop over tensors
    fpi = flops_per_image(backbone, args.image_size, device)
    amp = amp_dtype(args.dtype, device) if ours else None
    channels_last = ours
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # both loops: as the toolkit and InsightFace's trainer
    compiled = ours and args.compile
    model = torch.compile(backbone, mode=args.compile_mode) if compiled else backbone
    graphs = compiled and args.compile_mode == "reduce-overhead"  # CUDA graphs: a new step frees the last one's outputs
    scaler = torch.amp.GradScaler(enabled=amp == torch.float16)
    batches = recordio_batches(args) if args.loader == "recordio" else \
        synthetic_batches(args, device if ours else torch.device("cpu"), args.num_classes)
    clip = list(backbone.parameters())
    backbone.train()
    return SimpleNamespace(device=device, backbone=backbone, head=head, optimizer=optimizer, fpi=fpi, amp=amp,
                           channels_last=channels_last, compiled=compiled, model=model, graphs=graphs, scaler=scaler,
                           batches=batches, clip=clip)


def ours_step(s: SimpleNamespace, images, labels, **dynamic):
    """utils.training.loop.train_step as train_one_epoch calls it; `dynamic`: weights=..., per_sample=True."""
    if s.graphs:
        torch.compiler.cudagraph_mark_step_begin()
    return train_step(s.model, s.head, s.optimizer, s.scaler, images, labels, device=s.device, amp_dtype=s.amp,
                      channels_last=s.channels_last, grad_clip=5.0, clip_params=s.clip, **dynamic)


def bench(args, loop: str) -> dict:
    device = pick_device(args)
    if loop == "load":
        return bench_loader(args, device)
    s = build(args, loop, device)
    head, model, amp, compiled, batches = s.head, s.model, s.amp, s.compiled, s.batches

    @torch.no_grad()
    def score_step():  # eval_trainset.py's inner loop: forward + head.score
        images, labels = next(batches)
        if s.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        emb = forward_uint8(model, images, device, amp, s.channels_last)
        return head.score(emb, labels.to(device))["gt_prob"]

    def training_step():
        images, labels = next(batches)
        if loop == "ours":
            return ours_step(s, images, labels)[0]
        return plain_step(model, head, s.optimizer, images, labels, device)

    if loop == "score":
        s.backbone.eval()
    step = score_step if loop == "score" else training_step
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.detach().sum().item()  # waits for the device
    seconds = time.perf_counter() - t0
    if args.profile:
        try:
            profile_steps(step, device, 1e3 * seconds / args.steps)
        except Exception as e:  # the profile is a diagnosis; the timing above stands without it
            print(f"profile failed: {type(e).__name__}: {e}")
    ips = args.steps * args.batch_size / seconds
    peak = peak_flops(device, args.peak_tflops)
    return {"loop": loop, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "images_per_s": ips, "gflops_per_image": s.fpi / 1e9,
            "mfu": ((1 if loop == "score" else 3) * s.fpi * ips / peak) if peak else None,
            "dtype": str(amp).replace("torch.", "") if amp else "fp32", "compile": bool(compiled)}


def per_call(fn, count: int, sync) -> float:
    """Seconds per call of fn(i) for i in range(count), the device's work included (nan for no call)."""
    if count <= 0:
        return float("nan")
    sync()
    t0 = time.perf_counter()
    for i in range(count):
        fn(i)
    sync()
    return (time.perf_counter() - t0) / count


def alternating(fns: dict, count: int, sync) -> dict:
    """Median seconds of a call of each fn(i), i in range(count), the calls interleaved one by one and the order
    turned each time: a change of the machine's speed (other processes, clocks) reaches every fn alike. Each call
    is synced, so on a GPU a fn's host work is not hidden behind the device's: an overhead is if anything overstated."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(count):
        for name in names if i % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            fns[name](i)
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_dynamic(args) -> dict:
    """Ours without and with dynamic pruning's bookkeeping (the module docstring) on one model, in `args.rounds`
    rounds. A round is one pruning epoch of the dynamic loop as train_one_epoch walks it: `begin`, `args.steps` steps
    with the bookkeeping alternating one by one with plain steps, the epoch's other batches with the bookkeeping
    alone (lr, batch_weights, add: each timed apart, so that 7,000 full steps need not run), `end`.
    Returns the rounds' figures (seconds) and their medians."""
    device = pick_device(args)
    s = build(args, "ours", device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, batch = args.num_samples, args.batch_size
    webface = DATASET_PRESETS["webface"]  # the schedule a CASIA-WebFace run follows (epoch_lr_factor reads it)
    cfg = Config(dynamic_method=args.dynamic, num_epoch=webface["num_epoch"], lr_steps=list(webface["lr_steps"]))
    dynamic = DynamicPruning(cfg, Context(device=device), np.arange(n), n)
    for group in s.optimizer.param_groups:  # prepare_run's LambdaLR records it; the dynamic loop scales it by epoch
        group.setdefault("initial_lr", group["lr"])
    gen = torch.Generator().manual_seed(1)
    epoch_loss = (20 * torch.rand(n // batch * batch, generator=gen)).to(device).view(-1, batch).unbind(0)

    def epoch_batches(kept: np.ndarray) -> list:
        """The sample indices of an epoch's batches: the sampler's shuffle of the kept positions (pinned on CUDA,
        as the loader's)."""
        order = torch.from_numpy(kept)[torch.randperm(kept.size, generator=gen)]
        rows = order[: order.numel() // batch * batch].view(-1, batch)
        return list((rows.pin_memory() if device.type == "cuda" else rows).unbind(0))

    def set_lr(epoch, step, steps):  # train_one_epoch's dynamic branch: the schedule follows epochs of any length
        factor = epoch_lr_factor(cfg, epoch, step, steps)
        for group in s.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    def plain(_):
        images, labels = next(s.batches)
        ours_step(s, images, labels)

    embeddings = torch.randn(batch, args.embedding_size, device=device, requires_grad=True)
    head_labels = torch.randint(0, args.num_classes, (batch,), generator=gen).to(device)

    def pruning_epoch(epoch: int, warmup: int) -> dict:
        t = {}
        sync()
        t0 = time.perf_counter()
        plan = dynamic.begin(epoch)
        sync()
        t["begin"] = time.perf_counter() - t0
        index = epoch_batches(plan.kept)
        steps = len(index)
        t["steps"], t["kept"] = steps, int(plan.kept.size)

        def step(i):  # train_one_epoch's dynamic branch
            images, labels = next(s.batches)
            set_lr(epoch, i, steps)
            out = ours_step(s, images, labels, weights=dynamic.batch_weights(index[i % steps]), per_sample=True)
            dynamic.add(index[i % steps], out[3])

        for i in range(warmup):
            plain(i)
            step(i)
        t.update(alternating({"plain_step": plain, "step": lambda i: step(warmup + i)}, args.steps, sync))
        weights = dynamic.batch_weights(index[0])
        t.update(alternating({"head_plain": lambda i: s.head(embeddings, head_labels)[0].backward(),
                              "head_dynamic": lambda i: s.head(embeddings, head_labels, weights,
                                                               per_sample=True)[0].backward()}, args.steps, sync))
        done = warmup + args.steps
        rest = max(0, steps - done)
        t["lr"] = per_call(lambda i: set_lr(epoch, done + i, steps), rest, sync)
        t["batch_weights"] = per_call(lambda i: dynamic.batch_weights(index[done + i]), rest, sync)
        t["add"] = per_call(lambda i: dynamic.add(index[done + i], epoch_loss[i]), rest, sync)
        sync()
        t0 = time.perf_counter()
        dynamic.end()
        sync()
        t["end"] = time.perf_counter() - t0
        return t

    for i in range(args.warmup):
        plain(i)
    dynamic.begin(0)  # the first epoch trains on every sample: its losses fill the store the pruning epochs read
    for i, rows in enumerate(epoch_batches(np.arange(n))):
        dynamic.add(rows, epoch_loss[i])
    dynamic.end()
    rounds = []
    for r in range(args.rounds):
        t = pruning_epoch(1 + r, args.warmup if r == 0 else 0)
        t["epoch_per_step"] = (t["begin"] + t["end"]) / t["steps"]
        t["dynamic_step"] = t["step"] + t["epoch_per_step"]
        t["ratio"] = t["dynamic_step"] / t["plain_step"]
        # the parts alone: less noisy than the difference of two step timings on a shared machine
        t["parts"] = t["lr"] + t["batch_weights"] + t["add"] + t["head_dynamic"] - t["head_plain"] + t["epoch_per_step"]
        rounds.append(t)
    median = {k: statistics.median(t[k] for t in rounds) for k in rounds[0]}
    return {"method": args.dynamic, "num_samples": n, "batch_size": batch, "rounds": rounds, "median": median,
            "ratios": [t["ratio"] for t in rounds]}


def print_dynamic(r: dict):
    m, b = r["median"], r["batch_size"]
    us, ms = 1e6, 1e3
    print(f"dynamic {r['method']}: ours {b / m['plain_step']:.1f} images/s, with dynamic {b / m['dynamic_step']:.1f} "
          f"images/s (median steps): ratio {m['ratio']:.4f} ({100 * (m['ratio'] - 1):+.2f}% time per step; median of "
          f"{len(r['ratios'])} rounds: {' '.join(f'{x:.4f}' for x in r['ratios'])}); per epoch plan "
          f"{ms * m['begin']:.1f} ms, fold {ms * m['end']:.1f} ms, over {m['steps']:.0f} steps of {b} "
          f"({m['kept']:.0f} of {r['num_samples']} samples kept)")
    print(f"dynamic breakdown per step: lr {us * m['lr']:.1f} us, batch_weights {us * m['batch_weights']:.1f} us, "
          f"add {us * m['add']:.1f} us, head forward+backward {ms * m['head_dynamic']:.3f} ms weighted per-sample vs "
          f"{ms * m['head_plain']:.3f} ms plain, epoch plan+fold {us * m['epoch_per_step']:.1f} us; parts "
          f"{us * m['parts']:.1f} us = {100 * m['parts'] / m['plain_step']:.2f}% of a step; step "
          f"{ms * m['plain_step']:.2f} ms ours, {ms * m['step']:.2f} ms with dynamic (+ the epoch's share)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", default="iresnet50")
    p.add_argument("--loss", default="CosFace")
    p.add_argument(*flag("embedding_size"), type=int, default=512)
    p.add_argument(*flag("num_classes"), type=int, default=10572, help="head classes (CASIA-WebFace: 10572)")
    p.add_argument(*flag("image_size"), type=int, default=112)
    p.add_argument(*flag("batch_size"), type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (ours)")
    p.add_argument(*flag("compile_mode"), default="default", choices=CHOICES["compile_mode"],
                   help="torch.compile's mode (reduce-overhead: CUDA graphs)")
    p.add_argument("--loader", default="synthetic", choices=["synthetic", "recordio"])
    p.add_argument("--rec", default=None, help="RecordIO folder for --loader recordio")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--loops", default="plain,ours,score",
                   help="which loops to time: plain, ours (training steps), score (eval_trainset inference), "
                        "load (the RecordIO loader alone)")
    p.add_argument("--profile", action="store_true", help="after the timing, profile 5 steps of each loop")
    p.add_argument("--dynamic", default=None, choices=list(DYNAMIC_METHODS),
                   help="also time ours without and with this dynamic pruning method's bookkeeping (docstring)")
    p.add_argument(*flag("num_samples"), type=int, default=490623,
                   help="--dynamic: training-set size (CASIA-WebFace: 490623 images)")
    p.add_argument("--rounds", type=int, default=3, help="--dynamic: pruning epochs timed; the median is reported")
    p.add_argument("--device", default="auto")
    p.add_argument(*flag("peak_tflops"), type=float, default=None, help="peak for MFU (default: known GPUs' bf16 peak)")
    args = p.parse_args(argv)
    if (args.loader == "recordio" or "load" in args.loops.split(",")) and not args.rec:
        p.error("--loader recordio and --loops load need --rec DIR")
    if args.dynamic and (args.num_samples < args.batch_size or args.rounds < 1):
        p.error(f"--dynamic needs --num_samples >= --batch_size and --rounds >= 1, got {args.num_samples}, "
                f"{args.batch_size}, {args.rounds}")
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{args.network} + {args.loss}, batch {args.batch_size}, {args.image_size}px, {args.num_classes} classes, "
          f"{args.loader} input, {args.steps} timed steps" + (f", compile mode {args.compile_mode}" if args.compile else ""))
    print(f"{'loop':<6} {'device':<24} {'dtype':<9} {'compile':<8} {'images/s':>10} {'GFLOP/img':>10} {'MFU':>7}")
    for loop in args.loops.split(","):
        r = bench(args, loop)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['loop']:<6} {r['device']:<24} {r['dtype']:<9} {str(r['compile']):<8} {r['images_per_s']:>10.1f} "
              f"{r['gflops_per_image']:>10.2f} {mfu:>7}", flush=True)
    if args.dynamic:
        print_dynamic(bench_dynamic(args))


if __name__ == "__main__":
    main()
