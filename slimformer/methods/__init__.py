"""Compression methods: each is a config dataclass plus one function, found by the config's type."""

from slimformer.methods.base import METHODS, MethodResult, apply, config_dict, select_linears
from slimformer.methods.blocks import SLEBConfig
from slimformer.methods.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig
from slimformer.methods.quantization import AWQConfig, GPTQConfig, RTNConfig
from slimformer.methods.recovery import DistillConfig, FinetuneConfig, LoRAConfig

__all__ = [
    "AWQConfig",
    "DistillConfig",
    "GPTQConfig",
    "LoRAConfig",
    "METHODS",
    "RTNConfig",
    "FinetuneConfig",
    "MagnitudeConfig",
    "MethodResult",
    "SLEBConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "apply",
    "config_dict",
    "select_linears",
]
