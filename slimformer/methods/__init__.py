"""Compression methods: each is a config dataclass plus one function, found by the config's type."""

from slimformer.methods.base import METHODS, MethodResult, apply, config_dict, select_linears
from slimformer.methods.blocks import SLEBConfig
from slimformer.methods.experts import ExpertMergeConfig, ExpertPruneConfig
from slimformer.methods.pesc import InstructConfig, UpcycleConfig
from slimformer.methods.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig
from slimformer.methods.quantization import AWQConfig, GPTQConfig, RTNConfig
from slimformer.methods.recovery import DistillConfig, FinetuneConfig, LoRAConfig
from slimformer.methods.width import WidthConfig

__all__ = [
    "AWQConfig",
    "DistillConfig",
    "ExpertMergeConfig",
    "ExpertPruneConfig",
    "GPTQConfig",
    "InstructConfig",
    "LoRAConfig",
    "METHODS",
    "RTNConfig",
    "FinetuneConfig",
    "MagnitudeConfig",
    "MethodResult",
    "SLEBConfig",
    "SparseGPTConfig",
    "UpcycleConfig",
    "WandaConfig",
    "WidthConfig",
    "apply",
    "config_dict",
    "select_linears",
]
