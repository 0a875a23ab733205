"""The one place that builds models: a new backbone + margin head from the config, or a trained model
from a checkpoint (its own metadata first: network, arguments, image size, head, label map, dataset).

A checkpoint is this toolkit's `epoch_XXX.pt` (self-describing: see utils/models/checkpoint.py), or a plain
InsightFace `backbone.pth` state dict, whose network the config names (`--network`, `--embedding_size`,
`--SE`) at the dataset's image size; a head then comes from `--head_checkpoint` (ours, or the paper
repository's `kernel` layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.artifacts.files import ArtifactError, Fingerprint, label_map_array
from backbones import get_model
from config.config import head_params
from losses import HEAD_DEFAULTS, ShardedClassifier
from utils.data.recordio import read_property
from utils.models.checkpoint import strip_prefix, follow_marker, load_checkpoint, load_head_state


def model_kwargs(cfg, image_size: int) -> dict:
    """Backbone constructor arguments of the config at `image_size` pixels."""
    kwargs = {"num_features": cfg.embedding_size, "input_size": image_size}
    if cfg.SE:
        kwargs["use_se"] = True
    if cfg.dropout:  # only the iresnets take it
        kwargs["dropout"] = cfg.dropout
    return kwargs


def head_kwargs(cfg) -> dict:
    """Every parameter of the head's defaults table row (s, m, std from their keys, the others from head_args,
    the table's value where the config gives none): the head's constructor arguments, recorded in the checkpoint."""
    return head_params(cfg)


def new_backbone(cfg, image_size: int) -> torch.nn.Module:
    return get_model(cfg.network, **model_kwargs(cfg, image_size))


def build_head(name, in_features, num_classes, ctx, kwargs):
    """The margin head, its classes sharded over the ranks of `ctx` (one shard in one process)."""
    return ShardedClassifier(name, in_features, num_classes, rank=ctx.rank, world_size=ctx.world_size, **kwargs)


def build_backbone(ckpt_or_state: dict, network: str = None, embedding_size: int = 512, source: str = "the checkpoint",
                   **model_kwargs):
    """A backbone from this toolkit's checkpoint (self-describing) or a plain InsightFace state dict.

    `source` (the file) names where the weights came from in the error when they do not fit."""
    if "backbone" in ckpt_or_state and "model" in ckpt_or_state:
        spec = ckpt_or_state["model"]
        model = get_model(spec["name"], **spec["args"])
        state = ckpt_or_state["backbone"]
    else:
        if network is None:
            raise ArtifactError(f"{source}: a plain backbone.pth does not say which network it is: give --network")
        model = get_model(network, num_features=embedding_size, **model_kwargs)
        state = ckpt_or_state
    state = strip_prefix(state) if isinstance(state, dict) else state
    name = getattr(model, "model_name", network)
    if isinstance(state, dict) and hasattr(model, "adapt_state_dict"):  # the paper's MobileFaceNet names
        try:
            state = model.adapt_state_dict(state)
        except ValueError as err:
            raise ArtifactError(f"{source}: the backbone weights do not fit {name} ({err})") from None
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ArtifactError(f"{source}: the backbone weights do not fit {name} ({mismatch}); check --network, "
                            f"--embedding_size and --SE")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # right keys and shapes, but e.g. a value that is not a tensor
        raise ArtifactError(f"{source}: the backbone weights do not fit {name}: {' '.join(str(e).split())}") from None
    return model


def _state_mismatch(expected: dict, state) -> str:
    """What keeps `state` from loading into a model whose state dict is `expected` ('' when nothing), in one line."""
    if not isinstance(state, dict):
        return f"found a {type(state).__name__}, not a state dict"

    def some(keys):
        return f"{len(keys)} (e.g. {', '.join(keys[:3])})"

    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    reshaped = [f"{k} {tuple(getattr(state[k], 'shape', ()))} instead of {tuple(v.shape)}" for k, v in expected.items()
                if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    return "; ".join(f"{what} {some(keys)}" for what, keys in (("missing keys", missing),
                                                              ("unexpected keys", unexpected),
                                                              ("other shapes", reshaped)) if keys)


def _without_weight(state: dict) -> dict:
    """A head's state but its class weights (whose rows are sharded over the ranks)."""
    return {k: v for k, v in state.items() if k != "weight"}


def dataset_image_size(rec) -> int:
    """Image side of a dataset folder from its `property` file (112, the InsightFace size, without one)."""
    prop = read_property(Path(rec) / "property")
    return prop[1] if prop else 112


def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or a training folder's newest `epoch_XXX.pt` (else its `backbone.pth`)."""
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
    return follow_marker(path)  # a last.pt marker names the epoch checkpoint beside it


