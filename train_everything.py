"""Train a face-recognition model (the paper's train_everything.py).

With `--is_original_train true` it trains on the full dataset and records, after every epoch, each
sample's labelled-class probability with margin (DynUnc's input) and its margin-free top-k logits
(soft-label entropy); with `--is_original_train false` it retrains on a kept list (`--coreset_method`
and `--fraction` name one the pruning stages wrote, or `--kept_index`/`--label_map` give one; a plain integer
`.npy` kept list, without a manifest, is checked for dtype, range and duplicates only).

    python train_everything.py --rec data/synthetic --network smallnet
    torchrun --nproc_per_node=8 train_everything.py --dataset webface --rec /data/faces_webface_112x112

Every key of config/config.py can be overridden: `python train_everything.py --KEY VALUE`; `--help` lists them.
"""
import dataclasses
import logging
import math
import time

import numpy as np

from utils.artifacts import paths
from utils.artifacts.files import atomic_write_json, save_array
from utils.runtime.context import init_logging
from utils.errors import UserError
from utils.runtime.stage import run_stage
from utils.training.loop import ProgressLog, VerificationCallback, prepare_run, train_one_epoch
from utils.training.recording import Recorder, assemble_history
from utils.training.resume import save_epoch

log = logging.getLogger("diffprob")


def _accuracies(results: dict) -> dict:
    return {f"acc_{k}": v["accuracy_mean"] for k, v in results.items()}


def train(cfg, ctx) -> dict:
    """Train as `cfg` says; returns the summary written to `<train_dir>/train_summary.json`."""
    run = prepare_run(cfg, ctx)  # dataset, model, optimizer, schedule; resumed state with --resume true
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    init_logging(ctx.rank, out)
    if ctx.is_main:
        atomic_write_json(out / "config.json", dataclasses.asdict(cfg))
    log.info("training %s + %s on %d images of %d identities (%s) -> %s", cfg.network, cfg.loss, len(run.dataset),
             run.dataset.num_classes, "original" if cfg.is_original_train else paths.coreset_tag(cfg), out)
    log.info("global batch %d, %d steps/epoch, %d epochs, lr %.4f, amp %s", cfg.batch_size * ctx.world_size,
             run.steps_per_epoch, cfg.num_epoch, run.optimizer.param_groups[0]["initial_lr"], ctx.amp_dtype)
    progress = ProgressLog(run)
    verify = VerificationCallback(run)

    def on_step(run_, epoch, step, loss):
        progress(run_, epoch, step, loss)
        if cfg.eval_step > 0 and run_.global_step % cfg.eval_step == 0:
            progress.write({"type": "verification", "step": run_.global_step, **_accuracies(verify(run_))})

    t0 = time.time()
    results = {}
    for epoch in range(run.start_epoch, cfg.num_epoch):
        recorder = Recorder(cfg.record_topk, full_prob=cfg.sample_rate < 1) if cfg.is_original_train else None
        loss = train_one_epoch(run, epoch, recorder, on_step, progress.epoch_steps)
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} in epoch {epoch + 1}; lower --lr or use --dtype fp32")
        if recorder is not None:
            recorder.write(run, epoch + 1)  # probs/epoch_XXX.npz, gathered exactly across ranks
        if cfg.verify_every_epoch or epoch + 1 == cfg.num_epoch:
            results = verify(run)
        progress.write({"type": "epoch", "epoch": epoch + 1, "loss": loss, "step": run.global_step,
                        "seconds": time.time() - t0, **_accuracies(results)})
        save_epoch(run, epoch + 1)  # epoch_XXX.pt, backbone.pth, last.pt, per-rank resume state
    progress.bar.close()
    seconds = time.time() - t0

    if cfg.is_original_train and ctx.is_main:
        assemble_history(cfg, run.dataset.fingerprint)  # prob_history.npy and topk_logits.npz
    if run.dynamic is not None and ctx.is_main:  # which samples each epoch trained on (positions in the training set)
        save_array(out / "dynamic_kept.npz", {**run.dynamic.record(),
                                              "sample_index": run.dataset.sample_index.astype(np.int64)},
                   "dynamic_kept", run.dataset.fingerprint, info={"method": cfg.dynamic_method})
    summary = {"train_dir": str(out), "num_images": len(run.dataset), "num_classes": run.dataset.num_classes,
               "epochs": cfg.num_epoch, "steps": run.global_step, "train_seconds": seconds,
               "world_size": ctx.world_size, "inputs": [str(p) for p in run.inputs],
               "verification": {k: v["accuracy_mean"] for k, v in results.items()},
               "verification_pairs": {vs.name: len(vs) for vs in verify.sets},
               "best": run.best, "skipped_bad_images_last_epoch": run.skipped_images,
               # the cost: images trained on per epoch and in all (dynamic pruning trains on fewer)
               "samples_per_epoch": run.samples_per_epoch, "sample_passes": int(sum(run.samples_per_epoch)),
               # of those, the samples inter-class filtering left out of the loss (interclass_filter; 0 when off)
               "interclass_filtered": run.interclass_filtered,
               "dynamic": {"method": cfg.dynamic_method, **({"ratio": cfg.dynamic_ratio, "anneal": cfg.dynamic_anneal}
                                                             if cfg.dynamic_method != "none" else {})}}
    if ctx.is_main:
        atomic_write_json(out / "train_summary.json", summary)
    return summary


if __name__ == "__main__":
    # checkpoints are committed one epoch at a time (a killed run resumes from the last), not all at the end
    run_stage("train_everything", train, description=__doc__, distributed=True, lock_dir=paths.train_dir,
              preset_needed=True, all_at_once=False)
