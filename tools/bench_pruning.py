"""Times utils/pruning.py at real dataset scale on synthetic arrays (single core, no dataset needed).

    python tools/bench_pruning.py                  # CASIA-WebFace scale: 490,623 images, 10,572 identities
    python tools/bench_pruning.py --scale glint    # Glint360K scale: 17,091,657 images, 360,232 identities
    python tools/bench_pruning.py --scale both

    python tools/bench_pruning.py --scale glint --only scores --workdir /big/disk

The identity sizes are long-tailed (log-normal, clipped to the dataset's range). The probabilities are
float32 values cast to float64, as the scoring stage writes them, so ties occur as they do in real
scores. The DynUnc history is (34 epochs, N) float32.

The scores of utils/dynamics/scores.py (and the soft-label entropy, and CCS over EL2N) run on training records as
training writes them: top-10 float16 logits, int32 classes, float16 rest mean and label logit, a few
samples unseen per epoch; 34 epochs at CASIA scale, in memory, and 20 at Glint360K scale, written to
.npy files under --workdir and memory-mapped (the logits and classes alone are 20 GB there), so those
times include reading them from disk. EL2N runs to the last epoch, its most expensive case.

The table reports wall-clock and CPU seconds of each call (best of --repeat runs) and the largest growth
of anonymous resident memory during it (sampled every 10 ms; memory-mapped pages of the inputs are file
pages and do not count), and the peak resident memory of the process at the end.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, as the targets say
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.dynamics import scores  # noqa: E402
from utils.selection import keep  # noqa: E402
from utils import pruning
from utils.dynamics.soft_labels import soft_label_entropy  # noqa: E402

SCALES = {  # images, identities, largest identity
    "casia": (490_623, 10_572, 804),
    "glint": (17_091_657, 360_232, 1_500),
}
RECORD_EPOCHS = {"casia": 34, "glint": 20}  # the paper's CASIA schedule; InsightFace's Glint360K schedule
TOPK = 10


def synthetic(num_images: int, num_ids: int, max_size: int, seed: int):
    """(prob float64, labels int64): long-tailed identity sizes summing to num_images, shuffled order."""
    rng = np.random.default_rng(seed)
    size = np.exp(rng.normal(np.log(num_images / num_ids) - 0.3, 0.8, num_ids))
    for _ in range(60):  # rescale so the clipped sizes add up (nearly) to num_images
        size *= num_images / np.clip(np.round(size), 2, max_size).sum()
    size = np.clip(np.round(size), 2, max_size).astype(np.int64)
    diff = num_images - int(size.sum())
    grow = rng.choice(np.flatnonzero(size < max_size if diff > 0 else size > 2), abs(diff), replace=False)
    size[grow] += np.sign(diff)
    labels = np.repeat(rng.permutation(num_ids).astype(np.int64), size)
    labels = labels[rng.permutation(num_images)]
    # mostly confident samples, a tail of hard ones; float32 like the scoring stage's output
    prob = np.where(rng.random(num_images) < 0.85, rng.beta(8, 1, num_images), rng.beta(1.2, 3, num_images))
    return prob.astype(np.float32).astype(np.float64), labels


def fill_records(out: dict, labels: np.ndarray, num_classes: int, seed: int, block: int = 1 << 16) -> None:
    """Synthetic training records written into ``out`` (arrays or memory maps), one block of samples at a time.

    Each sample has 20 candidate classes (its label and 19 others); an epoch's top 10 are 10 distinct ones,
    with the label on top more and more often as training goes on. Logits descend from a random top value,
    the rest mean lies below them, and 0.02% of the (epoch, sample) records are unseen (-1 / NaN)."""
    E, N, k = out["topk_logits"].shape
    for a in range(0, N, block):
        b = min(N, a + block)
        rng = np.random.default_rng([seed, a])
        y = labels[a:b]
        spread = rng.integers(1, max(2, num_classes // 20), b - a)  # candidates y + j * spread, j < 20: distinct
        shift = rng.integers(0, 20, (E, b - a))
        shift[rng.random((E, b - a), dtype=np.float32) < np.linspace(0.2, 0.95, E, dtype=np.float32)[:, None]] = 0
        offset = (shift[:, :, None] + 3 * np.arange(k)) % 20  # 3 is prime to 20: k distinct offsets
        out["topk_index"][:, a:b] = (y[None, :, None] + offset * spread[None, :, None]) % num_classes
        logits = rng.uniform(10, 40, (E, b - a, 1)).astype(np.float32) - np.cumsum(
            np.concatenate([np.zeros((E, b - a, 1), np.float32),
                            rng.exponential(2.0, (E, b - a, k - 1)).astype(np.float32)], axis=2), axis=2)
        out["topk_logits"][:, a:b] = logits
        rest = logits[..., -1] - rng.uniform(5, 15, (E, b - a)).astype(np.float32)
        out["rest_mean_logit"][:, a:b] = rest
        on = offset == 0
        out["label_logit"][:, a:b] = np.where(on.any(axis=2), (logits * on).sum(axis=2), rest - 1.0)
        unseen = rng.random((E, b - a), dtype=np.float32) < 2e-4
        for key, arr in out.items():
            arr[:, a:b][unseen] = -1 if key == "topk_index" else np.nan


def make_records(scale: str, labels: np.ndarray, num_classes: int, seed: int, workdir: Path | None) -> dict:
    """The records in memory, or (workdir given) as .npy files under it, reopened memory-mapped."""
    E, N = RECORD_EPOCHS[scale], labels.size
    spec = {"topk_logits": ((E, N, TOPK), np.float16), "topk_index": ((E, N, TOPK), np.int32),
            "rest_mean_logit": ((E, N), np.float16), "label_logit": ((E, N), np.float16)}
    if workdir is None:
        out = {key: np.empty(shape, dtype) for key, (shape, dtype) in spec.items()}
        fill_records(out, labels, num_classes, seed)
        return out
    out = {key: np.lib.format.open_memmap(workdir / f"{key}.npy", "w+", dtype, shape) for key, (shape, dtype) in
           spec.items()}
    fill_records(out, labels, num_classes, seed)
    for arr in out.values():
        arr.flush()
    del out
    return {key: np.load(workdir / f"{key}.npy", mmap_mode="r") for key in spec}


def _rss_anon() -> int:
    """Anonymous resident memory of this process, bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(fn, repeat: int):
    """(result, best wall s, best cpu s, largest growth of anonymous resident memory in bytes)."""
    best_wall = best_cpu = float("inf")
    out = None
    peak = [0]
    base = _rss_anon()
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_anon() - base)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(repeat):
            w, c = time.perf_counter(), time.process_time()
            out = fn()
            best_wall = min(best_wall, time.perf_counter() - w)
            best_cpu = min(best_cpu, time.process_time() - c)
    finally:
        done.set()
        sampler.join()
    return out, best_wall, best_cpu, max(peak[0], _rss_anon() - base)


