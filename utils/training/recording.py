"""What training records per sample: with `is_original_train=True`, every epoch the labelled-class probability
with margin as seen during that epoch (the DynUnc input) and the margin-free top-k logits (soft labels, EL2N, AUM),
gathered exactly across ranks into `probs/epoch_XXX.npz` (`Recorder`), and after the last epoch those files
assembled into `prob_history.npy` and `topk_logits.npz` (`assemble_history`).
"""
from __future__ import annotations

import zipfile

import numpy as np
import torch

from utils.artifacts import paths
from utils.artifacts.files import (ArtifactError, Fingerprint, atomic_path, is_complete, manifest_path, read_manifest,
                                   save_array, write_manifest)
from utils.artifacts.records import npz_headers
from utils.runtime.context import gather_by_index


# --------------------------------------------------------------------------------------- every epoch
def record_kind(cfg) -> dict:
    """What the recorded labelled-class probability is (manifest info of the records)."""
    if cfg.sample_rate < 1:
        prob = ("full softmax over every class, from a no-grad scoring pass at each step (eval-mode margin, "
                "frozen statistics); the loss used the Partial FC sampled softmax")
    else:
        prob = "full softmax over every class, from the training forward"
    return {"sample_rate": cfg.sample_rate, "recorded_prob": prob}


class Recorder:
    """Per-sample values seen during one epoch, gathered exactly at its end.

    `full_prob`: record the full-softmax probability of a scoring pass instead of the training forward's
    (Partial FC sampling: the forward's is the sampled softmax's, see `record_kind`)."""

    def __init__(self, topk: int, full_prob: bool = False):
        self.topk = topk
        self.full_prob = full_prob
        self.index, self.prob, self.tk_logit, self.tk_index, self.rest, self.label = [], [], [], [], [], []

    def add(self, sample_index, gt_prob, scores=None):
        # Values stay on the device until the epoch ends: a .cpu() per step would sync the GPU every step.
        self.index.append(sample_index)
        self.prob.append(gt_prob.detach().float())
        if scores is not None:
            self.tk_logit.append(scores["topk_logits"].float())
            self.tk_index.append(scores["topk_index"])
            self.rest.append(scores["rest_mean_logit"].float())
            self.label.append(scores["label_logit"].float())

    def write(self, run, epoch: int):
        n = run.dataset.num_images
        idx = torch.cat(self.index)
        prob = gather_by_index(run.ctx, idx, torch.cat(self.prob), n).astype(np.float32)
        arrays = {"gt_prob_with_margin": prob}
        if self.tk_logit:
            arrays["topk_logits"] = gather_by_index(run.ctx, idx, torch.cat(self.tk_logit), n).astype(np.float16)
            tk = gather_by_index(run.ctx, idx, torch.cat(self.tk_index).double(), n)
            arrays["topk_index"] = np.where(np.isnan(tk), -1, tk).astype(np.int32)
            arrays["rest_mean_logit"] = gather_by_index(run.ctx, idx, torch.cat(self.rest), n).astype(np.float16)
            # the margin-free logit of the labelled class (AUM, and EL2N when the label is outside the top k)
            arrays["label_logit"] = gather_by_index(run.ctx, idx, torch.cat(self.label), n).astype(np.float16)
        if run.ctx.is_main:
            save_array(run.out / "probs" / f"epoch_{epoch:03d}.npz", arrays, "train_everything.record",
                       run.dataset.fingerprint, run.cfg,
                       info={"epoch": epoch, "seen": int(np.isfinite(prob).sum()), **record_kind(run.cfg)})


# ------------------------------------------------------------------------------ after the last epoch
RECORD_ARRAYS = ("gt_prob_with_margin", "topk_logits", "topk_index", "rest_mean_logit", "label_logit")


