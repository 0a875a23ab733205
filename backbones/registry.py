"""Backbone registry: `@register_model` on a builder, `get_model(name, **kwargs)`, `list_models()`.

A builder is a function `name(**kwargs) -> nn.Module`. The module it returns records its resolved
constructor arguments in `model.model_args`; `get_model` adds `model.model_name`, so that
`get_model(m.model_name, **m.model_args)` rebuilds the same architecture from a checkpoint.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from torch import nn

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `builder` under its function name (the name `get_model` accepts)."""
    name = builder.__name__
    if name in _MODELS:
        raise ValueError(f"backbone {name!r} is registered twice")
    _MODELS[name] = builder
    return builder


def list_models() -> List[str]:
    """The registered backbone names, sorted."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Build the backbone `name`; kwargs go to its constructor (e.g. num_features=512, input_size=112)."""
    if name not in _MODELS:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(list_models())}")
    model = _MODELS[name](**kwargs)
    model.model_name = name
    return model
