"""Evaluation commands: `.bin` verification (eval_verification.py) and IJB-B/IJB-C (eval_ijbc.py).

Models are named on the command line as `--models name=path,name=path`; a path is a checkpoint
(`epoch_XXX.pt`), a plain InsightFace `backbone.pth` (then --network / --embedding_size say what it
is), or a training folder (its newest epoch checkpoint). Without --models: the model this config trains.
"""
from __future__ import annotations

import logging
from pathlib import Path

from config.config import Config
from utils import paths
from utils.artifacts import ArtifactError, atomic_write_csv, atomic_write_json
from utils.runtime import Context, UserError

log = logging.getLogger("diffprob")


def add_model_args(parser):
    parser.add_argument("--models", default=None, metavar="NAME=PATH,...",
                        help="models to evaluate (checkpoint, backbone.pth or training folder); "
                             "default: the model this config trains")
    parser.add_argument("--out", default=None, help="folder for the result files (default: <model>/eval or <output>/eval)")


def resolve_checkpoint(path) -> Path:
    path = Path(path)
    if path.is_dir():
        saved = sorted(path.glob("epoch_*.pt"))
        if saved:
            return saved[-1]
        if (path / "backbone.pth").exists():
            return path / "backbone.pth"
        raise ArtifactError(f"{path}: no epoch_XXX.pt or backbone.pth in this folder")
    if not path.exists():
        raise ArtifactError(f"model {path} not found")
    return path


def parse_models(cfg: Config, spec: str) -> dict:
    if not spec:
        model_dir = paths.train_dir(cfg)
        return {model_dir.name: resolve_checkpoint(Path(cfg.checkpoint) if cfg.checkpoint else model_dir)}
    models = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if name in models:
            raise UserError(f"--models: the name {name!r} is given twice")
        models[name] = resolve_checkpoint(path)
    return models


def _image_size(cfg: Config) -> int:
    from utils.recordio import read_property

    prop = read_property(Path(cfg.rec) / "property")
    return prop[1] if prop else 112


def load_model(cfg: Config, ctx: Context, path_or_ckpt):
    """The backbone of a checkpoint (path or loaded dict); plain state dicts are built from the config
    (--network, --embedding_size, --SE) at the dataset's image size."""
    from utils.checkpoint import build_backbone, load_checkpoint
    from utils.training import model_kwargs

    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    kwargs = model_kwargs(cfg, _image_size(cfg))
    kwargs.pop("num_features")
    return build_backbone(ckpt, cfg.network, cfg.embedding_size, **kwargs).to(ctx.device).eval()


def _out_dir(cfg: Config, args, models: dict) -> Path:
    if args.out:
        return Path(args.out)
    if len(models) == 1:
        return next(iter(models.values())).parent / "eval"
    return Path(cfg.output) / "eval"


def run_verification(cfg: Config, ctx: Context, args) -> dict:
    from utils.verification import VerificationSet, format_table

    models = parse_models(cfg, args.models)
    bins = paths.bin_paths(cfg)
    missing = [str(p) for p in bins.values() if not p.exists()]
    if missing:
        raise ArtifactError(f"verification sets not found: {', '.join(missing)} (--val_targets names .bin files in --rec)")
    if not bins:
        raise UserError("no verification targets: give --val_targets lfw,cfp_fp,...")
    size = _image_size(cfg)
    sets = [VerificationSet(name, path, image_size=(size, size)) for name, path in bins.items()]
    results = {}
    for name, path in models.items():
        model = load_model(cfg, ctx, path)
        res = {vs.name: vs.run(model, batch_size=cfg.eval_batch_size, device=ctx.device, dtype=ctx.amp_dtype,
                               progress=ctx.is_main) for vs in sets}
        results[name] = {"checkpoint": str(path), "targets": res}
        print(f"\n{name} ({path}):\n{format_table(res)}")
    out = _out_dir(cfg, args, models)
    if ctx.is_main:
        atomic_write_json(out / "verification.json", results)
        header = ["model"] + [f"{t} acc" for t in bins] + [f"{t} std" for t in bins] + ["mean"]
        rows = []
        for name, r in results.items():
            accs = [r["targets"][t]["accuracy_mean"] for t in bins]
            rows.append([name] + [f"{a:.5f}" for a in accs] + [f"{r['targets'][t]['accuracy_std']:.5f}" for t in bins]
                        + [f"{sum(accs) / len(accs):.5f}"])
        atomic_write_csv(out / "verification.csv", header, rows)
        log.info("wrote %s", out / "verification.json")
    return results


def add_ijb_args(parser):
    add_model_args(parser)
    parser.add_argument("--no_flip_test", action="store_true", help="embed the image only (default: image + flip)")
    parser.add_argument("--no_norm_score", action="store_true", help="L2-normalise image features before pooling")
    parser.add_argument("--no_detector_score", action="store_true", help="do not weight by the detector score")


def run_ijb(cfg: Config, ctx: Context, args) -> dict:
    """IJB-B/IJB-C 1:1 TAR@FAR (and 1:N where the meta files are there) for one or several models."""
    from utils.ijb import FAR_TARGETS, format_ijb_table, plot_roc, save_tar_table

    root = paths.ijb_root(cfg)
    if not (root / "meta").is_dir():
        raise ArtifactError(f"{root}: not an IJB release folder (expected loose_crop/ and meta/; set --ijb_root)")
    models = parse_models(cfg, args.models)
    out = _out_dir(cfg, args, models)
    size = _image_size(cfg)
    results = {}
    for name, path in models.items():
        from utils.ijb import evaluate_ijb

        model = load_model(cfg, ctx, path)
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