def _check_epoch_records(files, fingerprint: Fingerprint, num_classes: int) -> dict:
    """{name: (per-epoch shape, dtype)} the epoch files agree on; an ArtifactError names the first file that
    does not hold one epoch of this dataset (wrong epoch in its manifest, wrong sample count, a top-k
    wider than the classes, arrays missing). Only headers are read."""
    n = fingerprint.num_images
    expected = None
    for epoch, f in enumerate(files, start=1):
        found = read_manifest(f).get("info", {}).get("epoch")
        if found is not None and int(found) != epoch:
            raise ArtifactError(f"{f}: its manifest says epoch {found}, expected {epoch}")
        heads = {k: v for k, v in npz_headers(f).items() if k in RECORD_ARRAYS}
        prob = heads.get("gt_prob_with_margin")
        if prob is None or prob[0] != (n,):
            raise ArtifactError(f"{f}: expected gt_prob_with_margin of shape ({n},) (one value per sample of the "
                                f"dataset), found {None if prob is None else prob[0]}")
        if "topk_logits" in heads:
            k = heads["topk_logits"][0][-1]
            want = {"topk_logits": (n, k), "topk_index": (n, k), "rest_mean_logit": (n,),
                    **({"label_logit": (n,)} if "label_logit" in heads else {})}  # recorded since 2026-12
            bad = {name: heads.get(name, (None,))[0] for name, shape in want.items()
                   if heads.get(name, (None,))[0] != shape}
            if bad:
                raise ArtifactError(f"{f}: expected top-k arrays of shapes {want}, found {bad}")
            if k > num_classes:
                raise ArtifactError(f"{f}: top-{k} logits recorded, but the dataset has {num_classes} classes")
        layout = {name: (shape, dtype) for name, (shape, dtype, _) in heads.items()}
        if expected is None:
            expected = layout
        elif {k: v[0] for k, v in layout.items()} != {k: v[0] for k, v in expected.items()}:
            raise ArtifactError(f"{f}: holds arrays {layout}, epoch 1 holds {expected}")
    return expected


def _stream_npy_member(zf, name: str, shape, dtype, parts):
    """Write one .npy member of an uncompressed .npz from `parts`, C-ordered slices along the first axis."""
    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                      "fortran_order": False, "shape": tuple(shape)})
        for part in parts:
            member.write(np.ascontiguousarray(part, dtype=dtype).data)


def assemble_history(cfg, fingerprint: Fingerprint):
    """probs/epoch_XXX.npz -> prob_history.npy (E, N) and topk_logits.npz (E, N, k), with manifests.

    Streamed: one epoch file is read at a time and written into its row of the outputs, so memory does
    not grow with the number of epochs (Glint360K, 20 epochs: 1.4 GB and 21 GB of outputs). Every epoch
    file is checked first (headers only); each output is written under a temporary name and renamed,
    and its manifest is written last, so a failure leaves no output that looks complete.
    """
    out = paths.original_dir(cfg, cfg.network, cfg.loss)
    files = [out / "probs" / f"epoch_{e:03d}.npz" for e in range(1, cfg.num_epoch + 1)]
    missing = [str(f) for f in files if not is_complete(f, fingerprint)]
    if missing:
        raise ArtifactError(f"probability records missing for {len(missing)} epochs, e.g. {missing[0]}")
    layout = _check_epoch_records(files, fingerprint, fingerprint.num_classes)
    epochs, n = len(files), fingerprint.num_images
    hist_path, topk_path = out / "prob_history.npy", out / "topk_logits.npz"
    for path in (hist_path, topk_path):  # an old manifest must not vouch for a half-replaced file
        manifest_path(path).unlink(missing_ok=True)

    with atomic_path(hist_path) as tmp:
        history = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(epochs, n))
        for e, f in enumerate(files):
            with np.load(f) as z:
                history[e] = z["gt_prob_with_margin"]
        history.flush()
        del history
    write_manifest(hist_path, "train_everything", fingerprint, cfg, inputs=files,
                   info={"shape": [epochs, n], "meaning": "P[epoch, sample]: labelled-class probability with margin "
                         "during training; NaN = not seen that epoch", **record_kind(cfg)})
    if "topk_logits" not in layout:
        return

    def per_epoch(name):
        for f in files:
            with np.load(f) as z:
                yield z[name]

    with atomic_path(topk_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name in ("topk_logits", "topk_index", "rest_mean_logit", "label_logit"):
            if name not in layout:  # label_logit: absent from records of earlier versions
                continue
            shape, dtype = layout[name]
            _stream_npy_member(zf, name, (epochs, *shape), dtype, per_epoch(name))
    write_manifest(topk_path, "train_everything", fingerprint, cfg, inputs=files,
                   info={"k": int(layout["topk_logits"][0][-1]), "shape": [epochs, n, int(layout["topk_logits"][0][-1])],
                         **record_kind(cfg)})
