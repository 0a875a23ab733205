"""Margin heads: class centres + the margin each loss puts on the labelled class.

Every head:
- holds `weight`, (out_features * subcenters, in_features) class centres, initialised N(0, 0.01):
  `subcenters` rows per class, class-major (rows c*k .. c*k+k-1 are class c's); 1 but for
  SubCenterArcFace, so generic code multiplies class counts by `head.subcenters` to count rows;
- `forward(embeddings, labels, target_cos=None) -> (N, out_features)` float32 logits for softmax
  cross-entropy. It L2-normalises embeddings and centres itself and computes the cosines in float32
  with autocast switched off. `labels[i] == -1` means "row i's labelled class is not among these
  centres" (a shard of a sharded classifier): the row gets no margin. `target_cos` (N,) gives the
  labelled-class cosine of every row from outside (the target may live on another shard); heads
  whose hard-negative mining or statistics depend on it use it for every row;
- `logits_without_margin(embeddings) = s * cos`;
- `cosine(embeddings, classes=None)` (N, classes) and `margin_logits(cos, labels, target_cos, embeddings)`,
  the two halves of `forward`, for callers that need the cosines too; a head with sub-centres gives per
  class the largest cosine over its sub-centres, `subcenter_cosine` all of them.

Statistics (EMA buffers) are updated only in training mode and only from quantities that are the same
for the whole global batch on every shard (target cosines, embedding norms, counts summed across
shards through `shard_comm`), so a sharded head follows the single-process one exactly. In eval
mode the buffers are frozen and Elastic heads use their mean margin, so scoring is deterministic.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from losses.registry import register_head


class _Targets(NamedTuple):
    rows: torch.Tensor  # (R,) rows whose labelled class is among this head's centres
    cols: torch.Tensor  # (R,) that class's column
    known: torch.Tensor  # (N,) bool: rows whose labelled-class cosine is known (here or from target_cos)
    target: torch.Tensor  # (N,) float32 labelled-class cosine, detached (0 where unknown)


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def arc_margin(cos_y: torch.Tensor, m: float) -> torch.Tensor:
    """cos(theta + m), with InsightFace's fallback `cos - sin(pi - m) * m` where theta + m > pi.

    Beyond theta = pi - m, cos(theta + m) would increase again (the margin would reward moving away
    from the class); the linear fallback keeps the target logit decreasing in theta."""
    sin_y = torch.sqrt((1.0 - cos_y * cos_y).clamp_min(1e-12))  # clamp: finite gradient at |cos| = 1
    cos_ym = cos_y * math.cos(m) - sin_y * math.sin(m)
    return torch.where(cos_y > math.cos(math.pi - m), cos_ym, cos_y - math.sin(math.pi - m) * m)


class MarginHead(nn.Module):
    """Base class: weight, cosines, label bookkeeping. Subclasses implement `_margin`."""

    def __init__(self, in_features: int, out_features: int, s: float, subcenters: int = 1):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.s = float(s)
        self.subcenters = subcenters  # weight rows per class
        self.weight = nn.Parameter(torch.empty(out_features * subcenters, in_features).normal_(0.0, 0.01))
        # Set by ShardedClassifier: sums statistics and shares random draws across shards.
        self.shard_comm = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, s={self.s}"

    # -------------------------------------------------------------------------------- public API
    def cosine(self, embeddings: torch.Tensor, classes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, out_features) float32 cosines between the embeddings and the class centres; with `classes`
        (local class ids) only those columns, the same cosines (the centres are normalised one by one; the
        matrix product may round differently in the last bit).
        With sub-centres: per class the largest cosine over its sub-centres."""
        if self.subcenters == 1:
            return self._row_cosines(embeddings, classes)
        return self.subcenter_cosine(embeddings, classes).max(dim=2).values

    def subcenter_cosine(self, embeddings: torch.Tensor, classes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, out_features or len(classes), subcenters) float32 cosines to every sub-centre of each class."""
        return self._row_cosines(embeddings, classes).unflatten(1, (-1, self.subcenters))

    def logits_without_margin(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.cosine(embeddings) * self.s

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                target_cos: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.margin_logits(self.cosine(embeddings), labels, target_cos, embeddings)

    def margin_logits(self, cos: torch.Tensor, labels: torch.Tensor, target_cos: Optional[torch.Tensor] = None,
                      embeddings: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scaled logits with the margin, from the cosines `cos` (N, out_features)."""
        with _no_autocast(cos.device):
            return self._margin(cos.float(), self._targets(cos, labels, target_cos), embeddings)

    # ------------------------------------------------------------------------------- internals
    def _row_cosines(self, embeddings: torch.Tensor, classes: Optional[torch.Tensor]) -> torch.Tensor:
        """(N, rows) cosines to the weight rows of `classes` (every class when None), class-major."""
        weight = self.weight
        if classes is not None:
            k = self.subcenters
            rows = classes if k == 1 else (classes[:, None] * k + torch.arange(k, device=classes.device)).reshape(-1)
            weight = weight[rows]
        with _no_autocast(embeddings.device):
            e = F.normalize(embeddings.float(), dim=1)
            w = F.normalize(weight.float(), dim=1)
            return F.linear(e, w).clamp(-1.0, 1.0)

    def _margin(self, cos: torch.Tensor, tg: _Targets, embeddings) -> torch.Tensor:
        raise NotImplementedError

    def _targets(self, cos: torch.Tensor, labels: torch.Tensor, target_cos: Optional[torch.Tensor]) -> _Targets:
        n, c = cos.shape
        labels = labels.reshape(-1).to(device=cos.device, dtype=torch.long)
        if labels.numel() != n:
            raise ValueError(f"{type(self).__name__}: {labels.numel()} labels for {n} embeddings")
        rows = (labels >= 0).nonzero().squeeze(1)
        cols = labels[rows]
        if cols.numel() and int(cols.max()) >= c:
            raise ValueError(f"{type(self).__name__}: label {int(cols.max())} is outside its {c} classes "
                             f"(use -1 for 'not in this slice')")
        if target_cos is None:
            target = torch.zeros(n, device=cos.device, dtype=torch.float32)
            target[rows] = cos.detach()[rows, cols].float()
            known = labels >= 0
        else:
            target = target_cos.detach().reshape(-1).to(device=cos.device, dtype=torch.float32)
            if target.numel() != n:
                raise ValueError(f"{type(self).__name__}: target_cos has {target.numel()} values for {n} rows")
            known = torch.ones(n, dtype=torch.bool, device=cos.device)
        return _Targets(rows, cols, known, target)

    def _sum_across_shards(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.shard_comm is None else self.shard_comm.all_reduce_sum(t)

    def _same_on_all_shards(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.shard_comm is None else self.shard_comm.broadcast(t)

    @staticmethod
    def _set_target(logits: torch.Tensor, tg: _Targets, values: torch.Tensor) -> torch.Tensor:
        return logits.index_put((tg.rows, tg.cols), values)


class _FixedMarginHead(MarginHead):
    def __init__(self, in_features, out_features, s, m, subcenters=1):
        super().__init__(in_features, out_features, s, subcenters)
        self.m = float(m)


@register_head
class CosFace(_FixedMarginHead):
    """Large margin cosine loss: target logit s * (cos - m)."""

    def _margin(self, cos, tg, embeddings):
        return self._set_target(cos, tg, cos[tg.rows, tg.cols] - self.m) * self.s


@register_head
class ArcFace(_FixedMarginHead):
    """Additive angular margin: target logit s * cos(theta + m) (InsightFace fallback past pi - m)."""

    def _margin(self, cos, tg, embeddings):
        return self._set_target(cos, tg, arc_margin(cos[tg.rows, tg.cols], self.m)) * self.s


@register_head
class SubCenterArcFace(ArcFace):
    """Sub-center ArcFace (Deng et al., ECCV 2020): k sub-centres per class; a class's cosine is the largest
    over its sub-centres (max pooling), so a noisy sample can sit near a non-dominant sub-centre instead of
    pulling the dominant one; the ArcFace margin goes on that pooled cosine. k = 1 is ArcFace. (The paper's
    later step, dropping the non-dominant sub-centres and the samples far from the dominant one, is not here.)"""

    def __init__(self, in_features, out_features, s, m, k):
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not float(k).is_integer() or k < 1:
            raise ValueError(f"SubCenterArcFace: k (sub-centres per class) must be a whole number >= 1, got {k!r}")
        super().__init__(in_features, out_features, s, m, subcenters=int(k))
        self.k = int(k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


@register_head
class CurricularFace(MarginHead):
    """ArcFace target; a negative harder than the target (cos_j > cos(theta_y + m)) becomes
    cos_j * (t + cos_j), where t is an EMA (rate t_alpha) of the batch's mean target cosine: hard
    negatives weigh little early in training (t ~ 0) and more as t grows (curriculum)."""

    def __init__(self, in_features, out_features, s, m, t_alpha):
        super().__init__(in_features, out_features, s)
        self.m = float(m)
        self.t_alpha = float(t_alpha)
        self.register_buffer("t", torch.zeros(1))

    def _margin(self, cos, tg, embeddings):
        with torch.no_grad():
            sin_y = torch.sqrt((1.0 - tg.target * tg.target).clamp_min(0.0))
            # As the CurricularFace reference: the hardness threshold is cos(theta_y + m), no fallback.
            threshold = tg.target * math.cos(self.m) - sin_y * math.sin(self.m)
            if self.training and bool(tg.known.any()):
                self.t.mul_(1.0 - self.t_alpha).add_(self.t_alpha * tg.target[tg.known].mean())
            hard = (cos.detach() > threshold[:, None]) & tg.known[:, None]
        logits = torch.where(hard, cos * (self.t + cos), cos)
        return self._set_target(logits, tg, arc_margin(cos[tg.rows, tg.cols], self.m)) * self.s


@register_head
class AdaFace(MarginHead):
    """Quality-adaptive margin. The embedding norm ||z|| (a proxy of image quality) is standardised
    with EMA batch statistics (rate t_alpha) into r = clip(h * (||z|| - mean) / (std + eps), -1, 1);
    the target logit is s * (cos(clip(theta_y - m * r, eps, pi - eps)) - (m + m * r)).

    The statistics come from the norms of all rows of the batch, so the sharded classifier, which
    gives every shard the whole gathered batch, keeps them identical to one process."""

    eps = 1e-3

    def __init__(self, in_features, out_features, s, m, h, t_alpha):
        super().__init__(in_features, out_features, s)
        self.m = float(m)
        self.h = float(h)
        self.t_alpha = float(t_alpha)
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def _margin(self, cos, tg, embeddings):
        if embeddings is None:
            raise ValueError("AdaFace needs the (unnormalised) embeddings: their norm sets the margin")
        with torch.no_grad():
            norms = embeddings.detach().float().norm(dim=1).clamp(0.001, 100)
            if self.training and norms.numel() > 1:
                a = self.t_alpha
                self.batch_mean.mul_(1 - a).add_(a * norms.mean())
                self.batch_std.mul_(1 - a).add_(a * norms.std())
            scaler = ((norms - self.batch_mean) / (self.batch_std + self.eps) * self.h).clamp(-1, 1)
        r = scaler[tg.rows]
        theta = torch.acos(cos[tg.rows, tg.cols].clamp(-1 + self.eps, 1 - self.eps))
        theta_m = (theta - self.m * r).clamp(self.eps, math.pi - self.eps)
        return self._set_target(cos, tg, torch.cos(theta_m) - (self.m + self.m * r)) * self.s


class _ElasticHead(MarginHead):
    """Per-sample margin drawn from N(m, std) at every training step (ElasticFace).

    The "Plus" variants sort the draws by difficulty: the sample closest to its centre (largest
    target cosine) gets the smallest margin, the farthest the largest. (The ElasticFace reference
    indexes the sorted margins with the sort permutation instead of its inverse, which is not a
    ranking; here the ranking is applied as described.) In eval mode the margin is m for every row."""

    plus = False

    def __init__(self, in_features, out_features, s, m, std):
        super().__init__(in_features, out_features, s)
        self.m = float(m)
        self.std = float(std)

    def _row_margins(self, tg: _Targets) -> torch.Tensor:
        """(N,) margin of each row (0 where the target is unknown)."""
        n = tg.known.numel()
        if not self.training:
            return torch.full((n,), self.m, device=tg.target.device)
        known_rows = tg.known.nonzero().squeeze(1)
        draw = torch.normal(self.m, self.std, size=(known_rows.numel(),), device=tg.target.device)
        draw = self._same_on_all_shards(draw)  # one draw per sample, whichever shard holds its class
        if self.plus:
            easiest_first = torch.argsort(tg.target[known_rows], descending=True, stable=True)
            ranked = torch.empty_like(draw)
            ranked[easiest_first] = torch.sort(draw).values
            draw = ranked
        margins = torch.zeros(n, device=tg.target.device)
        margins[known_rows] = draw
        return margins

    def _margin(self, cos, tg, embeddings):
        margin = self._row_margins(tg)[tg.rows]
        return self._set_target(cos, tg, self._target_logit(cos[tg.rows, tg.cols], margin)) * self.s


@register_head
class ElasticArcFace(_ElasticHead):
    """ElasticFace-Arc: target cos(theta + m_i), m_i ~ N(m, std); theta + m_i capped at pi (there cos
    would grow again; the reference leaves it uncapped)."""

    def _target_logit(self, cos_y, margin):
        theta = torch.acos(cos_y.clamp(-1 + 1e-7, 1 - 1e-7))
        return torch.cos((theta + margin).clamp(max=math.pi))


@register_head
class ElasticArcFacePlus(ElasticArcFace):
    plus = True


@register_head
class ElasticCosFace(_ElasticHead):
    """ElasticFace-Cos: target cos - m_i, m_i ~ N(m, std)."""

    def _target_logit(self, cos_y, margin):
        return cos_y - margin


@register_head
class ElasticCosFacePlus(ElasticCosFace):
    plus = True


@register_head
class RobustFace(MarginHead):
    """Adaptive mining of hard and noisy negatives (RobustFace / AdaNH-Face, DeepFaceCode/RobustFace).

    Our reading of the reference loss (its losses.py; the paper text was not available):
    - target: ArcFace, cos(theta_y + m) with the InsightFace fallback (m = 0.5);
    - hard negatives, cos_j > that target logit: scaled by (1 + t) (t = 0.2), pushed harder;
    - suspected-noise negatives, cos_j > cos(theta_y + m1) with m1 = -0.15, i.e. a class at least
      |m1| rad closer to the sample than its own label (the label is probably wrong): their logit is
      damped by (1 - phi / (1 - mu))^2 instead, so the sample is not forced away from the class it
      most likely belongs to. (Noise negatives are also hard; damping takes precedence.);
    - phi: EMA (rate phi_alpha) of the fraction of "easy" negative logits (not hard) in the batch,
      counted over the whole global batch and all classes; mu is the expected noise rate, so
      1 - mu is the expected clean fraction.
    Departures from the reference, on purpose: m1 stays fixed (the reference rescales it by
    (1 - phi/(1 - mu)) cumulatively at every step, which drives it to 0 or flips its sign); where
    theta_y < |m1| nothing can be |m1| closer, so no negative is noise (the reference's mirrored
    fallback flags some); damped negative logits are not clamped to 1e-30; the easy fraction is over
    negative logits only (the reference also counts each row's target column as hard).
    Pass a positive m1 for the looser reading cos_j > cos(theta_y + |m1|)."""

    def __init__(self, in_features, out_features, s, m, m1, t, mu, phi_alpha):
        super().__init__(in_features, out_features, s)
        self.m = float(m)
        self.m1 = float(m1)
        self.t = float(t)
        self.mu = float(mu)
        self.phi_alpha = float(phi_alpha)
        if not 0.0 <= self.mu < 1.0:
            raise ValueError(f"RobustFace: mu (expected noise rate) must be in [0, 1), got {mu}")
        self.register_buffer("phi", torch.zeros(()))

    def _margin(self, cos, tg, embeddings):
        with torch.no_grad():
            target_logit = arc_margin(tg.target, self.m)
            theta_y = torch.acos(tg.target.clamp(-1.0, 1.0))
            noise_threshold = torch.cos((theta_y + self.m1).clamp(0.0, math.pi))
            negative = tg.known[:, None].expand_as(cos).clone()
            negative[tg.rows, tg.cols] = False
            c = cos.detach()
            hard = negative & (c > target_logit[:, None])
            noise = negative & (c > noise_threshold[:, None])
            if self.training:
                counts = torch.stack([(negative & ~hard).sum(), negative.sum()]).to(torch.float64)
                easy, total = self._sum_across_shards(counts).tolist()
                if total > 0:
                    self.phi.mul_(1.0 - self.phi_alpha).add_(self.phi_alpha * easy / total)
            damping = (1.0 - self.phi / (1.0 - self.mu)) ** 2
        logits = torch.where(noise, cos * damping, torch.where(hard, cos * (1.0 + self.t), cos))
        return self._set_target(logits, tg, arc_margin(cos[tg.rows, tg.cols], self.m)) * self.s
