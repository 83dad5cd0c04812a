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
from slimformer.models.quantized import is_quantized
from slimformer.models import pesc_modeling
from slimformer.models.pesc_modeling import (MODEL_TYPE, PescConfig, PescForCausalLM, PescMLP, balancing_loss,
                                             router_losses)

pesc_modeling._register()  # AutoConfig / AutoModelForCausalLM know "slimformer_pesc" once slimformer is imported

REMOTE_CODE_FILE = "modeling_pesc.py"
GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")

__all__ = ["MODEL_TYPE", "PescConfig", "PescForCausalLM", "PescMLP", "expert_outputs", "expert_weights", "export_remote_code", "is_pesc", "RouterTap",
           "keep_experts", "merge_experts", "moe_modules", "moe_modules_within", "parameter_counts", "pesc_layers",
           "router_losses", "router_weight", "routing",
           "routing_shares", "set_expert_count", "top_k_of", "upcycle", "upcycle_qwen2_moe"]


def is_pesc(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PESC model."""
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def pesc_layers(model: torch.nn.Module) -> dict[str, PescMLP]:
    """The mixture-of-adapter-experts FFNs of a model by name (empty for a dense model)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PescMLP)}


def _check_shape(experts: int, top_k: int, width: int, layers: list[int] | None, n: int, what: str) -> None:
    """Refuse an expert count, top-k, expert width or block list no upcycling can use."""
    if experts < 1 or not 1 <= top_k <= experts:
        raise SlimformerError(f"top_k must be between 1 and the number of experts ({experts}), not {top_k}")
    if width < 1:
        raise SlimformerError(f"{what} width must be at least 1, not {width}")
    if layers is not None and (not layers or any(not 0 <= i < n for i in layers)):
        raise SlimformerError(f"layers must be block indices in [0, {n}), not {layers}")


def _load_dense(out: PreTrainedModel, state: dict, new: tuple[str, ...], what: str) -> None:
    """Load the dense weights ``state`` into the upcycled ``out``; only parameters named by ``new`` (and a tied head) may be missing."""
    missing, unexpected = out.load_state_dict(state, strict=False)
    fresh = [k for k in missing if not any(s in k for s in new) and k != "lm_head.weight"]
    if unexpected or fresh:
        raise SlimformerError(f"cannot upcycle {what}: weights do not match "
                              f"(missing {fresh[:3]}, unexpected {unexpected[:3]})")
    out.tie_weights()


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
    if is_quantized(model):
        raise SlimformerError("upcycle before quantizing: the experts share the FFN's float weights")
    blocks = model.base_model.layers if hasattr(model.base_model, "layers") else None
    if blocks is None or not all(hasattr(b, "mlp") and all(hasattr(b.mlp, a) for a in GATED) for b in blocks):
        raise SlimformerError(f"PESC upcycles gated FFNs (gate/up/down projections, as in Llama, Mistral, Qwen2, "
                              f"Gemma); {config.model_type} has none")
    if getattr(config, "slimformer_layer_shapes", None):
        raise SlimformerError("PESC needs blocks of one shape; this model's blocks were pruned to different widths")
    adapter_dim = config.hidden_size // 8 if adapter_dim is None else adapter_dim
    _check_shape(experts, top_k, adapter_dim, layers, len(blocks), "adapter")
    pesc = PescConfig.from_dense(config, num_experts=experts, num_experts_per_tok=top_k, adapter_dim=adapter_dim,
                                 adapter_act=adapter_act, moe_layers=sorted(set(layers)) if layers is not None else None,
                                 router_aux_loss_coef=aux_loss, router_z_loss_coef=z_loss)
    dtype = next(model.parameters()).dtype
    out = PescForCausalLM(pesc).to(dtype)
    _load_dense(out, model.state_dict(), (".router.", ".experts."), config.model_type)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    with torch.no_grad():
        for mlp in pesc_layers(out).values():
            for p in (mlp.router.weight, mlp.experts.down):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            mlp.experts.up.zero_()
    out.generation_config = model.generation_config
    return out.eval()


QWEN2_MOE_SOURCES = ("llama", "mistral", "qwen2")  # block layouts a stock Qwen2-MoE block reproduces exactly


