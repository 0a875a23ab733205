"""Checkpoints: written atomically, carrying what is needed to rebuild the model without the training config.

A checkpoint file is a dict:
    backbone   state dict (plain, InsightFace naming)
    model      {"name": registry name, "args": constructor kwargs}
    head       full head state dict (all shards gathered), head_info {"name", "in_features", "num_classes", "kwargs"}
    epoch      epochs completed; step: optimizer steps done
    fingerprint, label_map (retraining), config (resolved)
    optimizer / scheduler / rng / scaler   only in the per-rank resume files
`last.pt` is a small marker {"epoch", "world_size", "fingerprint"} naming the newest complete epoch.
A plain `backbone.pth` (state dict only) is written beside it for InsightFace tools.

Every file is loaded with `torch.load(weights_only=True)`: tensors, containers and plain Python values
only, so a crafted checkpoint cannot run code. This is why the RNG state is stored as tensors and ints.
"""
from __future__ import annotations

import io
import logging
import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from utils.artifacts.files import ArtifactError, atomic_write_bytes

log = logging.getLogger("diffprob")


def save_checkpoint(path, state: dict):
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    """A checkpoint or state dict, loaded without running code: anything beyond tensors and plain values is refused."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive (or, before torch 1.6, a pickle)
        found = "an empty file" if not magic else f"content starting {magic!r}"
        raise ArtifactError(f"{path}: not a torch checkpoint ({found}); expected a file written by torch.save")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused:
            name = refused.group(1)
            # resume files of earlier versions held numpy's RNG state as an array
            hint = "; a resume file of an earlier version of this toolkit: start the run again" \
                if name.startswith("numpy") else ""
            raise ArtifactError(f"{path}: refused to load: the file asks for {name}; a checkpoint holds only "
                                f"tensors and plain values{hint}") from None
        raise ArtifactError(f"{path}: not a readable torch checkpoint (UnpicklingError: {_reason(e)})") from None
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ArtifactError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {_reason(e)})") from None


def _reason(e: Exception) -> str:
    """What torch's message says is wrong, without its advice on loading the file in an unrestricted way."""
    text = " ".join(str(e).split())
    unpickler = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    return unpickler.group(1) if unpickler else text.split(". ")[0]


def follow_marker(path) -> Path:
    """The epoch checkpoint a `last.pt` marker names; any other path unchanged."""
    path = Path(path)
    if path.name != "last.pt":
        return path
    marker = load_checkpoint(path)
    if not _is_marker(marker):
        return path
    epoch_path = path.with_name(f"epoch_{int(marker['epoch']):03d}.pt")
    if not epoch_path.exists():
        raise ArtifactError(f"{path} names epoch {marker['epoch']}, but {epoch_path.name} is not beside it; "
                            f"give an epoch_XXX.pt of that folder instead")
    return epoch_path


def _is_marker(ckpt) -> bool:
    """`last.pt`: epoch, world size, fingerprint, and since 2026-12-05 the selection digest of what was trained on."""
    return isinstance(ckpt, dict) and {"epoch", "world_size", "fingerprint"} <= set(ckpt) <= \
        {"epoch", "world_size", "fingerprint", "selection"}


def strip_prefix(state: dict) -> dict:
    """Accept state dicts saved from DDP or torch.compile wrappers."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_head_state(path_or_ckpt):
    """(head_info or None, head state dict with `weight` (classes x sub-centres, in_features)) from a path or a
    loaded dict.

    Accepted: this toolkit's epoch checkpoint ("head", "head_info"), its `last.pt` marker (given as a
    path: followed to the epoch checkpoint beside it), or a plain head state dict holding `weight`
    (classes, in_features) or the paper repository's `kernel` (in_features, classes).
    """
    source = "the head checkpoint"
    if not isinstance(path_or_ckpt, dict):
        source = str(path_or_ckpt)
        path_or_ckpt = load_checkpoint(follow_marker(path_or_ckpt))
    ckpt = path_or_ckpt
    if _is_marker(ckpt):
        raise ArtifactError(f"{source} is a last.pt marker (epoch {ckpt['epoch']}); pass its path, or the "
                            f"epoch_XXX.pt it names, to read the head")
    if "head" in ckpt:
        return ckpt.get("head_info"), _weight_layout(ckpt["head"], source)
    return None, _weight_layout(ckpt, source)


def _weight_layout(state, source) -> dict:
    """A head state dict in this toolkit's layout: `kernel` (in, classes) becomes `weight` (classes, in)."""
    state = strip_prefix(state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not any(torch.is_tensor(state.get(k)) for k in ("weight", "kernel")):
        keys = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise ArtifactError(f"{source}: expected a head state dict with 'weight' (classes, in_features) or 'kernel' "
                            f"(in_features, classes), or a checkpoint with 'head'; found keys {keys}")
    if "kernel" in state and "weight" not in state:
        state = dict(state)
        state["weight"] = state.pop("kernel").t().contiguous()
    return state


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state({"bit_generator": npy["bit_generator"],
                         "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
                         "has_gauss": npy["has_gauss"], "gauss": npy["gauss"]})
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
