"""Margin heads: registry-generated checks for every head, and the margin formulas on chosen cosines."""
import math

import pytest
import torch

from losses import HEAD_DEFAULTS, get_head, list_heads

D, C, N = 16, 12, 8


def batch(seed=0, n=N):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=gen), torch.randint(0, C, (n,), generator=gen)


# ------------------------------------------------------------------ every registered head


@pytest.mark.parametrize("name", list_heads())
def test_forward_backward_under_bf16_autocast(name):
    torch.manual_seed(0)
    head = get_head(name, D, C)
    assert head.weight.shape == (C * head.subcenters, D) and abs(float(head.weight.detach().std()) - 0.01) < 0.003
    emb, labels = batch()
    emb = emb.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(emb, labels)
        plain = head.logits_without_margin(emb)
    assert logits.shape == (N, C) and logits.dtype == torch.float32 and plain.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert torch.isfinite(emb.grad.float()).all() and emb.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_heads())
def test_rows_without_label_get_no_margin(name):
    torch.manual_seed(0)
    head = get_head(name, D, C)
    emb, labels = batch(1)
    labels[::2] = -1  # "labelled class not in this slice of classes"
    logits = head(emb, labels)
    plain = head.logits_without_margin(emb)
    assert torch.equal(logits[::2], plain[::2])
    assert not torch.allclose(logits[1::2], plain[1::2])


@pytest.mark.parametrize("name", list_heads())
def test_defaults_table_and_case_insensitive_lookup(name):
    head = get_head(name.lower(), D, C)
    assert head.head_name == name and head.head_args == HEAD_DEFAULTS[name]
    assert head.s == HEAD_DEFAULTS[name]["s"]
    assert get_head(name, D, C, s=30.0).s == 30.0
    with pytest.raises(ValueError, match="its keywords: s, m"):
        get_head(name, D, C, not_a_key=1)


def test_unknown_head_lists_names():
    with pytest.raises(ValueError) as err:
        get_head("SphereFace2", D, C)
    for name in list_heads():
        assert name in str(err.value)


# ------------------------------------------------------------------ formulas


def test_cosface_logits_exact():
    head = get_head("CosFace", D, C)
    emb, labels = batch(2)
    cos = head.cosine(emb)
    onehot = torch.nn.functional.one_hot(labels, C).float()
    assert torch.equal(head(emb, labels), 64.0 * (cos - 0.35 * onehot))


def _unit_rows(angles):
    """Embeddings at angle `angles[i]` from class 0's centre e_0, in the (e_0, e_1) plane."""
    emb = torch.zeros(len(angles), D)
    emb[:, 0] = torch.cos(angles)
    emb[:, 1] = torch.sin(angles)
    return emb


def test_arcface_margin_and_fallback_region():
    m = 0.5
    head = get_head("ArcFace", D, C)
    with torch.no_grad():
        head.weight.copy_(torch.eye(C, D))
    # theta + m below and beyond pi: 0.3, 1.5, 2.5 (< pi - m = 2.64) and 2.8, 3.0 (fallback)
    angles = torch.tensor([0.3, 1.5, 2.5, 2.8, 3.0], dtype=torch.float64)
    emb = _unit_rows(angles.float())
    logits = head(emb, torch.zeros(len(angles), dtype=torch.long))[:, 0].double()
    cos = torch.cos(angles)
    expected = torch.where(cos > math.cos(math.pi - m), torch.cos(angles + m), cos - math.sin(math.pi - m) * m)
    torch.testing.assert_close(logits, 64.0 * expected, rtol=0, atol=2e-4)
    # In the fallback region the target logit keeps decreasing with theta (cos(theta + m) would rise).
    assert logits[3] > logits[4] and bool((logits[:3] > logits[3]).all())


