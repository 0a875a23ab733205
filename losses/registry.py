"""Margin-head registry and the one table of head hyper-parameters.

`HEAD_DEFAULTS[name]` lists every keyword a head accepts with its default; `get_head` fills the
missing ones from it and refuses others, so the config can offer exactly these keys.
"""
from __future__ import annotations

from typing import Dict, List, Type

from torch import nn

# s: scale of the cosine logits; m: margin; see each class in losses/heads.py for the others.
HEAD_DEFAULTS: Dict[str, Dict[str, float]] = {
    "CosFace": {"s": 64.0, "m": 0.35},
    "ArcFace": {"s": 64.0, "m": 0.5},
    # k: sub-centres per class (a whole number; max pooling over them).
    "SubCenterArcFace": {"s": 64.0, "m": 0.5, "k": 3},
    "CurricularFace": {"s": 64.0, "m": 0.5, "t_alpha": 0.01},
    "AdaFace": {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01},
    # Elastic std values as the DiffProb / ElasticFace configs set them (the "+" variants use a narrower one).
    "ElasticArcFace": {"s": 64.0, "m": 0.5, "std": 0.05},
    "ElasticArcFacePlus": {"s": 64.0, "m": 0.5, "std": 0.0175},
    "ElasticCosFace": {"s": 64.0, "m": 0.35, "std": 0.05},
    "ElasticCosFacePlus": {"s": 64.0, "m": 0.35, "std": 0.02},
    # mu: expected noise rate (the RobustFace configs: 0.15 closed-set + 0.05 open-set).
    "RobustFace": {"s": 64.0, "m": 0.5, "m1": -0.15, "t": 0.2, "mu": 0.2, "phi_alpha": 0.01},
}

_HEADS: Dict[str, Type[nn.Module]] = {}


def register_head(cls: Type[nn.Module]) -> Type[nn.Module]:
    """Register a head class under its class name; its defaults must be a row of HEAD_DEFAULTS."""
    name = cls.__name__
    if name not in HEAD_DEFAULTS:
        raise ValueError(f"head {name!r} has no row in losses.registry.HEAD_DEFAULTS")
    if name in _HEADS:
        raise ValueError(f"head {name!r} is registered twice")
    _HEADS[name] = cls
    return cls


def list_heads() -> List[str]:
    """The registered head names (canonical spelling), in table order."""
    return [name for name in HEAD_DEFAULTS if name in _HEADS]


def canonical_head_name(name: str) -> str:
    """The registered spelling of `name` (lookup is case-insensitive); ValueError listing the names."""
    by_lower = {n.lower(): n for n in _HEADS}
    if not isinstance(name, str) or name.lower() not in by_lower:
        raise ValueError(f"unknown head {name!r}; valid names: {', '.join(list_heads())}")
    return by_lower[name.lower()]


def get_head(name: str, in_features: int, out_features: int, **kwargs) -> nn.Module:
    """Build margin head `name` with `out_features` class centres of dimension `in_features`.

    kwargs override the HEAD_DEFAULTS row; a keyword the head does not take raises ValueError."""
    name = canonical_head_name(name)
    defaults = HEAD_DEFAULTS[name]
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise ValueError(f"head {name} does not take {', '.join(unknown)}; its keywords: {', '.join(defaults)}")
    args = {**defaults, **kwargs}
    head = _HEADS[name](in_features, out_features, **args)
    head.head_name = name
    head.head_args = dict(args)
    return head
