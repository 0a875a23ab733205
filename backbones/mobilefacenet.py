"""MobileFaceNet in the InsightFace `arcface_torch` layout (`mbf`: blocks (1, 4, 6, 2), width scale 2).

Module names match arcface_torch's `backbones/mobilefacenet.py` so its checkpoints load strictly at
input_size=112. The global depthwise (GDC) kernel is the final map side (input_size / 16; 7 at 112).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from backbones.common import check_input, final_map_size, init_fan_out, mixed_precision
from backbones.registry import register_model


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    """conv (no bias) -> BN, no activation."""

    def __init__(self, in_c, out_c, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups=1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `groups` channels -> depthwise kxk -> 1x1 project (+ residual)."""

    def __init__(self, in_c, out_c, residual=False, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
        )

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class Flatten(nn.Module):
    def forward(self, x):
        return torch.flatten(x, 1)


class GDC(nn.Module):
    """Global depthwise conv over the whole final map, then a linear embedding and BN."""

    def __init__(self, embedding_size: int, map_size: int = 7):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, groups=512, kernel=(map_size, map_size), stride=(1, 1), padding=(0, 0)),
            Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, num_features: int = 512, fp16: bool = False, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2, input_size: int = 112):
        super().__init__()
        self.model_args = {"num_features": num_features, "fp16": fp16, "blocks": list(blocks), "scale": scale,
                           "input_size": input_size}
        self.input_size = input_size
        self.fp16 = fp16
        map_size = final_map_size(input_size, "mobilefacenet")
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=128, kernel=(3, 3), stride=(1, 1),
                                        padding=(1, 1)))
        self.layers.extend([
            DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(c1, num_block=blocks[1], groups=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(c2, num_block=blocks[2], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(c2, num_block=blocks[3], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
        ])
        self.conv_sep = ConvBlock(c2, 512, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(num_features, map_size)
        init_fan_out(self)

    @staticmethod
    def adapt_state_dict(state: dict) -> dict:
        """Checkpoints of the DiffProb paper repository's MobileFaceNet load too (`from_paper_layout`)."""
        return from_paper_layout(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_size, "mobilefacenet")
        with mixed_precision(self.fp16, x.device.type):
            for layer in self.layers:
                x = layer(x)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)


@register_model
def mobilefacenet(**kwargs) -> MobileFaceNet:
    """arcface_torch `mbf`: MobileFaceNet, blocks (1, 4, 6, 2), width scale 2, 512-d GDC embedding."""
    return MobileFaceNet(**kwargs)


@register_model
def mfn(**kwargs) -> MobileFaceNet:
    """The DiffProb paper repository's `mfn`: the original MobileFaceNet (width 64, blocks (1, 4, 6, 2), 512-d
    GDC). Its checkpoints (named conv1, conv2_dw, conv_23 ... conv_6_sep, conv_6_dw, linear, bn) load through
    `from_paper_layout`."""
    kwargs.setdefault("scale", 1)
    return MobileFaceNet(**kwargs)


# The paper repository's MobileFaceNet (the widely used TreB1eN / FaceX-Zoo naming) -> ours.
_PAPER_STAGES = {"conv1": "layers.0", "conv2_dw": "layers.1", "conv_23": "layers.2", "conv_3": "layers.3",
                 "conv_34": "layers.4", "conv_4": "layers.5", "conv_45": "layers.6", "conv_5": "layers.7",
                 "conv_6_sep": "conv_sep", "conv_6_dw": "features.layers.0", "linear": "features.layers.2",
                 "bn": "features.layers.3"}
# inside a block: conv/bn/prelu of a conv block, conv/conv_dw/project of a depthwise block, model of a residual
_PAPER_PARTS = {"conv": "layers.0", "bn": "layers.1", "prelu": "layers.2", "conv_dw": "layers.1",
                "project": "layers.2", "model": "layers"}


def from_paper_layout(state: dict) -> dict:
    """A state dict of the paper repository's MobileFaceNet, renamed to this module's parameter names.

    `conv_3.model.1.conv_dw.bn.weight` -> `layers.3.layers.1.layers.1.layers.1.weight`: each stage is renamed by
    `_PAPER_STAGES`; within it, `model` (a residual's blocks), `conv`/`conv_dw`/`project` (a depthwise block's
    three convolutions) and `conv`/`bn`/`prelu` (a conv block's parts) become positions. In a depthwise block
    `conv` is its first conv block, in a conv block its convolution: the position is the same (0), so one
    table serves both. A state dict already in this module's names is returned as it is.
    """
    if not any(k.split(".", 1)[0] in ("conv1", "conv_6_sep") for k in state):
        return state
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in _PAPER_STAGES:
            raise ValueError(f"{key}: not a parameter of the paper's MobileFaceNet (stages: {', '.join(_PAPER_STAGES)})")
        parts = rest.split(".")
        if head in ("linear", "bn"):  # a plain Linear / BatchNorm1d: parameter names stay
            out[f"{_PAPER_STAGES[head]}.{rest}"] = value
            continue
        renamed = [_PAPER_PARTS.get(p, p) if i < len(parts) - 1 else p for i, p in enumerate(parts)]
        out[".".join([_PAPER_STAGES[head], *renamed])] = value
    return out
