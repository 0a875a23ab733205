"""The DiffProb paper repository trains `mfn`, the original MobileFaceNet, whose checkpoints name their
parameters conv1, conv2_dw, conv_23 ... conv_6_dw, linear, bn. A module built with that naming here (the
structure written out independently of backbones/mobilefacenet.py) must give the same embedding after its
state dict is loaded into our `mfn`."""
import torch
from torch import nn

from backbones import get_model
from utils.models.build import build_backbone


class ConvBnPrelu(nn.Module):  # the paper's Conv_block: conv, bn, prelu
    def __init__(self, i, o, k=1, s=1, p=0, g=1):
        super().__init__()
        self.conv = nn.Conv2d(i, o, k, s, p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(o)
        self.prelu = nn.PReLU(o)

    def forward(self, x):
        return self.prelu(self.bn(self.conv(x)))


class ConvBn(nn.Module):  # Linear_block: conv, bn
    def __init__(self, i, o, k=1, s=1, p=0, g=1):
        super().__init__()
        self.conv = nn.Conv2d(i, o, k, s, p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(o)

    def forward(self, x):
        return self.bn(self.conv(x))


class DW(nn.Module):  # Depth_Wise: conv (1x1 expand), conv_dw, project
    def __init__(self, i, o, residual=False, s=2, g=1):
        super().__init__()
        self.conv = ConvBnPrelu(i, g)
        self.conv_dw = ConvBnPrelu(g, g, 3, s, 1, g)
        self.project = ConvBn(g, o)
        self.residual = residual

    def forward(self, x):
        y = self.project(self.conv_dw(self.conv(x)))
        return x + y if self.residual else y


class Res(nn.Module):  # Residual: model = blocks
    def __init__(self, c, n, g):
        super().__init__()
        self.model = nn.Sequential(*[DW(c, c, True, 1, g) for _ in range(n)])

    def forward(self, x):
        return self.model(x)


class PaperMobileFaceNet(nn.Module):
    def __init__(self, emb=128):
        super().__init__()
        self.conv1 = ConvBnPrelu(3, 64, 3, 2, 1)
        self.conv2_dw = ConvBnPrelu(64, 64, 3, 1, 1, 64)
        self.conv_23 = DW(64, 64, g=128)
        self.conv_3 = Res(64, 4, 128)
        self.conv_34 = DW(64, 128, g=256)
        self.conv_4 = Res(128, 6, 256)
        self.conv_45 = DW(128, 128, g=512)
        self.conv_5 = Res(128, 2, 256)
        self.conv_6_sep = ConvBnPrelu(128, 512)
        self.conv_6_dw = ConvBn(512, 512, 7, 1, 0, 512)
        self.linear = nn.Linear(512, emb, bias=False)
        self.bn = nn.BatchNorm1d(emb)

    def forward(self, x):
        for name in ("conv1", "conv2_dw", "conv_23", "conv_3", "conv_34", "conv_4", "conv_45", "conv_5", "conv_6_sep",
                     "conv_6_dw"):
            x = getattr(self, name)(x)
        return self.bn(self.linear(torch.flatten(x, 1)))


def test_paper_mobilefacenet_checkpoint_loads_into_mfn_and_embeds_the_same():
    torch.manual_seed(0)
    paper = PaperMobileFaceNet(emb=128)
    for m in paper.modules():  # non-trivial BN statistics, so a misplaced tensor shows
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    paper.eval()
    state = {f"module.{k}": v for k, v in paper.state_dict().items()}  # as saved from DDP
    ours = build_backbone(state, "mfn", 128, input_size=112).eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.allclose(ours(x), paper(x), atol=1e-5)


def test_mfn_is_the_width_64_mobilefacenet_and_ours_still_loads():
    mfn = get_model("mfn", num_features=128)
    assert sum(p.numel() for p in mfn.parameters()) == sum(p.numel() for p in PaperMobileFaceNet(128).parameters())
    again = build_backbone(mfn.state_dict(), "mfn", 128, input_size=112)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), mfn.state_dict().values()))
