"""Shared helpers of the integration tests: a tiny synthetic dataset and stage runners."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds on 2 CPU cores, large enough that every identity has > min_samples_per_id images.
TINY_DATASET = ["--num_ids", "16", "--image_size", "32", "--seed", "3", "--val_pairs", "200"]
TINY_TRAIN = ["--network", "smallnet", "--embedding_size", "64", "--batch_size", "32", "--num_epoch", "3",
              "--lr_steps", "2", "--lr", "0.2", "--num_workers", "0", "--frequent", "5", "--record_topk", "4",
              "--score_batch_size", "64", "--eval_batch_size", "64"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO)
    e.setdefault("OMP_NUM_THREADS", "2")
    return e


def run_script(script, *args, check=True, torchrun=0, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] \
        if torchrun else [sys.executable]
    r = subprocess.run(cmd + [str(REPO / script), *map(str, args)], cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {r.returncode}\n"
                             f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}")
    return r


def run_as_user(script, *args) -> subprocess.CompletedProcess:
    """`python script args` in a fresh process; its output as a terminal receives it (carriage returns kept,
    which `text=True` would turn into line ends)."""
    r = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, env=env(),
                       capture_output=True, timeout=600)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def as_a_terminal_shows(text: str) -> list:
    """The non-blank lines `text` leaves on a terminal: a carriage return (progress bars) goes back to the
    start of the line, and what follows overwrites it."""
    lines = []
    for raw in text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part):]
        if shown.strip():
            lines.append(shown.rstrip())
    return lines


def write_random_topk(cfg, fp, rng, epochs=6, k=4):
    """Random top-k records (label logits too) as training writes them, for the methods that read them."""
    import numpy as np

    from utils.artifacts import paths
    from utils.artifacts.files import save_array

    n = fp.num_images
    save_array(paths.topk_history_path(cfg), {
        "topk_logits": rng.normal(size=(epochs, n, k)).astype(np.float16),
        "topk_index": np.stack([rng.permutation(fp.num_classes)[:k] for _ in range(epochs * n)]).reshape(epochs, n, k),
        "rest_mean_logit": np.zeros((epochs, n), np.float16),
        "label_logit": rng.normal(size=(epochs, n)).astype(np.float16)}, "train_everything", fp)


def make_tiny_dataset(out: Path):
    run_script("make_synthetic_dataset.py", "--out", out, *TINY_DATASET)
    return out


def zero_image_of(rec_dir: Path, sample: int) -> int:
    """Zero the image bytes of `sample`'s record in train.rec (same length: the index stays right), so that it no
    longer decodes; returns its record key."""
    import struct

    from utils.data.recordio import read_index, read_layout

    key = int(read_layout(rec_dir).image_keys[sample])
    keys, offsets = read_index(rec_dir / "train.idx")
    offset = int(offsets[keys == key][0])
    with open(rec_dir / "train.rec", "r+b") as f:
        f.seek(offset)
        _, lrec = struct.unpack("<II", f.read(8))
        assert lrec >> 29 == 0, "a record split around a magic word: pick another sample"
        f.seek(offset + 8 + 24)  # past the record head and the 24-byte IRHeader of a scalar label
        f.write(bytes((lrec & (2 ** 29 - 1)) - 24))
    return key


def train_until_killed(cfg, ctx, epoch: int = 2):
    """train_everything.train(cfg) killed mid-epoch `epoch` (from 0; KeyboardInterrupt in its first step), as a
    `kill -9` would leave it: the epochs before are saved, this one is not."""
    import pytest

    import train_everything as training

    real = training.train_one_epoch

    def dies(run, e, record=None, on_step=None, on_epoch=None):
        if e == epoch:
            def boom(*a):
                raise KeyboardInterrupt("killed mid-epoch")
            return real(run, e, record, boom, on_epoch)
        return real(run, e, record, on_step, on_epoch)

    training.train_one_epoch = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            training.train(cfg, ctx)
    finally:
        training.train_one_epoch = real
