"""The models: a registry (:mod:`celeba_dist.models.registry`) and one module per model, each registering
itself on import. Importing this package imports them all, so every registered name is buildable.
"""
from celeba_dist.models import celeb_cnn, lstm_attn, resnext, simple_cnn, torchvision_any  # noqa: F401
from celeba_dist.models.registry import (MODELS, TORCHVISION_PREFIX, ModelSpec, build_model, count_parameters,
                                         expected_normalize, list_models, model_spec, register_model,
                                         trainable_parameters)

__all__ = [
    "MODELS", "TORCHVISION_PREFIX", "ModelSpec", "build_model", "count_parameters", "expected_normalize",
    "list_models", "model_spec", "register_model", "trainable_parameters",
]
