"""Mixture-of-experts models: upcycling a dense decoder into the PESC model class, its registration, and its remote-code export.

The model class itself lives in :mod:`slimformer.models.pesc_modeling`, which imports nothing
from slimformer so that it can be copied next to a checkpoint as remote code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel

from slimformer.errors import SlimformerError
from slimformer.models import pesc_modeling
from slimformer.models.pesc_modeling import MODEL_TYPE, PescConfig, PescForCausalLM, PescMLP, router_losses

pesc_modeling._register()  # AutoConfig / AutoModelForCausalLM know "slimformer_pesc" once slimformer is imported

REMOTE_CODE_FILE = "modeling_pesc.py"
GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")

__all__ = ["MODEL_TYPE", "PescConfig", "PescForCausalLM", "PescMLP", "export_remote_code", "is_pesc", "pesc_layers",
           "router_losses", "routing_shares", "upcycle"]


def is_pesc(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PESC model."""
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def pesc_layers(model: torch.nn.Module) -> dict[str, PescMLP]:
    """The mixture-of-adapter-experts FFNs of a model by name (empty for a dense model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PescMLP)}


def upcycle(model: PreTrainedModel, *, experts: int = 8, top_k: int = 2, adapter_dim: int | None = None,
            layers: list[int] | None = None, adapter_act: str = "silu", aux_loss: float = 0.01, z_loss: float = 0.0,
            seed: int = 0) -> PescForCausalLM:
    """The dense decoder ``model`` as a PESC model that computes the same function (every adapter's ``up`` is zero).

    ``adapter_dim`` defaults to hidden / 8; ``layers`` (block indices) to every block. Router and
    adapter ``down`` weights are drawn from N(0, initializer_range²) with ``seed``.
    """
    config = model.config
    if is_pesc(model):
        raise SlimformerError("the model is already a mixture of adapter experts")
    blocks = model.base_model.layers if hasattr(model.base_model, "layers") else None
    if blocks is None or not all(hasattr(b, "mlp") and all(hasattr(b.mlp, a) for a in GATED) for b in blocks):
        raise SlimformerError(f"PESC upcycles gated FFNs (gate/up/down projections, as in Llama, Mistral, Qwen2, "
                              f"Gemma); {config.model_type} has none")
    if getattr(config, "slimformer_layer_shapes", None):
        raise SlimformerError("PESC needs blocks of one shape; this model's blocks were pruned to different widths")
    adapter_dim = config.hidden_size // 8 if adapter_dim is None else adapter_dim
    if experts < 1 or not 1 <= top_k <= experts:
        raise SlimformerError(f"top_k must be between 1 and the number of experts ({experts}), not {top_k}")
    if adapter_dim < 1:
        raise SlimformerError(f"adapter width must be at least 1, not {adapter_dim}")
    n = len(blocks)
    if layers is not None and (not layers or any(not 0 <= i < n for i in layers)):
        raise SlimformerError(f"layers must be block indices in [0, {n}), not {layers}")
    pesc = PescConfig.from_dense(config, num_experts=experts, num_experts_per_tok=top_k, adapter_dim=adapter_dim,
                                 adapter_act=adapter_act, moe_layers=sorted(set(layers)) if layers is not None else None,
                                 router_aux_loss_coef=aux_loss, router_z_loss_coef=z_loss)
    dtype = next(model.parameters()).dtype
    out = PescForCausalLM(pesc).to(dtype)
    missing, unexpected = out.load_state_dict(model.state_dict(), strict=False)
    fresh = [k for k in missing if ".router." not in k and ".experts." not in k and k != "lm_head.weight"]
    if unexpected or fresh:
        raise SlimformerError(f"cannot upcycle {config.model_type}: weights do not match "
                              f"(missing {fresh[:3]}, unexpected {unexpected[:3]})")
    out.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for mlp in pesc_layers(out).values():
            for p in (mlp.router.weight, mlp.experts.down):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            mlp.experts.up.zero_()
    out.generation_config = model.generation_config
    return out.eval()


def routing_shares(model: torch.nn.Module) -> dict[str, list[float]]:
    """Per upcycled block, the share of the last forward's routing slots that went to each expert."""
    shares = {}
    for name, mlp in pesc_layers(model).items():
        if mlp.selected is not None:
            counts = torch.bincount(mlp.selected.reshape(-1), minlength=mlp.router.weight.shape[0]).double()
            shares[name] = (counts / counts.sum()).tolist()
    return shares


def export_remote_code(folder: str | Path) -> None:
    """Put the modeling file beside a saved PESC checkpoint and point ``auto_map`` at it (for ``trust_remote_code=True``)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise SlimformerError(f"{folder} does not hold a PESC model (model_type {config.get('model_type')!r})")
    shutil.copyfile(pesc_modeling.__file__, folder / REMOTE_CODE_FILE)
    module = REMOTE_CODE_FILE.removesuffix(".py")
    config["auto_map"] = {"AutoConfig": f"{module}.PescConfig", "AutoModelForCausalLM": f"{module}.PescForCausalLM"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
