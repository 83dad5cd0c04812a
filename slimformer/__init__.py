"""slimformer: make Transformer models smaller and faster with a measured, small loss of quality."""

from slimformer.errors import SlimformerError

__all__ = ["Adapter", "LoadedModel", "SlimformerError", "compress", "get_adapter", "load_model", "save_model"]
__version__ = "0.1.0"

_LAZY = {"Adapter": "slimformer.models", "LoadedModel": "slimformer.models", "get_adapter": "slimformer.models",
         "load_model": "slimformer.models", "save_model": "slimformer.models", "compress": "slimformer.recipes"}


def __getattr__(name: str):
    # torch and transformers load only when a model is asked for: `slimformer --help` answers at once
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slimformer' has no attribute '{name}'")
