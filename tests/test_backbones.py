"""Backbones: InsightFace checkpoint compatibility, and a forward/backward check for every registered one."""
import pytest
import torch

from backbones import get_model, list_models

# ------------------------------------------------------------------ arcface_torch iresnet layout


def arcface_torch_iresnet_shapes(layers, num_features=512, map_size=7):
    """Key -> shape of an arcface_torch iresnet state dict, written out from its layout description."""
    shapes = {}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    shapes["prelu.weight"] = (64,)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            bn(f"{p}.bn1", inplanes)
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.prelu.weight"] = (planes,)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if b == 0:  # every stage starts with stride 2: projected shortcut
                shapes[f"{p}.downsample.0.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes)
            inplanes = planes
    bn("bn2", 512)
    shapes["fc.weight"] = (num_features, 512 * map_size * map_size)
    shapes["fc.bias"] = (num_features,)
    bn("features", num_features)
    return shapes


def test_iresnet50_matches_arcface_torch_layout():
    model = get_model("iresnet50")
    sd = model.state_dict()
    expected = arcface_torch_iresnet_shapes((3, 4, 14, 3))
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    for key, shape in [("conv1.weight", (64, 3, 3, 3)), ("layer1.0.downsample.0.weight", (64, 64, 1, 1)),
                       ("layer3.13.conv2.weight", (256, 256, 3, 3)), ("layer4.2.bn3.running_var", (512,)),
                       ("fc.weight", (512, 25088)), ("features.weight", (512,))]:
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == 475
    assert sum(p.numel() for p in model.parameters()) == 43_590_848  # the known ~43.6M of arcface_torch r50
    # The embedding BN's scale is fixed at 1 and not trained.
    assert not model.features.weight.requires_grad and bool((model.features.weight == 1).all())


def test_arcface_torch_state_dict_loads_strict():
    expected = arcface_torch_iresnet_shapes((2, 2, 2, 2))
    gen = torch.Generator().manual_seed(0)
    released = {k: (torch.randn(s, generator=gen) if s else torch.tensor(3)) for k, s in expected.items()}
    model = get_model("iresnet18")
    model.load_state_dict(released, strict=True)
    assert torch.equal(model.state_dict()["layer2.1.conv2.weight"], released["layer2.1.conv2.weight"])


def test_se_blocks_only_when_asked():
    plain = get_model("iresnet18", input_size=32).state_dict()
    se = get_model("iresnet18", input_size=32, use_se=True).state_dict()
    extra = set(se) - set(plain)
    assert set(plain) <= set(se)
    assert extra and all(".se_block.fc" in k for k in extra)
    assert tuple(se["layer1.0.se_block.fc1.weight"].shape) == (4, 64, 1, 1)


def test_mobilefacenet_arcface_torch_names():
    sd = get_model("mobilefacenet").state_dict()
    assert tuple(sd["layers.0.layers.0.weight"].shape) == (128, 3, 3, 3)
    assert tuple(sd["layers.1.layers.0.weight"].shape) == (128, 2, 3, 3)  # depthwise, groups=64
    assert tuple(sd["conv_sep.layers.0.weight"].shape) == (512, 256, 1, 1)
    assert tuple(sd["features.layers.0.layers.0.weight"].shape) == (512, 1, 7, 7)  # GDC
    assert tuple(sd["features.layers.2.weight"].shape) == (512, 512)
    assert "features.layers.3.running_mean" in sd


# ------------------------------------------------------------------ every registered backbone

# The deepest iresnets take a few seconds each on 2 CPU cores.
SLOW = {"iresnet100", "iresnet200"}
ALL_MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in list_models()]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward(name):
    torch.manual_seed(0)
    model = get_model(name, num_features=64, input_size=32)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    y = model(x)
    assert y.shape == (2, 64) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The recorded arguments rebuild the same architecture (what a checkpoint stores).
    again = get_model(model.model_name, **model.model_args)
    assert model.model_name == name
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_other_input_sizes_and_errors(name):
    model = get_model(name, num_features=32, input_size=48).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 48)).shape == (2, 32)
    with pytest.raises(ValueError, match="input_size=48"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        get_model(name, input_size=40)


def test_unknown_backbone_lists_names():
    with pytest.raises(ValueError) as err:
        get_model("resnet9000")
    for name in list_models():
        assert name in str(err.value)


def test_channels_last_and_autocast():
    torch.manual_seed(0)
    model = get_model("smallnet", num_features=32, input_size=64).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert torch.isfinite(low).all()
        half = get_model("smallnet", num_features=32, input_size=64, fp16=True).eval()
        half.load_state_dict(model.state_dict())
        assert half(x).dtype == torch.float32  # fc and BN run in float32 after the autocast trunk


def test_smallnet_learns_quickly_on_cpu():
    from losses import get_head

    torch.manual_seed(0)
    num_classes, per_class, size = 10, 8, 32
    templates = torch.rand(num_classes, 3, size, size) * 2 - 1
    labels = torch.arange(num_classes).repeat_interleave(per_class)

    def images():
        return (templates[labels] + 0.5 * torch.randn(len(labels), 3, size, size)).clamp(-1, 1)

    train = images()
    net = get_model("smallnet", input_size=size, num_features=128)
    head = get_head("CosFace", 128, num_classes)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(25):
        idx = torch.randperm(len(labels))[:32]
        loss = torch.nn.functional.cross_entropy(head(net(train[idx]), labels[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = head.logits_without_margin(net(images())).argmax(1)  # fresh noise: generalises, not memorises
    assert (pred == labels).float().mean() >= 0.9
