"""Small helpers the backbones share."""
from __future__ import annotations

import contextlib

import torch


def final_map_size(input_size: int, model: str) -> int:
    """Side of the feature map after the backbone's four stride-2 stages (input / 16; 7 at 112).

    Every backbone accepts square inputs whose side is a multiple of 16 from 32 up."""
    if not isinstance(input_size, int) or input_size < 32 or input_size % 16:
        raise ValueError(f"{model}: input_size must be a multiple of 16 from 32 up (112 for the InsightFace "
                         f"layout), got {input_size!r}")
    return input_size // 16


def check_input(x: torch.Tensor, input_size: int, model: str) -> None:
    """The fc / GDC layer is sized for `input_size`: say so instead of a shape error deep inside."""
    if x.dim() != 4 or x.shape[-2:] != (input_size, input_size):
        raise ValueError(f"{model} was built for input_size={input_size}: expected (N, 3, {input_size}, "
                         f"{input_size}), got {tuple(x.shape)}")


def mixed_precision(enabled: bool, device_type: str):
    """InsightFace's `fp16=True`: run the convolutional trunk under autocast.

    fp16 on CUDA, bf16 elsewhere (CPU autocast). With `enabled=False` the caller's own autocast
    context (if any) stays in force: unlike `torch.cuda.amp.autocast(False)` it is not switched off."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device_type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device_type, dtype=dtype)


def init_fan_out(model: torch.nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions and linears with zero bias, BatchNorm2d at identity."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
