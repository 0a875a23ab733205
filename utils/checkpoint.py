"""Checkpoints: written atomically, carrying what is needed to rebuild the model without the training config.

A checkpoint file is a dict:
    backbone   state dict (plain, InsightFace naming)
    model      {"name": registry name, "args": constructor kwargs}
    head       full head state dict (all shards gathered), head_info {"name", "in_features", "num_classes", "kwargs"}
    epoch      epochs completed; step: optimizer steps done
    fingerprint, label_map (retraining), config (resolved)
    optimizer / scheduler / rng / scaler   only in the resume checkpoint `last.pt`
A plain `backbone.pth` (state dict only) is written beside it for InsightFace tools.
"""
from __future__ import annotations

import io
import logging
import random
from pathlib import Path

import numpy as np
import torch

from utils.artifacts import ArtifactError, atomic_write_bytes

log = logging.getLogger("diffprob")


def save_checkpoint(path, state: dict):
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many kinds for a truncated or foreign file
        raise ArtifactError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def _strip_prefix(state: dict) -> dict:
    """Accept state dicts saved from DDP or torch.compile wrappers."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_head_state(ckpt_or_state: dict):
    """(head_info or None, head state dict) from a checkpoint or a plain head state dict."""
    if "head" in ckpt_or_state:
        return ckpt_or_state.get("head_info"), ckpt_or_state["head"]
    return None, _strip_prefix(ckpt_or_state)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
