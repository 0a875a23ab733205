"""Is the synthetic dataset learnable, and does its label noise matter? Train a tiny CNN for a few CPU
minutes on train.rec, then report held-out pair verification and how the model sees the noisy samples.

    python tools/check_synthetic_learnable.py --num_ids 300 --image_size 32 --seconds 120
    python tools/check_synthetic_learnable.py --data data/synthetic --seconds 120
    python tools/check_synthetic_learnable.py ... --labels true     # the same images, noise-free labels

Reports, per verification .bin, the 10-fold accuracy (InsightFace protocol, flip test), and from
noise.json: the mean probability of the labelled class for clean, flipped and open-set samples, the
AUC of (1 - probability) as a noise detector, and precision/recall of "arg-max != label" (the cleaning rule).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.data import recordio  # noqa: E402
from utils.synthetic.generator import SyntheticConfig, generate_dataset, VERIFICATION_BINS  # noqa: E402
from utils.data.transforms import normalize_batch, random_hflip  # noqa: E402
from utils.evaluation.verification import evaluate, load_bin  # noqa: E402
from utils.runtime.cli import flag  # noqa: E402


class TinyNet(nn.Module):
    """A stride-2 stem and four 3x3 conv blocks (two more of stride 2), then a linear embedding with
    BatchNorm: about 4M multiply-adds per 32 x 32 image, so that a CPU trains it for many epochs in minutes."""

    def __init__(self, image_size: int, embedding: int = 128, width: int = 24):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))

        w = width
        self.body = nn.Sequential(block(3, w, 2), block(w, 2 * w, 2), block(2 * w, 2 * w, 1),
                                  block(2 * w, 4 * w, 2), block(4 * w, 4 * w, 1))
        side = math.ceil(math.ceil(math.ceil(image_size / 2) / 2) / 2)
        self.fc = nn.Linear(4 * w * side * side, embedding)
        self.bn = nn.BatchNorm1d(embedding)

    def forward(self, x):
        return self.bn(self.fc(self.body(x).flatten(1)))


class CosFace(nn.Module):
    """Normalised linear head: s * (cos(theta_y) - m) on the labelled class, s * cos elsewhere."""

    def __init__(self, embedding: int, num_classes: int, s: float = 30.0, m: float = 0.25):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding) * 0.01)
        self.s, self.m = s, m

    def cosine(self, emb):
        return F.linear(F.normalize(emb), F.normalize(self.weight))

    def forward(self, emb, labels):
        cos = self.cosine(emb)
        return self.s * (cos - self.m * F.one_hot(labels, cos.shape[1]))


def load_training_set(data_dir):
    """(uint8 images (N, 3, H, W), labels (N,) int64) from train.rec in sample-index order."""
    layout = recordio.read_layout(data_dir)
    images = None
    with recordio.MXIndexedRecordIO(os.path.join(data_dir, "train.idx"), os.path.join(data_dir, "train.rec"), "r") as rec:
        for i, key in enumerate(layout.image_keys.tolist()):
            _, img = recordio.unpack_img(rec.read_idx(key))
            if images is None:
                images = np.empty((layout.num_images,) + img.shape, np.uint8)
            images[i] = img
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(layout.labels.astype(np.int64))


def noise_truth(data_dir, num_images):
    """(true label per sample, -1 for open-set outliers; is_flipped; is_open) from noise.json."""
    with open(os.path.join(data_dir, "noise.json")) as f:
        noise = json.load(f)
    flipped = np.zeros(num_images, bool)
    open_set = np.zeros(num_images, bool)
    true = {d["index"]: d["true_label"] for d in noise["flipped"]}
    flipped[list(true)] = True
    open_set[[d["index"] for d in noise["open_set"]]] = True
    return true, flipped, open_set


def train(images, labels, num_classes, seconds, steps, batch_size, lr, seed, log_every=30.0):
    """Train TinyNet + CosFace for `steps` steps (if > 0) or else `seconds` of wall time, the learning
    rate on a cosine over that budget. A step budget makes runs comparable on a busy machine."""
    torch.manual_seed(seed)
    model = TinyNet(images.shape[-1])
    head = CosFace(128, num_classes)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    n = labels.numel()
    t0 = last = time.time()
    step = seen = 0
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    while (done := step / steps if steps > 0 else (time.time() - t0) / seconds) < 1:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * done))
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        x = normalize_batch(random_hflip(images[idx], generator=gen))
        loss = F.cross_entropy(head(model(x), labels[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += idx.numel()
        if time.time() - last > log_every:
            last = time.time()
            print(f"  {last - t0:6.0f}s step {step:5d} epoch {seen / n:5.2f} loss {loss.item():.3f}", flush=True)
    return model.eval(), head.eval(), {"steps": step, "epochs": round(seen / n, 2), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def verification_accuracy(model, data_dir, image_size):
    out = {}
    for name in VERIFICATION_BINS:
        path = os.path.join(data_dir, f"{name}.bin")
        if not os.path.exists(path):
            continue
        (imgs, flipped), issame = load_bin(path, image_size=(image_size, image_size))
        emb = torch.cat([model(normalize_batch(imgs[i:i + 512])) + model(normalize_batch(flipped[i:i + 512]))
                         for i in range(0, imgs.shape[0], 512)]).numpy()
        _, _, acc = evaluate(emb, issame, nrof_folds=10)
        out[name] = round(float(np.mean(acc)) * 100, 2)
    return out


def auc(scores_pos, scores_neg):
    """Probability that a positive scores above a negative (ties count half)."""
    s = np.concatenate([scores_pos, scores_neg])
    ranks = np.argsort(np.argsort(s, kind="stable"), kind="stable") + 1.0
    # average ranks of ties
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, ranks)
    ranks = (sums / counts)[inv]
    n_pos, n_neg = len(scores_pos), len(scores_neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / max(n_pos * n_neg, 1))


@torch.no_grad()
def noise_report(model, head, images, labels, flipped, open_set):
    probs, argmax = [], []
    for i in range(0, labels.numel(), 512):
        logits = head.s * head.cosine(model(normalize_batch(images[i:i + 512])))
        p = logits.softmax(1)
        probs.append(p.gather(1, labels[i:i + 512, None])[:, 0])
        argmax.append(p.argmax(1))
    prob = torch.cat(probs).numpy()
    flagged = torch.cat(argmax).numpy() != labels.numpy()
    noisy = flipped | open_set
    clean = ~noisy
    report = {
        "mean_prob": {"clean": round(float(prob[clean].mean()), 3),
                      "flipped": round(float(prob[flipped].mean()), 3) if flipped.any() else None,
                      "open_set": round(float(prob[open_set].mean()), 3) if open_set.any() else None},
        "noise_auc": round(auc(1 - prob[noisy], 1 - prob[clean]), 3) if noisy.any() else None,
        "argmax_flagged": int(flagged.sum()),
        "argmax_precision": round(float((flagged & noisy).sum() / max(flagged.sum(), 1)), 3),
        "argmax_recall": round(float((flagged & noisy).sum() / max(noisy.sum(), 1)), 3),
    }
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="", help="existing synthetic dataset folder (default: generate one)")
    parser.add_argument(*flag("num_ids"), type=int, default=300)
    parser.add_argument(*flag("image_size"), type=int, default=32)
    parser.add_argument(*flag("median_images"), type=float, default=20.0)
    parser.add_argument(*flag("flip_rate"), type=float, default=0.05)
    parser.add_argument(*flag("open_rate"), type=float, default=0.02)
    parser.add_argument(*flag("val_pairs"), type=int, default=SyntheticConfig.val_pairs,
                        help="genuine (and as many impostor) pairs per verification .bin")
    parser.add_argument("--redundancy", type=float, default=SyntheticConfig.redundancy,
                        help="expected share of re-shot (near-duplicate) training images")
    parser.add_argument(*flag("redundant_id_share"), type=float, default=SyntheticConfig.redundant_id_share,
                        help="share of identities holding the re-shoots (1: all)")
    parser.add_argument("--seed", type=int, default=0, help="dataset and training seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generation processes")
    parser.add_argument("--labels", choices=("given", "true"), default="given",
                        help="train on the labels in train.rec, or on the true ones (flips fixed, open-set dropped)")
    parser.add_argument("--seconds", type=float, default=120.0, help="training wall time (when --steps is 0)")
    parser.add_argument("--steps", type=int, default=0, help="training steps instead of a time budget")
    parser.add_argument(*flag("batch_size"), type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than 1 slows down badly when other jobs share the cores)")
    parser.add_argument("--json", default="", help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="synthetic-check-") as tmp:
        data_dir = args.data
        if not data_dir:
            data_dir = os.path.join(tmp, "data")
            cfg = SyntheticConfig(num_ids=args.num_ids, image_size=args.image_size, seed=args.seed,
                                  flip_rate=args.flip_rate, open_rate=args.open_rate,
                                  median_images=args.median_images, val_pairs=args.val_pairs, ijb_templates=0,
                                  redundancy=args.redundancy, redundant_id_share=args.redundant_id_share)
            summary = generate_dataset(data_dir, cfg, workers=args.workers, progress=False)
            print(f"generated {summary['images']} images of {summary['identities']} identities in "
                  f"{summary['seconds']:.1f} s ({summary['flipped']} flipped, {summary['open_set']} open-set)")
        images, labels = load_training_set(data_dir)
        num_classes = int(labels.max()) + 1
        true, flipped, open_set = noise_truth(data_dir, labels.numel())
        train_images, train_labels = images, labels
        if args.labels == "true":
            fixed = labels.clone()
            fixed[list(true)] = torch.tensor(list(true.values()), dtype=torch.int64)
            keep = torch.from_numpy(~open_set)
            train_images, train_labels = images[keep], fixed[keep]
        budget = f"{args.steps} steps" if args.steps > 0 else f"{args.seconds:.0f} s"
        print(f"training on {train_labels.numel()} images, {num_classes} classes, {args.labels} labels, "
              f"{budget} on {args.threads} threads")
        model, head, stats = train(train_images, train_labels, num_classes, args.seconds, args.steps,
                                   args.batch_size, args.lr, args.seed)
        report = {
            "data": data_dir if args.data else "generated", "labels": args.labels,
            "num_images": int(labels.numel()), "num_classes": num_classes, "image_size": int(images.shape[-1]),
            "training": stats,
            "verification_accuracy": verification_accuracy(model, data_dir, int(images.shape[-1])),
            "noise": noise_report(model, head, images, labels, flipped, open_set),
        }
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
