"""The one way a uint8 image batch becomes embeddings, and the one resolver of the autocast dtype.

Training, scoring, `.bin` verification, IJB feature extraction and the benchmarks all go through
`forward_uint8`: the uint8 (B, 3, H, W) RGB batch moves to the device, is optionally transformed there
(a random flip when training), scaled to [-1, 1], put in channels_last when asked, and run
through the backbone under autocast when a reduced-precision dtype is in force.
"""
from __future__ import annotations

import contextlib
import itertools
import logging

import numpy as np
import torch
from tqdm import tqdm

from utils.data.transforms import normalize_batch

log = logging.getLogger("diffprob")

# Reduced-precision dtypes run under autocast on CUDA; float32 (or None) runs as is.
_AUTOCAST_DTYPES = {
    None: None, "float32": None, "fp32": None, torch.float32: None,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, torch.float16: torch.float16,
}


def amp_dtype(spec, device=None):
    """The autocast dtype (None = plain fp32) for a dtype spec on a device.

    `spec`: None, 'auto', 'fp32'/'float32', 'bf16'/'bfloat16', 'fp16'/'float16' or a torch dtype.
    'auto' is bf16 on a GPU that has it, fp16 on an older GPU, fp32 elsewhere. On any device but CUDA the
    answer is None: CPU autocast is slower than fp32 here and changes results.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if spec == "auto":
        if device.type != "cuda":
            return None
        spec = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        dtype = _AUTOCAST_DTYPES[spec]
    except (KeyError, TypeError):
        valid = sorted(k for k in _AUTOCAST_DTYPES if isinstance(k, str))
        raise ValueError(f"dtype {spec!r} not understood; valid: ['auto'] + {valid} or a torch dtype") from None
    return dtype if device.type == "cuda" else None


def forward_uint8(backbone, images, device, amp=None, channels_last=False, transform=None):
    """Embeddings (B, D), float32 on `device`, of a uint8 (B, 3, H, W) RGB batch.

    `amp` is the autocast dtype from `amp_dtype` (None: fp32); `transform` is applied to the uint8 batch on
    the device before scaling (training's random flip). Gradients flow when the caller allows them.
    """
    device = torch.device(device)
    x = torch.as_tensor(images).to(device, non_blocking=True)
    if transform is not None:
        x = transform(x)
    x = normalize_batch(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return backbone(x).float()



def model_device(model):
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model):
    """Put every module in eval mode, then restore each module's own training flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def embed_batch(model, images, device, amp=None, flip=True, channels_last=False):
    """Embed one uint8 (B, 3, H, W) RGB batch: (embeddings, embeddings of the flipped images or None).

    Both float32 numpy (B, D), through `forward_uint8`. The model must be in eval mode.
    """
    emb = forward_uint8(model, images, device, amp, channels_last)
    emb_flip = forward_uint8(model, images, device, amp, channels_last, transform=lambda x: x.flip(-1)) if flip else None
    return emb.cpu().numpy(), (emb_flip.cpu().numpy() if flip else None)


def embed_views(model, images, batch_size=256, device=None, flip=True, dtype=None, progress=False, desc="embed"):
    """Embed uint8 (N, 3, H, W) RGB images in batches: (embeddings, flip embeddings or None), float32 (N, D)."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    device = torch.device(device) if device is not None else model_device(model)
    amp = amp_dtype(dtype, device)
    starts = range(0, images.shape[0], batch_size)
    if progress:
        starts = tqdm(starts, desc=desc, unit="batch")
    parts, flip_parts = [], []
    with eval_mode(model):
        for start in starts:
            emb, emb_flip = embed_batch(model, images[start:start + batch_size], device, amp, flip)
            parts.append(emb)
            flip_parts.append(emb_flip)
    if not parts:
        raise ValueError("no images to embed")
    return np.concatenate(parts), (np.concatenate(flip_parts) if flip else None)


def embed(model, images_uint8, batch_size=256, device=None, flip=True, dtype=None, progress=False):
    """Embeddings (N, D) float32 of uint8 (N, 3, H, W) RGB images; with `flip`, image + flipped image.

    Runs under `torch.no_grad`, with every module in eval mode (training flags restored afterwards), on
    `device` (default: the model's), under bf16/fp16 autocast on CUDA when `dtype` asks for it.
    """
    emb, emb_flip = embed_views(model, images_uint8, batch_size, device, flip, dtype, progress)
    return emb + emb_flip if flip else emb