def load_backbone(cfg, ctx, path_or_ckpt, image_size: int = None, source=None) -> torch.nn.Module:
    """The backbone of a checkpoint (path or loaded dict, then read from `source`), on the context's device,
    in eval mode."""
    ckpt = path_or_ckpt if isinstance(path_or_ckpt, dict) else load_checkpoint(path_or_ckpt)
    kwargs = model_kwargs(cfg, image_size or dataset_image_size(cfg.rec))
    kwargs.pop("num_features")
    source = str(source or ("the checkpoint" if isinstance(path_or_ckpt, dict) else path_or_ckpt))
    return build_backbone(ckpt, cfg.network, cfg.embedding_size, source, **kwargs).to(ctx.device).eval()


@dataclass
class TrainedModel:
    """A trained backbone with its margin head, ready to score the dataset it was trained on."""
    backbone: torch.nn.Module
    head: torch.nn.Module
    path: Path
    head_name: str
    label_map: dict = None  # dataset label -> the head's class, for a model trained on a relabelled subset


def class_tables(label_map: dict, num_classes: int, source) -> tuple:
    """(dataset label -> model class, -1 where the model has none; model class -> dataset label) of a
    model trained with `label_map`; an ArtifactError when its classes do not map onto the dataset."""
    try:
        to_model = label_map_array({int(k): int(v) for k, v in label_map.items()}, num_classes)
    except (ArtifactError, TypeError, ValueError) as e:
        raise ArtifactError(f"{source}: its label map does not map onto this dataset's {num_classes} identities "
                            f"({e}); score it on the dataset it was trained from") from None
    kept = np.flatnonzero(to_model >= 0)
    if sorted(to_model[kept].tolist()) != list(range(kept.size)):
        raise ArtifactError(f"{source}: its label map's classes are not 0..{kept.size - 1}; it is not a label map "
                            f"this toolkit wrote")
    to_dataset = np.empty(kept.size, dtype=np.int64)
    to_dataset[to_model[kept]] = kept
    return to_model, to_dataset


def load_scoring_model(cfg, ctx, ckpt_path: Path, fingerprint: Fingerprint, num_classes: int,
                       allow_label_map: bool = False) -> TrainedModel:
    """Backbone + full-softmax head of a model trained on the dataset of `fingerprint` (its every class), or
    with `allow_label_map` on a relabelled subset of it (its `label_map` says which class is which identity)."""
    ckpt = load_checkpoint(follow_marker(ckpt_path))
    if "fingerprint" in ckpt and Fingerprint.from_dict(ckpt["fingerprint"]) != fingerprint:
        raise ArtifactError(f"{ckpt_path} was trained on another dataset ({Fingerprint.from_dict(ckpt['fingerprint'])}) "
                            f"than {cfg.rec} ({fingerprint})")
    label_map = ckpt.get("label_map") or None
    if label_map and not allow_label_map:
        raise ArtifactError(f"{ckpt_path} was trained on a pruned, relabelled subset; score with the original model "
                            f"(or, for a cleaning round, eval_trainset.py --clean_round R maps its classes back)")
    if label_map:
        class_tables(label_map, num_classes, ckpt_path)  # refuse a map that does not fit before building anything
    backbone = load_backbone(cfg, ctx, ckpt, source=ckpt_path)
    info, head_state = load_head_state(ckpt) if "head" in ckpt else (None, None)
    head_source = ckpt_path
    if head_state is None:
        if not cfg.head_checkpoint:
            raise ArtifactError(f"{ckpt_path} holds no head: give --head_checkpoint (the head/header .pth saved "
                                f"with the backbone)")
        info, head_state = load_head_state(cfg.head_checkpoint)  # ours, last.pt, or the paper's `kernel` layout
        head_source = cfg.head_checkpoint
    name = info["name"] if info else cfg.original_net_loss
    # A head without its own record (a plain head .pth) takes the config's values of the parameters it has
    # (--loss may name another head than --original_net_loss: that head's head_args are not this head's).
    kwargs = info["kwargs"] if info else {k: v for k, v in head_kwargs(cfg).items() if k in HEAD_DEFAULTS.get(name, ())}
    classes = len(label_map) if label_map else num_classes
    head = build_head(name, cfg.embedding_size, classes, ctx, kwargs).to(ctx.device)
    shape = tuple(head_state["weight"].shape)
    if shape != head.full_weight_shape:
        owner = "its label map's classes" if label_map else "the dataset's classes"
        raise ArtifactError(f"{head_source}: the head's weight is {shape}, expected "
                            f"{head.describe_weight_shape(owner, '--embedding_size')}")
    mismatch = _state_mismatch(_without_weight(head.head.state_dict()), _without_weight(head_state))
    if mismatch:
        raise ArtifactError(f"{head_source}: the head's state does not fit {name} ({mismatch})")
    try:
        head.load_full_state_dict(head_state)
    except RuntimeError as e:  # right keys and shapes, but e.g. a value that is not a tensor
        raise ArtifactError(f"{head_source}: the head's state does not fit {name}: {' '.join(str(e).split())}") \
            from None
    head.eval()
    return TrainedModel(backbone, head, Path(ckpt_path), name, label_map)
