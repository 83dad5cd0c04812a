"""Models: loading and saving, and the per-family architecture adapters."""

from slimformer.models.adapters import BOS_MODES, FAMILIES, SUPPORTED_MODEL_TYPES, Adapter, Family, get_adapter, weight_matrix
from slimformer.models.loading import ALIASES, DEFAULT_MODEL, LoadedModel, added_bos, load_model, save_model, window_bos

__all__ = [
    "ALIASES",
    "BOS_MODES",
    "DEFAULT_MODEL",
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "Adapter",
    "Family",
    "added_bos",
    "LoadedModel",
    "get_adapter",
    "load_model",
    "save_model",
    "window_bos",
    "weight_matrix",
]