def test_curricularface_hard_negatives_and_t_ema():
    head = get_head("CurricularFace", D, 4)
    labels = torch.tensor([0, 1])
    cos = torch.tensor([[0.6, 0.1, 0.5, -0.2], [0.3, 0.9, 0.95, 0.2]])
    out = head.margin_logits(cos, labels)
    t = 0.01 * (0.6 + 0.9) / 2
    assert float(head.t) == pytest.approx(t)
    thr = [math.cos(math.acos(0.6) + 0.5), math.cos(math.acos(0.9) + 0.5)]  # 0.143, 0.5035
    exp = [[math.cos(math.acos(0.6) + 0.5), 0.1, 0.5 * (t + 0.5), -0.2],
           [0.3, math.cos(math.acos(0.9) + 0.5), 0.95 * (t + 0.95), 0.2]]
    assert thr[0] < 0.5 and thr[1] > 0.3
    torch.testing.assert_close(out, 64.0 * torch.tensor(exp), rtol=0, atol=1e-4)
    head.eval()
    head.margin_logits(cos, labels)
    assert float(head.t) == pytest.approx(t)  # frozen in eval mode


def test_adaface_margin_follows_norm():
    head = get_head("AdaFace", D, C)
    emb, labels = batch(3)
    emb[0] *= 10.0  # a high-norm ("high quality") sample
    norms = emb.norm(dim=1)
    head(emb, labels)
    assert float(head.batch_mean) == pytest.approx(0.99 * 20 + 0.01 * float(norms.mean()), rel=1e-5)
    assert float(head.batch_std) == pytest.approx(0.99 * 100 + 0.01 * float(norms.std()), rel=1e-5)
    head.eval()
    cos = head.cosine(emb)
    logits = head(emb, labels)
    r = ((norms - head.batch_mean) / (head.batch_std + 1e-3) * 0.333).clamp(-1, 1)
    theta = torch.acos(cos[range(N), labels].clamp(-1 + 1e-3, 1 - 1e-3))
    expected = torch.cos((theta - 0.4 * r).clamp(1e-3, math.pi - 1e-3)) - (0.4 + 0.4 * r)
    torch.testing.assert_close(logits[range(N), labels], 64.0 * expected)


@pytest.mark.parametrize("name,base", [("ElasticCosFace", "CosFace"), ("ElasticArcFace", "ArcFace"),
                                       ("ElasticCosFacePlus", "CosFace"), ("ElasticArcFacePlus", "ArcFace")])
def test_elastic_eval_uses_mean_margin(name, base):
    elastic, fixed = get_head(name, D, C), get_head(base, D, C, m=HEAD_DEFAULTS[name]["m"])
    fixed.load_state_dict(elastic.state_dict())
    emb, labels = batch(4)
    elastic.eval()
    torch.testing.assert_close(elastic(emb, labels), fixed(emb, labels), rtol=0, atol=1e-4)


def test_elastic_plus_gives_harder_samples_larger_margins():
    torch.manual_seed(0)
    head = get_head("ElasticCosFacePlus", D, C, std=0.1)
    emb, labels = batch(5, n=64)
    with torch.no_grad():
        cos_y = head.cosine(emb)[range(64), labels]
        margin = cos_y - head(emb, labels)[range(64), labels] / 64.0
    order = torch.argsort(cos_y, descending=True)  # easiest first
    assert bool((margin[order].diff() >= -1e-5).all())  # margins ascend with difficulty
    assert 0.2 < float(margin.mean()) < 0.5 and float(margin.std()) > 0.03


def test_robustface_hard_and_noise_negatives():
    head = get_head("RobustFace", D, 4)
    cos = torch.tensor([[0.6, 0.1, 0.5, 0.8]])
    out = head.margin_logits(cos, torch.tensor([0]))
    theta = math.acos(0.6)
    target = math.cos(theta + 0.5)  # 0.143: 0.1 is easy, 0.5 and 0.8 are harder than the target
    noise_thr = math.cos(theta - 0.15)  # 0.713: 0.8 is a class much closer than the label -> noise
    assert 0.1 < target < 0.5 < noise_thr < 0.8
    phi = 0.01 * (1 / 3)  # one of the three negatives is easy
    assert float(head.phi) == pytest.approx(phi)
    damping = (1 - phi / (1 - 0.2)) ** 2
    expected = torch.tensor([[target, 0.1, 0.5 * 1.2, 0.8 * damping]])
    torch.testing.assert_close(out, 64.0 * expected, rtol=0, atol=1e-4)
