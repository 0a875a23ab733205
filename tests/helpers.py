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


def write_records(cfg, ds, pred, epochs=4, topk=4, seed=0, geometry=False, subcenters=0):
    """Scores and top-k records (label logits too) as scoring and training write them; the top-k follow `pred`.
    `geometry`: the scores also say where each sample lies among the class centres (label_cos, other_cos,
    other_class, as the last epoch's logits / 12); `subcenters` > 0: and its cosines to that many sub-centers."""
    import numpy as np

    from utils.artifacts import paths
    from utils.artifacts.files import save_array

    rng = np.random.default_rng(seed)
    n, k_classes, labels = ds.num_images, ds.fingerprint.num_classes, ds.all_labels
    logits = rng.normal(size=(epochs, n, k_classes))
    logits[:, np.arange(n), pred] += 10
    index = np.argsort(-logits, axis=2)[:, :, :topk]
    lg = np.take_along_axis(logits, index, axis=2)
    rest = (logits.sum(axis=2) - lg.sum(axis=2)) / (k_classes - topk)
    prob = np.where(pred == labels, 0.9, 0.01).astype(np.float32)
    scores = {"gt_prob_with_margin": prob, "gt_prob": prob, "pred": pred, "pred_prob": np.full(n, 0.9, np.float32),
              "label": labels}
    cos = np.clip(logits[-1] / 12, -1, 1)
    if geometry:
        others = np.where(np.arange(k_classes) == labels[:, None], -np.inf, cos)
        scores.update(label_cos=cos[np.arange(n), labels].astype(np.float32),
                      other_cos=others.max(axis=1).astype(np.float32), other_class=others.argmax(axis=1))
    if subcenters:
        own = cos[np.arange(n), labels][:, None] + rng.normal(0, 0.2, (n, subcenters))
        scores["label_subcenter_cos"] = np.clip(own, -1, 1).astype(np.float32)
    save_array(paths.scores_path(cfg), scores, "eval_trainset", ds.fingerprint)
    label_logit = np.ascontiguousarray(logits[:, np.arange(n), labels], dtype=np.float16)
    save_array(paths.topk_history_path(cfg), {"topk_logits": lg.astype(np.float16),
                                              "topk_index": index.astype(np.int32),
                                              "rest_mean_logit": rest.astype(np.float16), "label_logit": label_logit},
               "train_everything", ds.fingerprint)


def crafted_records(rng, n=120, k_classes=6, topk=3, epochs=4):
    """Records of a tiny dataset with in-memory scores and top-k records (labels 0..K-1, every identity used)."""
    import numpy as np

    from config.config import parse_config
    from utils.artifacts.files import Fingerprint
    from utils.artifacts.records import Records

    labels = np.sort(rng.integers(0, k_classes, n))
    labels[:k_classes] = np.arange(k_classes)
    labels.sort()
    logits = rng.normal(size=(epochs, n, k_classes))
    logits[:, np.arange(n), labels] += 3
    logits[:, :5] = rng.normal(size=(epochs, 5, k_classes))  # a few samples the model does not follow
    index = np.argsort(-logits, axis=2)[:, :, :topk]
    lg = np.take_along_axis(logits, index, axis=2)
    rest = (logits.sum(axis=2) - lg.sum(axis=2)) / (k_classes - topk)
    p = np.exp(logits[-1]) / np.exp(logits[-1]).sum(axis=1, keepdims=True)
    fp = Fingerprint(n, k_classes, 1)
    rec = Records(parse_config([]), labels, fp, k_classes, inputs=[])  # the files: in memory, below
    rec._cache["scores"] = {"pred": p.argmax(axis=1), "pred_prob": p.max(axis=1), "gt_prob": p[np.arange(n), labels],
                            "gt_prob_with_margin": p[np.arange(n), labels], "label": labels}
    cos = np.clip(logits[-1] / 8, -1, 1)  # where the samples lie among the centres, as eval_trainset.py records it
    others = np.where(np.arange(k_classes) == labels[:, None], -np.inf, cos)
    rec._cache["scores"].update(label_cos=cos[np.arange(n), labels], other_cos=others.max(axis=1),
                                other_class=others.argmax(axis=1),
                                label_subcenter_cos=np.clip(cos[np.arange(n), labels][:, None]
                                                            + rng.normal(0, 0.2, (n, 3)), -1, 1))
    rec._cache["topk"] = {"topk_logits": lg.astype(np.float16), "topk_index": index.astype(np.int32),
                          "rest_mean_logit": rest.astype(np.float16),
                          "label_logit": logits[:, np.arange(n), labels].astype(np.float16)}
    return rec


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
