"""slimformer: make Transformer models smaller and faster with a measured, small loss of quality."""

from slimformer.errors import SlimformerError
from slimformer.models import Adapter, LoadedModel, get_adapter, load_model, save_model

__all__ = ["Adapter", "LoadedModel", "SlimformerError", "get_adapter", "load_model", "save_model"]
__version__ = "0.1.0"
