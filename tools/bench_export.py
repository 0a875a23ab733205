"""Times export_trainset's copy at CASIA-WebFace scale against a plain file copy of the same bytes.

    python tools/bench_export.py                     # 490,623 records of 3-5 KB, 10,572 identities, export 50%
    python tools/bench_export.py --records 100000 --dir /data/tmp

Writes a synthetic RecordIO folder (InsightFace layout, with the project's writer; the payloads are
slices of one random buffer, so nothing is decoded or encoded) into a temporary folder under --dir,
keeps a per-identity random 50% (`pruning.random_keep`), exports it with `utils.data.export.export_dataset`,
then copies the exported train.rec with `shutil.copyfile` on the same disk, --repeat times each (after an
`os.sync()`, so no step pays for flushing another's writes; the table shows the fastest run of each, as
the machine is shared). Each timed step runs in a
fresh process, so its peak memory is its own: peak RSS (VmHWM, which counts the pages of train.rec that
`read_layout` memory-maps to read the record headers) and the anonymous memory it adds (peak RssAnon, sampled, minus RssAnon at its start).
The export's time includes opening the source (`read_layout`, timed apart as well) and writing the
manifest; torch is imported before the clock starts. The page cache is warm for both (the files were just written). Everything it
wrote is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_pruning import SCALES, synthetic  # noqa: E402
from utils.runtime.cli import flag  # noqa: E402


def write_source(folder: Path, num_images: int, num_ids: int, max_size: int, payload_bytes: int, seed: int):
    """train.rec/.idx/property of `num_images` records with payloads of payload_bytes +- 33%."""
    from utils.data.recordio import IRHeader, MXIndexedRecordIO, pack

    _, shuffled = synthetic(num_images, num_ids, max_size, seed)
    labels = np.sort(shuffled)
    counts = np.bincount(labels, minlength=num_ids)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, payload_bytes * 2, dtype=np.uint8).tobytes()
    sizes = rng.integers(payload_bytes * 2 // 3, payload_bytes * 4 // 3, num_images).tolist()
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "w") as rec:
        rec.write_idx(0, pack(IRHeader(2, [num_images + 1, num_images + 1 + num_ids], 0, 0), b""))
        for key, (label, size) in enumerate(zip(labels.tolist(), sizes), start=1):
            rec.write_idx(key, pack(IRHeader(0, float(label), key, 0), base[key % payload_bytes:][:size]))
        ends = np.cumsum(counts) + 1
        for c, (s, e) in enumerate(zip((ends - counts).tolist(), ends.tolist())):
            rec.write_idx(num_images + 1 + c, pack(IRHeader(2, [s, e], 0, 0), b""))
    (folder / "property").write_text(f"{num_ids},112,112\n")
    return labels


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


class PeakAnon:
    """Samples RssAnon (heap, not file pages) every 10 ms; its rise over the step is what the step allocates.

    VmHWM (peak RSS) also counts the pages of memory-mapped files a process touched; read_layout maps
    train.rec to read the record headers, so VmHWM grows with the .rec although those pages are page cache.
    """

    def __enter__(self):
        self.peak, self.stop = _status_mb("RssAnon"), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def __exit__(self, *exc_info):
        self.stop.set()
        self.thread.join()


def _timed(step, queue):
    with PeakAnon() as anon:
        anon_before = anon.peak
        t = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - t
    queue.put({**result, "seconds": seconds, "peak_rss_mb": _status_mb("VmHWM"), "added_anon_mb": anon.peak - anon_before})


def _export(src, kept, dst, queue):
    from utils.data.datasets import open_dataset  # torch: imported before the clock starts, as in a long-lived process
    from utils.data.export import export_dataset

    def step():
        t = time.perf_counter()
        dataset = open_dataset(src)  # read_layout: labels and offsets from the record headers
        layout_seconds = time.perf_counter() - t
        summary = export_dataset(dataset, kept, None, dst, progress=False)
        return {"images": summary["images_after"], "bytes": (Path(dst) / "train.rec").stat().st_size,
                "layout_seconds": layout_seconds}
    _timed(step, queue)


def _copy(src, dst, queue):
    def step():
        shutil.copyfile(src, dst)
        return {}
    _timed(step, queue)


def in_child(target, *args) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    images, ids, largest = SCALES["casia"]
    parser.add_argument("--records", type=int, default=images, help="image records (CASIA-WebFace: 490,623)")
    parser.add_argument("--ids", type=int, default=ids, help="identities (CASIA-WebFace: 10,572)")
    parser.add_argument(*flag("payload_bytes"), type=int, default=4096, help="mean payload size")
    parser.add_argument("--fraction", type=float, default=0.5, help="kept share per identity")
    parser.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each step; the table shows the fastest")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from utils.artifacts.files import Fingerprint, save_kept_index
    from utils.pruning import random_keep
    from utils.data.recordio import read_layout

    with tempfile.TemporaryDirectory(prefix="bench_export-", dir=args.dir) as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        t = time.perf_counter()
        labels = write_source(src, args.records, args.ids, largest, args.payload_bytes, seed=0)
        written = time.perf_counter() - t
        layout = read_layout(src)
        fp = Fingerprint(layout.num_images, layout.num_classes, layout.idx_size)
        kept = random_keep(labels, args.fraction, min_samples_per_id=1, seed=0)
        save_kept_index(tmp / "kept_index.npy", kept, "bench_export", fp)
        src_mb = (src / "train.rec").stat().st_size / 2**20
        print(f"source: {args.records} records, {src_mb:.0f} MB train.rec, written in {written:.1f} s; "
              f"keeping {kept.size} records")

        runs = {"export_trainset": [], "shutil.copyfile": []}
        for _ in range(args.repeat):
            shutil.rmtree(tmp / "dst", ignore_errors=True)
            (tmp / "copy.rec").unlink(missing_ok=True)
            os.sync()  # no dirty pages of an earlier step are left to be flushed while a step is timed
            runs["export_trainset"].append(in_child(_export, str(src), str(tmp / "kept_index.npy"), str(tmp / "dst")))
            os.sync()
            runs["shutil.copyfile"].append(in_child(_copy, str(tmp / "dst" / "train.rec"), str(tmp / "copy.rec")))
    for name, rs in runs.items():
        print(f"{name}: " + ", ".join(f"{r['seconds']:.2f}" for r in rs) + " s")
    exp, copy = (min(rs, key=lambda r: r["seconds"]) for rs in runs.values())
    mb = exp["bytes"] / 2**20
    rows = {"export_trainset": exp, "shutil.copyfile": {**copy, "images": exp["images"], "bytes": exp["bytes"]}}
    print(f"{'step':<18}{'seconds':>9}{'records/s':>12}{'MB/s':>9}{'peak RSS MB':>13}{'added anon MB':>15}")
    for name, r in rows.items():
        print(f"{name:<18}{r['seconds']:>9.2f}{r['images'] / r['seconds']:>12,.0f}{mb / r['seconds']:>9.0f}"
              f"{r['peak_rss_mb']:>13.0f}{r['added_anon_mb']:>15.0f}")
    print(f"export / copy time: {exp['seconds'] / copy['seconds']:.2f}x ({mb:.0f} MB written by each); of the "
          f"export's {exp['seconds']:.2f} s, {exp['layout_seconds']:.2f} s open the source (read_layout), "
          f"{exp['seconds'] - exp['layout_seconds']:.2f} s select and copy "
          f"({(exp['seconds'] - exp['layout_seconds']) / copy['seconds']:.2f}x the copy)")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
