"""Sparsity crafting (PESC, Wu et al., 2024): upcycle a dense decoder into a mixture of adapter experts, and instruction-tune it.

Two recipe steps:

- ``pesc`` turns every chosen block's FFN into a mixture of adapter experts that computes the
  same function as before (see :mod:`slimformer.models.pesc_modeling`);
- ``instruct`` tunes a model on instruction data, with the loss on response tokens only: LoRA
  (``peft``) on the attention and FFN projections (a stock MoE's shared expert included), and
  on a MoE model the experts, routers and shared-expert gate trained in full, with the
  load-balancing loss. The defaults follow the paper's schedule (constant learning rate 2e-4
  after a 3% warm-up, no weight decay). The same step on the dense model is the paper's
  "Camel" baseline; on the PESC model, "Camelidae".

A quantized base (QLoRA-style) trains as every recovery step does: LoRA over the dequantized,
frozen weights, merged and put back on each weight's own grid at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from slimformer.calibration import BlockRunner
from slimformer.errors import SlimformerError
from slimformer.methods.base import CalibratedFields, MethodResult, config_dict, register
from slimformer.methods.distill_math import chunked_head_loss, next_token_ce
from slimformer.methods.training import TrainingFields, split_windows, training_session
from slimformer.models.adapters import Adapter, config_family
from slimformer.models.moe import (RouterTap, moe_modules, moe_modules_within, parameter_counts, router_weight,
                                   upcycle, upcycle_qwen2_moe)

LAYOUTS = ("pesc", "qwen2_moe")
ROUTER_INITS = ("data", "random")


@dataclass(frozen=True)
class UpcycleConfig(CalibratedFields):
    """PESC upcycling: every chosen block's FFN gets ``experts`` adapter experts and a top-``top_k`` router.

    ``adapter_dim`` defaults to hidden / 8 (the paper: 512 on a hidden size of 4096); ``layers``
    (block indices) to every block. ``aux_loss`` and ``z_loss`` are stored in the model's config
    and used when it is trained. ``layout: qwen2_moe`` writes the same idea as a stock Qwen2-MoE
    model instead (the FFN as shared expert, routed SwiGLU experts of width ``adapter_dim``; see
    :func:`slimformer.models.moe.upcycle_qwen2_moe`), for Llama, Mistral and Qwen2 models.

    ``router_init: data`` (the default) sets each router from its inputs on the calibration
    samples (:func:`whitened_router`) so tokens spread evenly over the experts from the first
    step; ``random`` draws it from N(0, initializer_range²) and needs no samples. The paper does
    not say how its routers start (its code keeps a Linear's default init); a random router on
    an LLM's hidden states, whose few outlier channels dominate every dot product, sends most
    tokens to the same experts: on SmolLM2 15 of 30 blocks start below 0.9·ln 8 of routing
    entropy, and 15 steps with the balancing loss leave 2 there.
    YAML: ``{method: pesc, experts: 8, top_k: 2, adapter_dim: 72}``
    """

    method: ClassVar[str] = "pesc"
    layout: str = "pesc"
    experts: int = 8
    top_k: int = 2
    adapter_dim: int | None = None
    layers: tuple[int, ...] | None = None
    adapter_act: str = "silu"
    aux_loss: float = 0.01
    z_loss: float = 0.0
    seed: int = 0
    router_init: str = "data"
    propagate: str = "dense"  # the upcycled model computes what the dense one did: nothing to propagate

    def __post_init__(self):
        from transformers.activations import ACT2FN

        self.check_propagate()
        if self.router_init not in ROUTER_INITS:
            raise SlimformerError(f"router_init must be one of {', '.join(ROUTER_INITS)}, not '{self.router_init}'")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.layout not in LAYOUTS:
            raise SlimformerError(f"unknown layout '{self.layout}'; choose one of {', '.join(LAYOUTS)}")
        if self.layout == "qwen2_moe" and self.z_loss:
            raise SlimformerError("the Qwen2-MoE layout has no router z-loss")
        if self.experts < 1 or not 1 <= self.top_k <= self.experts:
            raise SlimformerError(f"top_k must be between 1 and the number of experts ({self.experts}), not {self.top_k}")
        if self.adapter_dim is not None and self.adapter_dim < 1:
            raise SlimformerError(f"adapter width must be at least 1, not {self.adapter_dim}")
        if self.aux_loss < 0 or self.z_loss < 0:
            raise SlimformerError("aux_loss and z_loss cannot be negative")
        if self.adapter_act not in ACT2FN:
            raise SlimformerError(f"unknown adapter activation '{self.adapter_act}'")

    @property
    def needs_samples(self) -> bool:
        """Only the data-aware router start reads calibration samples."""
        return self.router_init == "data"


def whitened_router(mean: torch.Tensor, std: torch.Tensor, experts: int, init_std: float,
                    generator: torch.Generator) -> torch.Tensor:
    """A router weight ``(experts, hidden)`` for inputs of per-channel ``mean`` and ``std`` that spreads tokens evenly.

    Each row is a Gaussian direction in the channels' standardised coordinates (``g / std``), so
    no outlier channel dominates the logits, made orthogonal to the mean input so that no expert
    gets a constant head start: every expert's logit then has mean zero and the same spread
    over tokens. Rows are scaled so the logits' spread equals that of an N(0, ``init_std``²)
    router on the same inputs. Channels that never vary get no weight.
    """
    mean, std = mean.double(), std.double()
    live = std > 1e-3 * std.max().clamp_min(1e-30)
    w = torch.randn((experts, mean.numel()), generator=generator, dtype=torch.float64)
    w = torch.where(live, w / std.clamp_min(1e-30), torch.zeros(()))
    m = torch.where(live, mean, torch.zeros(()))
    if m.norm() > 0:
        w -= torch.outer(w @ m, m) / (m @ m)
    target = init_std * (std.pow(2) + mean.pow(2)).sum().sqrt()  # an N(0, init_std²) row's logit spread
    spread = (w.pow(2) * std.pow(2)).sum(1, keepdim=True).sqrt().clamp_min(1e-30)
    return w * (target / spread)


class _RouterStart:
    """Block visitor that gathers the mean and spread of each MoE block's inputs and sets its router from them."""

    def __init__(self, adapter: Adapter, init_std: float, seed: int):
        self.blocks = moe_modules(adapter.model)
        self.init_std = init_std
        self.generator = torch.Generator().manual_seed(seed)
        self.moments: dict[str, list] = {}

    def targets(self, index: int, block: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The MoE blocks inside transformer block ``index``."""
        return moe_modules_within(self.blocks, block)

    def observe(self, name: str, module: torch.nn.Module, inputs: torch.Tensor, batch: int) -> None:
        """Add the inputs' count, sum and sum of squares per channel (float64: sums over many tokens)."""
        x = inputs.reshape(-1, inputs.shape[-1]).double().cpu()
        m = self.moments.setdefault(name, [0, 0.0, 0.0])
        m[0], m[1], m[2] = m[0] + x.shape[0], m[1] + x.sum(0), m[2] + x.pow(2).sum(0)

    def compress(self, name: str, module: torch.nn.Module) -> None:
        """Set the block's router from the moments of its inputs."""
        n, s1, s2 = self.moments.pop(name)
        mean = s1 / n
        std = (s2 / n - mean.pow(2)).clamp_min(0).sqrt()
        weight = router_weight(module)
        with torch.no_grad():
            weight.copy_(whitened_router(mean, std, weight.shape[0], self.init_std, self.generator).to(weight))


@register(UpcycleConfig)
def apply_upcycle(adapter: Adapter, config: UpcycleConfig, samples: torch.Tensor | None) -> MethodResult:
    """Replace the adapter's model by its PESC upcycling (same function until trained), its routers set from ``samples``."""
    if config.router_init == "data" and samples is None:
        raise SlimformerError("router_init 'data' sets the routers from calibration samples: pass samples "
                              "(a recipe does) or use router_init 'random'")
    dense = sum(p.numel() for p in adapter.model.parameters())
    layers = list(config.layers) if config.layers is not None else None
    if config.layout == "qwen2_moe":
        model = upcycle_qwen2_moe(adapter.model, experts=config.experts, top_k=config.top_k,
                                  expert_dim=config.adapter_dim, layers=layers, aux_loss=config.aux_loss, seed=config.seed)
        width = model.config.moe_intermediate_size
    else:
        model = upcycle(adapter.model, experts=config.experts, top_k=config.top_k, adapter_dim=config.adapter_dim,
                        layers=layers, adapter_act=config.adapter_act, aux_loss=config.aux_loss, z_loss=config.z_loss,
                        seed=config.seed)
        width = model.config.adapter_dim
    adapter.model, adapter.family = model, config_family(model.config)  # a Qwen2-MoE model is of that family
    if config.router_init == "data":
        start = _RouterStart(adapter, getattr(model.config, "initializer_range", 0.02), config.seed)
        with torch.no_grad():
            BlockRunner(adapter, samples, batch_size=config.batch_size, device=config.device).run(
                start, propagate=config.propagate, desc="router start")
    counts = parameter_counts(model)
    return MethodResult(config.method, config_dict(config), summary={
        "layout": config.layout, "dense_params": dense, "params": counts["total"],
        "activated_params": counts["activated"], "upcycled_blocks": len(moe_modules(model)),
        "experts": config.experts, "top_k": config.top_k, "adapter_dim": width, "router_init": config.router_init})


@dataclass(frozen=True)
class InstructConfig(TrainingFields):
    """Instruction tuning with the loss on responses only; LoRA on the projections, a PESC model's experts and routers in full.

    ``data`` is an instruction source (``alpaca[:PATH]``, ``self-instruct[:PATH]``), formatted
    with the tokenizer's chat template and packed into windows of ``seqlen``. ``aux_loss``
    overrides the PESC model's own balancing-loss weight (0 turns it off); ``z_loss`` likewise.
    ``lora_rank: 0`` trains every weight instead of LoRA.
    YAML: ``{method: instruct, data: alpaca, tokens: 200000, lora_rank: 16}``
    """

    method: ClassVar[str] = "instruct"
    data: str = "alpaca"
    lr: float = 2e-4
    warmup: float = 0.03
    schedule: str = "constant"
    lora_rank: int = 16
    heldout: int = 8
    aux_loss: float | None = None
    z_loss: float | None = None

    def __post_init__(self):
        self.check_training()
        if (self.aux_loss is not None and self.aux_loss < 0) or (self.z_loss is not None and self.z_loss < 0):
            raise SlimformerError("aux_loss and z_loss cannot be negative")

    @property
    def instruction_source(self) -> str:
        """The instruction data a recipe tokenises with the model's chat template and hands to this step."""
        return self.data


def _in_full(name: str) -> bool:
    """Whether a parameter is a routed expert, a router or a shared-expert gate (trained in full beside LoRA)."""
    return any(part in name for part in (".experts.", ".router.", ".mlp.gate.", "shared_expert_gate"))


def routing_entropy(shares: dict[str, list[float]]) -> dict[str, float]:
    """Per block, the entropy (nats) of the share of routing slots each expert got; ln(n) is perfectly balanced."""
    out = {}
    for name, share in shares.items():
        p = torch.tensor(share, dtype=torch.float64)
        out[name] = float(-(p[p > 0] * p[p > 0].log()).sum())
    return out


@torch.no_grad()
def heldout_routing(adapter: Adapter, windows: torch.Tensor, batch_size: int = 4) -> dict[str, list[float]]:
    """Per MoE block, the share of the routing slots each expert got over ``windows`` ``(n, T)``."""
    counts: dict[str, torch.Tensor] = {}
    tap = RouterTap(adapter.model)
    try:
        for batch in windows.split(batch_size):
            adapter.base(input_ids=batch, use_cache=False)
            for name, share in tap.shares().items():
                counts[name] = counts.get(name, 0) + torch.tensor(share, dtype=torch.float64) * batch.numel()
    finally:
        tap.remove()
    return {name: (c / c.sum()).tolist() for name, c in counts.items()}


@register(InstructConfig)
def instruct(adapter: Adapter, config: InstructConfig, samples: torch.Tensor | None, progress: bool = True) -> MethodResult:
    """Tune on packed instruction windows ``samples`` ``(2, L)`` (token ids and labels), keeping the best held-out step."""
    if samples is None or samples.dim() != 2 or samples.shape[0] != 2:
        raise SlimformerError("instruct needs instruction data tokenised as (ids, labels); run it in a recipe or "
                              "pass slimformer.data.tokenize_instructions(...)")
    if adapter.family.kind != "decoder":
        raise SlimformerError(f"instruct trains a causal LM; {adapter.family.name} is an encoder")
    train, heldout = split_windows(samples, config, f"'{config.data}'")
    steps = config.planned_steps()
    order = torch.arange(steps * config.batch_size) % train.shape[0]
    batches = [train[p] for p in order.split(config.batch_size)]
    model_config = adapter.model.config
    moe = bool(moe_modules(adapter.model))
    aux_weight = (getattr(model_config, "router_aux_loss_coef", 0.0) if config.aux_loss is None else config.aux_loss) \
        if moe else 0.0
    z_weight = (getattr(model_config, "router_z_loss_coef", 0.0) if config.z_loss is None else config.z_loss) if moe else 0.0
    shared = [n for block_name, block in moe_modules(adapter.model).items() for n, m in block.named_modules(prefix=block_name)
              if isinstance(m, torch.nn.Linear) and ".shared_expert." in n + "."]  # a stock MoE's shared FFN: LoRA too
    trainer, finish = training_session(adapter, config, heldout, progress, train_in_full=_in_full if moe else None,
                                       lora_extra=shared)
    tap = RouterTap(adapter.model)
    head_params = list(adapter.head.parameters())
    aux_history: list[float] = []

    def step_loss(i: int, batch: torch.Tensor) -> torch.Tensor:
        ids, labels = batch[:, 0], batch[:, 1]
        hidden = adapter.base(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        targets = labels[:, 1:].reshape(-1)
        scored = int((targets >= 0).sum())
        h = hidden.reshape(-1, hidden.shape[-1])
        loss = chunked_head_loss(h, adapter.logits, next_token_ce(targets), head_params) / max(scored, 1)
        aux, z = tap.losses()
        if aux is not None:
            aux_history.append(float(aux.detach()))
            loss = loss + aux_weight * aux + z_weight * z
        return loss

    summary: dict[str, Any] = {"train_windows": int(train.shape[0]), "heldout_windows": int(heldout.shape[0]),
                               "moe": moe, "aux_loss": aux_weight, "z_loss": z_weight,
                               "trainable_params": sum(p.numel() for p in adapter.model.parameters() if p.requires_grad)}
    try:
        summary.update(trainer.run(batches, step_loss, desc=config.method))
    finally:
        tap.remove()
        summary.update(finish())
    summary["heldout_after"] = summary.get("heldout_requantized", summary.get("heldout_merged", summary["heldout_best"]))
    if aux_history:
        summary["balancing_loss_first"], summary["balancing_loss_last"] = aux_history[0], aux_history[-1]
        shares = heldout_routing(adapter, heldout[:, 0], config.batch_size)
        summary["routing_shares"] = shares
        summary["routing_entropy"] = routing_entropy(shares)
    return MethodResult(config.method, config_dict(config), summary=summary)
