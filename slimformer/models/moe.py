"""Mixture-of-experts models: upcycling a dense decoder into the PESC model class, its registration and remote-code export, and the expert surgery (keep, merge) of PESC and stock MoE models.

The model class itself lives in :mod:`slimformer.models.pesc_modeling`, which imports nothing
from slimformer so that it can be copied next to a checkpoint as remote code.

Stock MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE in transformers 5) share one layout:
a sparse block with a router ``gate`` (weight ``(n, hidden)``) and ``experts`` whose weights are
stacked along a first expert dimension (``gate_up_proj (n, 2·inter, hidden)``, the gate half
first, and ``down_proj (n, hidden, inter)``). A PESC block has ``router`` and ``experts.down`` /
``experts.up``. Surgery works on that expert dimension, so the result is the same class with
fewer experts, which stock transformers loads.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from slimformer.errors import SlimformerError
from slimformer.models import pesc_modeling
from slimformer.models.pesc_modeling import MODEL_TYPE, PescConfig, PescForCausalLM, PescMLP, router_losses

pesc_modeling._register()  # AutoConfig / AutoModelForCausalLM know "slimformer_pesc" once slimformer is imported

REMOTE_CODE_FILE = "modeling_pesc.py"
GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")

__all__ = ["MODEL_TYPE", "PescConfig", "PescForCausalLM", "PescMLP", "expert_outputs", "expert_weights", "export_remote_code", "is_pesc",
           "keep_experts", "merge_experts", "moe_modules", "pesc_layers", "router_losses", "router_weight", "routing",
           "routing_shares", "set_expert_count", "top_k_of", "upcycle"]


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


# -- expert surgery ----------------------------------------------------------------------------
_COUNT_FIELDS = ("num_local_experts", "num_experts")  # Mixtral's name, then Qwen-MoE's, OLMoE's and PESC's


def moe_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The sparse mixture-of-experts blocks of a model by name: PESC FFNs and stock MoE blocks."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, PescMLP) or (hasattr(m, "gate") and hasattr(getattr(m, "experts", None), "gate_up_proj"))}


def router_weight(block: torch.nn.Module) -> torch.nn.Parameter:
    """The router weight ``(n, hidden)`` of a MoE block."""
    return block.router.weight if isinstance(block, PescMLP) else block.gate.weight


def _expert_params(block: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of every parameter stacked along the expert dimension (the router's included)."""
    if isinstance(block, PescMLP):
        return [(block.router, "weight"), (block.experts, "down"), (block.experts, "up")]
    return [(block.gate, "weight"), (block.experts, "gate_up_proj"), (block.experts, "down_proj")]


def expert_weights(block: torch.nn.Module) -> list[torch.Tensor]:
    """The experts' stacked weights (first dimension: the expert), the router's left out."""
    return [getattr(m, n) for m, n in _expert_params(block)[1:]]


def top_k_of(block: torch.nn.Module) -> int:
    """How many experts the block routes each token to."""
    return block.top_k if isinstance(block, PescMLP) else block.gate.top_k


@torch.no_grad()
def routing(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(router logits ``(N, n)``, chosen experts ``(N, k)``) of the block's inputs ``x`` ``(N, hidden)``.

    The top-k of the logits is the top-k of the softmax every router here takes it from.
    """
    logits = x @ router_weight(block).t()
    return logits, logits.topk(top_k_of(block), dim=-1).indices


@torch.no_grad()
def expert_outputs(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, N, hidden)``: what each expert adds for inputs ``x`` ``(N, hidden)`` before its routing weight.

    For PESC, the adapter's output on the shared FFN's output (the shared FFN itself is common to all).
    """
    if isinstance(block, PescMLP):
        f = block.down_proj(block.act_fn(block.gate_proj(x)) * block.up_proj(x))
        e = block.experts
        return torch.stack([e.act(f @ e.down[i].t()) @ e.up[i].t() for i in range(e.down.shape[0])])
    experts = block.experts
    outs = []
    for i in range(experts.gate_up_proj.shape[0]):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[i]).chunk(2, dim=-1)
        outs.append(torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[i]))
    return torch.stack(outs)


def _set_count(block: torch.nn.Module, n: int) -> None:
    for module in (block, getattr(block, "gate", None), getattr(block, "experts", None)):
        if module is not None and hasattr(module, "num_experts"):
            module.num_experts = n


@torch.no_grad()
def keep_experts(block: torch.nn.Module, keep: Sequence[int]) -> None:
    """Keep only the experts ``keep`` (in that order) of one MoE block; the router keeps their rows.

    Routers softmax over the logits that are left, so the routing weights renormalise by themselves.
    """
    n = router_weight(block).shape[0]
    keep = list(keep)
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= e < n for e in keep):
        raise SlimformerError(f"experts to keep must be distinct indices in [0, {n}), not {keep}")
    if len(keep) < top_k_of(block):
        raise SlimformerError(f"cannot keep {len(keep)} experts: every token is routed to {top_k_of(block)}")
    index = torch.tensor(keep)
    for module, name in _expert_params(block):
        p = getattr(module, name)
        setattr(module, name, torch.nn.Parameter(p.data.index_select(0, index.to(p.device)).clone(),
                                                 requires_grad=p.requires_grad))
    _set_count(block, len(keep))


@torch.no_grad()
def merge_experts(block: torch.nn.Module, groups: Sequence[Sequence[int]], weights: torch.Tensor) -> None:
    """Merge each group of experts into one: its expert weights averaged with ``weights`` (per expert), the router row of its first expert.

    After merging, group ``g`` is expert ``g``. As in M-SMoE (Li et al., 2024), the router keeps the
    row of the group's dominant expert (put it first), so tokens that went to it still go to the group.
    """
    n = router_weight(block).shape[0]
    flat = [e for g in groups for e in g]
    if sorted(flat) != list(range(n)) or any(not g for g in groups):
        raise SlimformerError(f"merge groups must partition the {n} experts, not {groups}")
    if len(groups) < top_k_of(block):
        raise SlimformerError(f"cannot merge into {len(groups)} experts: every token is routed to {top_k_of(block)}")
    w = weights.double().clamp_min(0) + 1e-12  # an expert nobody chose still counts a little
    for module, name in _expert_params(block):
        p = getattr(module, name)
        rows = []
        for g in groups:
            if module is getattr(block, "router", None) or module is getattr(block, "gate", None):
                rows.append(p.data[g[0]])
            else:
                share = (w[list(g)] / w[list(g)].sum()).to(p.dtype).to(p.device)
                rows.append(torch.einsum("g,g...->...", share, p.data[list(g)]))
        setattr(module, name, torch.nn.Parameter(torch.stack(rows), requires_grad=p.requires_grad))
    _set_count(block, len(groups))


def set_expert_count(config, n: int) -> None:
    """Write the experts-per-block count into a config (every count field it has)."""
    fields = [f for f in _COUNT_FIELDS if f in config.to_dict()]
    if not fields:
        raise SlimformerError(f"{config.model_type}: no expert count field ({', '.join(_COUNT_FIELDS)}) in its config")
    for f in fields:
        setattr(config, f, n)
