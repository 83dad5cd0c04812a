"""slimformer: make Transformer models smaller and faster with a measured, small loss of quality."""

from slimformer.errors import SlimformerError
from slimformer.models import Adapter, LoadedModel, get_adapter, load_model, save_model

__all__ = ["Adapter", "LoadedModel", "SlimformerError", "compress", "get_adapter", "load_model", "save_model"]


def __getattr__(name: str):
    # The recipe runner pulls in evaluation and reporting; load it only when it is asked for.
    if name == "compress":
        from slimformer.recipes import compress

        return compress
    raise AttributeError(f"module 'slimformer' has no attribute '{name}'")
__version__ = "0.1.0"
