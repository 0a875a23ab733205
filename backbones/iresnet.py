"""Improved ResNets (IResNet) in the InsightFace `arcface_torch` layout.

Parameter and buffer names and shapes match arcface_torch's `backbones/iresnet.py`, so a released
`backbone.pth` loads with `load_state_dict(strict=True)` at input_size=112 (fc input 512*7*7).
`use_se=True` adds a squeeze-and-excitation block after `bn3` of every residual block under the
name `se_block.fc1` / `se_block.fc2` (the layout of the ElasticFace / DiffProb code base); only then
do the extra parameters exist.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from backbones.common import check_input, final_map_size, mixed_precision
from backbones.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class SEModule(nn.Module):
    """Channel attention: global average pool -> 1x1 conv (C/r) -> ReLU -> 1x1 conv (C) -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN [-> SE] + shortcut (no activation after the sum)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 use_se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        if use_se:
            self.se_block = SEModule(planes, 16)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if hasattr(self, "se_block"):
            out = self.se_block(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The arcface_torch IResNet. `layers` = blocks per stage; the stages halve the map 4 times.

    Output: (N, num_features) embeddings, not normalised (the margin heads normalise)."""

    def __init__(self, layers: Sequence[int], num_features: int = 512, dropout: float = 0.0, fp16: bool = False,
                 input_size: int = 112, use_se: bool = False):
        super().__init__()
        # Everything but `layers` (fixed by the registered name) is what rebuilds this model.
        self.model_args = {"num_features": num_features, "dropout": dropout, "fp16": fp16,
                           "input_size": input_size, "use_se": use_se}
        self.input_size = input_size
        self.fp16 = fp16
        map_size = final_map_size(input_size, "iresnet")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(64, layers[0], stride=2, use_se=use_se)
        self.layer2 = self._make_layer(128, layers[1], stride=2, use_se=use_se)
        self.layer3 = self._make_layer(256, layers[2], stride=2, use_se=use_se)
        self.layer4 = self._make_layer(512, layers[3], stride=2, use_se=use_se)
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(512 * map_size * map_size, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        # InsightFace keeps the embedding BN's scale at 1 (only its shift and statistics are learnt).
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int, use_se: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05))
        stage = [IBasicBlock(self.inplanes, planes, stride, downsample, use_se=use_se)]
        self.inplanes = planes
        stage += [IBasicBlock(planes, planes, use_se=use_se) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_size, "iresnet")
        with mixed_precision(self.fp16, x.device.type):
            x = self.prelu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            x = self.bn2(x)
            x = torch.flatten(x, 1)  # a copy when x is channels_last; the (C, H, W) order is kept
            x = self.dropout(x)
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


# Blocks per stage, as in arcface_torch.
IRESNET_LAYERS = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}


def _register(name: str):
    def builder(**kwargs) -> IResNet:
        return IResNet(IRESNET_LAYERS[name], **kwargs)

    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"IResNet with {IRESNET_LAYERS[name]} blocks per stage (arcface_torch `{name}`)."
    return register_model(builder)


for _name in IRESNET_LAYERS:
    _register(_name)
