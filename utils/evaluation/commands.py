"""What the evaluation commands share: naming the models to evaluate and where results go.

Models are named on the command line as `--models name=path,name=path`; a path is a checkpoint
(`epoch_XXX.pt`), a plain InsightFace `backbone.pth` (then --network / --embedding_size say what it
is), or a training folder (its newest epoch checkpoint). Without --models: the model this config trains.
"""
from __future__ import annotations

from pathlib import Path

from utils.artifacts import paths
from utils.errors import UserError
from utils.models.build import resolve_checkpoint


def add_model_args(parser):
    parser.add_argument("--models", default=None, metavar="NAME=PATH,...",
                        help="models to evaluate (checkpoint, backbone.pth or training folder); "
                             "default: the model this config trains")
    parser.add_argument("--out", default=None, help="folder for the result files (default: <model>/eval or <output>/eval)")


def parse_models(cfg, spec: str) -> dict:
    """name -> checkpoint path of `--models name=path,...` (default: the model this config trains)."""
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


def out_dir(cfg, args, models: dict) -> Path:
    """--out, else the model's own folder (one model) or `<output>/eval`."""
    if args.out:
        return Path(args.out)
    if len(models) == 1:
        return next(iter(models.values())).parent / "eval"
    return Path(cfg.output) / "eval"


def add_ijb_args(parser):
    add_model_args(parser)
    parser.add_argument("--no_flip_test", action="store_true", help="embed the image only (default: image + flip)")
    parser.add_argument("--no_norm_score", action="store_true", help="L2-normalise image features before pooling")
    parser.add_argument("--no_detector_score", action="store_true", help="do not weight by the detector score")