class Table:
    def __init__(self, scale: str, repeat: int):
        self.scale, self.repeat, self.rows = scale, repeat, []

    def run(self, name, fn, note=""):
        out, wall, cpu, mem = timed(fn, self.repeat)
        self.rows.append((self.scale, name, wall, cpu, mem / 2 ** 20, note if not callable(note) else note(out)))
        print(f"  {name:<42s} {wall:8.2f} s wall {cpu:8.2f} s cpu {mem / 2 ** 20:8.0f} MiB  {self.rows[-1][5]}",
              flush=True)
        return out


def make_data(scale: str, seed: int):
    num_images, num_ids, max_size = SCALES[scale]
    t0 = time.perf_counter()
    prob, labels = synthetic(num_images, num_ids, max_size, seed)
    print(f"[{scale}] {num_images:,} images, {num_ids:,} identities: data made in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return prob, labels


def bench(scale: str, seed: int, repeat: int, fraction: float, prob, labels) -> list:
    num_images = labels.size
    table = Table(scale, repeat)
    run = table.run
    run("identity_index", lambda: pruning.identity_index(labels))
    t = run(f"diffprob_threshold_for_fraction({fraction})",
            lambda: pruning.diffprob_threshold_for_fraction(prob, labels, fraction), lambda t: f"t = {t:.6g}")
    run("diffprob (that threshold)", lambda: pruning.diffprob(prob, labels, t),
        lambda k: f"kept {k.size / num_images:.5f}")
    run("diffprob (t = 0.02)", lambda: pruning.diffprob(prob, labels, 0.02), lambda k: f"kept {k.size / num_images:.5f}")
    excluded = np.random.default_rng(seed + 1).random(num_images) < 0.0113  # cleaning removes ~1.13% (paper)
    run(f"diffprob_for_fraction({fraction}, excluded)",
        lambda: pruning.diffprob_for_fraction(prob, labels, fraction, excluded=excluded),
        lambda kt: f"kept {kt[0].size / num_images:.5f}")
    scores = np.random.default_rng(seed + 2).random(num_images)
    run(f"keep_top_per_identity({fraction})", lambda: pruning.keep_top_per_identity(scores, labels, fraction),
        lambda k: f"kept {k.size / num_images:.5f}")
    run(f"random_keep({fraction})", lambda: pruning.random_keep(labels, fraction, seed=seed),
        lambda k: f"kept {k.size / num_images:.5f}")
    epochs = 34
    history = np.empty((epochs, num_images), dtype=np.float32)
    rng = np.random.default_rng(seed + 3)
    base = prob.astype(np.float32)
    for e in range(epochs):  # a probability that climbs towards its final value, with noise
        rng.random(num_images, dtype=np.float32, out=history[e])
        history[e] *= np.float32(0.2 * (1 - e / epochs))
        history[e] += base * np.float32(e / epochs)
    run(f"dynunc_scores(E={epochs}, window=10)", lambda: pruning.dynunc_scores(history, 10),
        f"history {history.nbytes / 2 ** 30:.2f} GiB float32")
    return table.rows


def bench_scores(scale: str, seed: int, repeat: int, fraction: float, labels, workdir: Path | None) -> list:
    num_classes = SCALES[scale][1]
    t0 = time.perf_counter()
    rec = make_records(scale, labels, num_classes, seed + 4, workdir)
    size = sum(a.nbytes for a in rec.values()) / 2 ** 30
    where = "in memory" if workdir is None else f"memory-mapped from {workdir}"
    print(f"[{scale}] records {rec['topk_index'].shape} + top-{TOPK}: {size:.1f} GiB {where}, made in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    lg, ix, rest, ll = rec["topk_logits"], rec["topk_index"], rec["rest_mean_logit"], rec["label_logit"]
    table = Table(scale, repeat)
    run = table.run
    nan = lambda s: f"NaN {int(np.isnan(s).sum())}"  # noqa: E731  (never-seen samples)
    el2n = run("el2n_scores(epoch=-1, label_logit)",
               lambda: scores.el2n_scores(lg, ix, rest, labels, num_classes, -1, label_logit=ll), nan)
    run("forgetting_scores", lambda: scores.forgetting_scores(ix, labels, num_classes), nan)
    run("aum_scores", lambda: scores.aum_scores(lg, ix, rest, ll, labels, num_classes), nan)
    run("margin_scores(epoch=-1)", lambda: scores.margin_scores(lg, ix, rest, num_classes), nan)
    run("least_confidence_scores(epoch=-1)", lambda: scores.least_confidence_scores(lg, ix, rest, num_classes), nan)
    run("soft_label_entropy", lambda: soft_label_entropy(lg, ix, rest, num_classes), nan)
    run(f"ccs_keep(el2n, {fraction})", lambda: keep.ccs_keep(el2n, labels, fraction),
        lambda k: f"kept {k.size / labels.size:.5f}")
    return table.rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["casia", "glint", "both"], default="casia")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=None, help="runs per call, best kept (default: 3 casia, 1 glint)")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--only", choices=["all", "selections", "scores"], default="all",
                    help="selections: DiffProb, DynUnc, Rand; scores: utils/dynamics/scores.py, entropy and CCS")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the Glint360K-scale records go (22 GB; default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    rows = []
    for scale in (["casia", "glint"] if args.scale == "both" else [args.scale]):
        repeat = args.repeat or (3 if scale == "casia" else 1)
        prob, labels = make_data(scale, args.seed)
        if args.only in ("all", "selections"):
            rows += bench(scale, args.seed, repeat, args.fraction, prob, labels)
        if args.only in ("all", "scores"):
            del prob
            if scale == "casia":
                rows += bench_scores(scale, args.seed, repeat, args.fraction, labels, None)
                continue
            workdir = Path(tempfile.mkdtemp(prefix="bench_records_", dir=args.workdir))
            try:
                rows += bench_scores(scale, args.seed, repeat, args.fraction, labels, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    print()
    print("| scale | call | wall s | cpu s | extra memory MiB | note |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for scale, name, wall, cpu, mem, note in rows:
        print(f"| {scale} | {name} | {wall:.3f} | {cpu:.3f} | {mem:.0f} | {note} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(f"\npeak resident memory {peak:.2f} GiB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