def upcycle_qwen2_moe(model: PreTrainedModel, *, experts: int = 8, top_k: int = 2, expert_dim: int | None = None,
                      layers: list[int] | None = None, aux_loss: float = 0.01, seed: int = 0) -> PreTrainedModel:
    """The dense decoder ``model`` as a stock ``Qwen2MoeForCausalLM`` that computes the same function.

    The same idea as PESC in a layout stock transformers, vLLM and llama.cpp load without custom
    code: the original FFN becomes the shared expert, and ``experts`` small routed SwiGLU experts
    of width ``expert_dim`` (default hidden / 8) start with a zero ``down_proj``. Qwen2-MoE gates
    the shared expert by ``sigmoid(w · x)``: ``w`` starts at zero (a gate of exactly 0.5) and the
    shared expert's ``down_proj`` is doubled, so the block computes the dense FFN exactly. The
    router softmaxes over all experts (``norm_topk_prob: false``).
    """
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = model.config
    if is_quantized(model):
        raise SlimformerError("upcycle before quantizing: the shared expert takes the FFN's float weights")
    if c.model_type not in QWEN2_MOE_SOURCES:
        raise SlimformerError(f"the Qwen2-MoE layout reproduces {', '.join(QWEN2_MOE_SOURCES)} blocks exactly; "
                              f"{c.model_type} differs (use the PESC layout)")
    if getattr(c, "slimformer_layer_shapes", None):
        raise SlimformerError("upcycling needs blocks of one shape; this model's blocks were pruned to different widths")
    blocks = model.base_model.layers
    if blocks[0].self_attn.o_proj.bias is not None or blocks[0].mlp.down_proj.bias is not None:
        raise SlimformerError("Qwen2-MoE has no bias on o_proj or the FFN; this model has one")
    expert_dim = c.hidden_size // 8 if expert_dim is None else expert_dim
    n = len(blocks)
    _check_shape(experts, top_k, expert_dim, layers, n, "expert")
    chosen = set(range(n) if layers is None else layers)
    fields = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "num_key_value_heads", "hidden_act",
                                         "max_position_embeddings", "initializer_range", "rms_norm_eps",
                                         "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id",
                                         "bos_token_id", "eos_token_id") if getattr(c, k, None) is not None}
    window = getattr(c, "sliding_window", None)
    if window and (c.model_type == "mistral" or getattr(c, "use_sliding_window", False)):
        fields.update(use_sliding_window=True, sliding_window=window, max_window_layers=n,
                      layer_types=getattr(c, "layer_types", None) or ["sliding_attention"] * n)
    config = Qwen2MoeConfig(**fields, moe_intermediate_size=expert_dim, shared_expert_intermediate_size=c.intermediate_size,
                            num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=False,
                            router_aux_loss_coef=aux_loss, decoder_sparse_step=1,
                            mlp_only_layers=sorted(set(range(n)) - chosen),
                            qkv_bias=blocks[0].self_attn.q_proj.bias is not None)
    if getattr(c, "head_dim", None) and c.head_dim != c.hidden_size // c.num_attention_heads:
        raise SlimformerError("Qwen2-MoE derives the head width from hidden / heads; this model's differs")
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) > 4 and parts[1] == "layers" and parts[3] == "mlp" and int(parts[2]) in chosen:
            key = ".".join(parts[:4] + ["shared_expert"] + parts[4:])
            value = value * 2 if parts[4] == "down_proj" else value  # undoes the shared gate's sigmoid(0) = 0.5
        state[key] = value
    out = Qwen2MoeForCausalLM(config).to(next(model.parameters()).dtype)
    _load_dense(out, state, (".mlp.gate.", ".mlp.experts.", "shared_expert_gate"), f"{c.model_type} into Qwen2-MoE")
    generator = torch.Generator().manual_seed(seed)
    std = getattr(c, "initializer_range", 0.02)
    with torch.no_grad():
        for i in sorted(chosen):
            mlp = out.model.layers[i].mlp
            for p in (mlp.gate.weight, mlp.experts.gate_up_proj):
                p.copy_(torch.randn(p.shape, generator=generator) * std)
            mlp.experts.down_proj.zero_()
            mlp.shared_expert_gate.weight.zero_()
    out.generation_config = model.generation_config
    return out.eval()


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total parameters of a model, and those one token activates (in each MoE block, only its k routed experts)."""
    total = sum(p.numel() for p in model.parameters())
    idle = sum((router_weight(b).shape[0] - top_k_of(b)) * sum(w[0].numel() for w in expert_weights(b))
               for b in moe_modules(model).values())
    return {"total": total, "activated": total - idle}


class RouterTap:
    """Forward hooks on the router of every MoE block (PESC or stock) that keep the logits of the last forward.

    ``losses()`` gives the balancing loss and z-loss of that forward averaged over the blocks, the
    same definitions as :func:`slimformer.models.pesc_modeling.router_losses`, for any MoE layout.
    """

    def __init__(self, model: torch.nn.Module):
        self.blocks = moe_modules(model)
        self.logits: dict[str, torch.Tensor] = {}
        self._handles = [(b.router if isinstance(b, PescMLP) else b.gate).register_forward_hook(self._keep(name))
                         for name, b in self.blocks.items()]

    def _keep(self, name: str):
        def hook(module, args, out):
            self.logits[name] = out[0] if isinstance(out, tuple) else out
        return hook

    def losses(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(balancing loss, z-loss) of the last forward; None before any."""
        if not self.logits:
            return None, None
        aux = sum(balancing_loss(x, x.topk(top_k_of(self.blocks[n]), -1).indices) for n, x in self.logits.items())
        z = sum(torch.logsumexp(x.float(), -1).pow(2).mean() for x in self.logits.values())
        return aux / len(self.logits), z / len(self.logits)

    def shares(self) -> dict[str, list[float]]:
        """Per block, the share of the last forward's routing slots each expert got."""
        out = {}
        for name, x in self.logits.items():
            counts = torch.bincount(x.topk(top_k_of(self.blocks[name]), -1).indices.reshape(-1),
                                    minlength=x.shape[-1]).double()
            out[name] = (counts / counts.sum()).tolist()
        return out

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


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


def moe_modules_within(blocks: dict[str, torch.nn.Module], block: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Those of ``blocks`` (by name, from :func:`moe_modules`) that are inside the transformer ``block``."""
    mine = {id(m) for m in block.modules()}
    return {name: m for name, m in blocks.items() if id(m) in mine}


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
        setattr(module, name, torch.nn.Parameter(p.data.index_select(0, index.to(p.device)),  # a new tensor
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
