"""`smallnet`: a small residual CNN for CPU runs, smoke tests and the synthetic pipeline.

About 0.4M parameters at width 32 and num_features 512; ~1/40 of iresnet18's compute at 112.
Plain dense 3x3 convolutions (they train fast on CPU and converge in few steps), four stride-2
stages (input / 16), then InsightFace's GDC embedding: a depthwise conv over the whole final map
(keeps where on the face a feature fired, unlike average pooling), a linear layer and BatchNorm1d.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.common import check_input, final_map_size, init_fan_out, mixed_precision
from backbones.registry import register_model


def _conv_bn(in_c: int, out_c: int, stride: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_c))


class SmallBlock(nn.Module):
    """conv3x3(stride)-BN-PReLU-conv3x3-BN + projected shortcut, PReLU after the sum."""

    def __init__(self, in_c: int, out_c: int, stride: int):
        super().__init__()
        self.conv1 = _conv_bn(in_c, out_c, stride)
        self.prelu1 = nn.PReLU(out_c)
        self.conv2 = _conv_bn(out_c, out_c, 1)
        self.shortcut = _conv_bn(in_c, out_c, stride, kernel=1)
        self.prelu2 = nn.PReLU(out_c)

    def forward(self, x):
        return self.prelu2(self.conv2(self.prelu1(self.conv1(x))) + self.shortcut(x))


class SmallNet(nn.Module):
    def __init__(self, num_features: int = 512, input_size: int = 112, width: int = 32, dropout: float = 0.0,
                 fp16: bool = False):
        super().__init__()
        self.model_args = {"num_features": num_features, "input_size": input_size, "width": width,
                           "dropout": dropout, "fp16": fp16}
        self.input_size = input_size
        self.fp16 = fp16
        map_size = final_map_size(input_size, "smallnet")
        c1, c2, c3, c4 = width, 2 * width, 3 * width, 4 * width
        self.stem = nn.Sequential(_conv_bn(3, c1, 2), nn.PReLU(c1))  # /2
        self.stage2 = SmallBlock(c1, c2, 2)  # /4
        self.stage3 = SmallBlock(c2, c3, 2)  # /8
        self.stage4 = nn.Sequential(_conv_bn(c3, c4, 2), nn.PReLU(c4))  # /16
        self.gdc = nn.Sequential(nn.Conv2d(c4, c4, map_size, groups=c4, bias=False), nn.BatchNorm2d(c4))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(c4, num_features, bias=False)
        self.features = nn.BatchNorm1d(num_features)
        init_fan_out(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.input_size, "smallnet")
        with mixed_precision(self.fp16, x.device.type):
            x = self.stage4(self.stage3(self.stage2(self.stem(x))))
            x = torch.flatten(self.gdc(x), 1)
            x = self.dropout(x)
        x = self.fc(x.float() if self.fp16 else x)
        return self.features(x)


@register_model
def smallnet(**kwargs) -> SmallNet:
    """Small fast CNN (~0.4M parameters) for CPU runs and tests; any input_size multiple of 16 from 32."""
    return SmallNet(**kwargs)
