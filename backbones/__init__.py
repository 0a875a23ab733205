"""Face-recognition backbones behind one registry.

    model = get_model("iresnet50", num_features=512, input_size=112)
    again = get_model(model.model_name, **model.model_args)   # what a checkpoint stores

Adding a backbone: a module with a `@register_model` builder, imported below.
"""
from backbones.registry import get_model, list_models, register_model

# Importing the modules registers their builders.
from backbones import iresnet, mobilefacenet, smallnet  # noqa: E402,F401  isort:skip

__all__ = ["get_model", "list_models", "register_model"]
