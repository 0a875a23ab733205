"""Times utils/pruning.py at real dataset scale on synthetic arrays (single core, no dataset needed).

    python tools/bench_pruning.py                  # CASIA-WebFace scale: 490,623 images, 10,572 identities
    python tools/bench_pruning.py --scale glint    # Glint360K scale: 17,091,657 images, 360,232 identities
    python tools/bench_pruning.py --scale both

The identity sizes are long-tailed (log-normal, clipped to the dataset's range). The probabilities are
float32 values cast to float64, as the scoring stage writes them, so ties occur as they do in real
scores. The DynUnc history is (34 epochs, N) float32. The table reports wall-clock and CPU seconds of
each call (best of --repeat runs), and the peak resident memory at the end.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core, as the targets say
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import pruning  # noqa: E402

SCALES = {  # images, identities, largest identity
    "casia": (490_623, 10_572, 804),
    "glint": (17_091_657, 360_232, 1_500),
}


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


def timed(fn, repeat: int):
    best_wall = best_cpu = float("inf")
    out = None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        best_wall = min(best_wall, time.perf_counter() - w)
        best_cpu = min(best_cpu, time.process_time() - c)
    return out, best_wall, best_cpu


def bench(scale: str, seed: int, repeat: int, fraction: float) -> list:
    num_images, num_ids, max_size = SCALES[scale]
    t0 = time.perf_counter()
    prob, labels = synthetic(num_images, num_ids, max_size, seed)
    print(f"[{scale}] {num_images:,} images, {num_ids:,} identities: data made in {time.perf_counter() - t0:.1f} s",
          flush=True)
    rows = []

    def run(name, fn, note=""):
        out, wall, cpu = timed(fn, repeat)
        rows.append((scale, name, wall, cpu, note if not callable(note) else note(out)))
        print(f"  {name:<42s} {wall:8.2f} s wall {cpu:8.2f} s cpu  {rows[-1][4]}", flush=True)
        return out

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
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["casia", "glint", "both"], default="casia")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=None, help="runs per call, best kept (default: 3 casia, 1 glint)")
    ap.add_argument("--fraction", type=float, default=0.5)
    args = ap.parse_args(argv)
    rows = []
    for scale in (["casia", "glint"] if args.scale == "both" else [args.scale]):
        repeat = args.repeat or (3 if scale == "casia" else 1)
        rows += bench(scale, args.seed, repeat, args.fraction)
    print()
    print("| scale | call | wall s | cpu s | note |")
    print("| --- | --- | ---: | ---: | --- |")
    for scale, name, wall, cpu, note in rows:
        print(f"| {scale} | {name} | {wall:.3f} | {cpu:.3f} | {note} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    print(f"\npeak resident memory {peak:.2f} GiB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
