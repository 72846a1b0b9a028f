"""Model loading: built-in CIFAR-style networks, torchvision models by name, and user factories."""
from wf_pipeline.models.zoo import (
    BUILTIN_CHECKPOINTS,
    DEFAULT_CHECKPOINT,
    build_model,
    load_default_model,
    load_weights,
    resolve_builtin,
)

__all__ = [
    "BUILTIN_CHECKPOINTS",
    "DEFAULT_CHECKPOINT",
    "build_model",
    "load_default_model",
    "load_weights",
    "resolve_builtin",
]
