"""IJB-B / IJB-C evaluation from the official release layout (loose_crop/, meta/): 1:1 verification
TAR at FAR 1e-6 .. 1e-1 with a ROC plot (several models in one call), and 1:N identification where the
gallery/probe files exist. Image features are cached, so re-scoring does not run the network again.

    python eval_ijbc.py --ijb_root /data/IJB_release/IJBC --ijb_target ijbc --network iresnet50 \
        --models full=/runs/full/backbone.pth,diffprob50=/runs/diffprob/backbone.pth --out ijbc_eval

Every key of config/config.py can be overridden: `--KEY VALUE`; `--help` lists them.
"""
import logging

from utils.artifacts.locking import OutputLock
from utils.artifacts import paths
from utils.artifacts.files import ArtifactError, atomic_write_json
from utils.evaluation.commands import add_ijb_args, out_dir, parse_models
from utils.evaluation.ijb import FAR_TARGETS, evaluate_ijb, format_ijb_table, plot_roc, save_tar_table
from utils.models.build import dataset_image_size, load_backbone
from utils.runtime.stage import run_stage

log = logging.getLogger("diffprob")


def run_ijb(cfg, ctx, args) -> dict:
    """IJB-B/IJB-C 1:1 TAR@FAR (and 1:N where the meta files are there) for one or several models."""
    root = paths.ijb_root(cfg)
    if not (root / "meta").is_dir():
        raise ArtifactError(f"{root}: not an IJB release folder (expected loose_crop/ and meta/; set --ijb_root)")
    models = parse_models(cfg, args.models)
    out = out_dir(cfg, args, models)
    with OutputLock(out, what="eval_ijbc.py"):  # one run per result folder, as every stage
        return _evaluate(cfg, ctx, args, root, models, out)


def _evaluate(cfg, ctx, args, root, models: dict, out) -> dict:
    size = dataset_image_size(cfg.rec)
    results = {}
    for name, path in models.items():
        model = load_backbone(cfg, ctx, path, size)
        res = evaluate_ijb(model, root, cfg.ijb_target, image_size=size, batch_size=cfg.eval_batch_size,
                           device=ctx.device, dtype=ctx.amp_dtype, num_workers=cfg.num_workers,
                           flip_test=not args.no_flip_test, norm_score=not args.no_norm_score,
                           detector_score=not args.no_detector_score,
                           cache_path=out / "features" / f"{name}.npz", checkpoint=str(path), name=name,
                           progress=ctx.is_main)
        results[name] = res
    print(f"\n{cfg.ijb_target.upper()} 1:1 TAR (%) at FAR:\n{format_ijb_table(results, FAR_TARGETS)}")
    for name, res in results.items():
        if "1:N" in res:
            m = res["1:N"]["mean"]
            print(f"{name} 1:N (mean of G1, G2): " + ", ".join(f"{k} {100 * v:.2f}" for k, v in m.items()
                                                            if isinstance(v, float)))
    if ctx.is_main:
        save_tar_table(results, out / f"{cfg.ijb_target}_tar_far.csv", FAR_TARGETS)
        plot_roc(results, out / f"{cfg.ijb_target}_roc.png", title=f"ROC on {cfg.ijb_target.upper()}")
        summary = {"target": cfg.ijb_target, "root": str(root), "models": {
            name: {"checkpoint": str(models[name]),
                   "1:1": {k: v for k, v in r.items() if k.startswith("TAR@FAR=")} | {"auc": r.get("auc")},
                   "1:N": r.get("1:N", {}).get("mean", {})} for name, r in results.items()}}
        atomic_write_json(out / "ijb_results.json", summary)
        log.info("wrote %s and %s", out / "ijb_results.json", out / f"{cfg.ijb_target}_roc.png")
    return results


if __name__ == "__main__":
    run_stage("eval_ijbc", run_ijb, description=__doc__, extra_args=add_ijb_args)
