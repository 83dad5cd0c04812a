"""Models: loading and saving, and the per-family architecture adapters."""

from slimformer.models.adapters import FAMILIES, SUPPORTED_MODEL_TYPES, Adapter, Family, get_adapter, weight_matrix
from slimformer.models.loading import ALIASES, DEFAULT_MODEL, LoadedModel, load_model, save_model

__all__ = [
    "ALIASES",
    "DEFAULT_MODEL",
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "Family",
    "LoadedModel",
    "get_adapter",
    "load_model",
    "save_model",
    "weight_matrix",
]
