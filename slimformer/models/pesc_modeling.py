"""The PESC model: a dense decoder whose FFNs became mixtures of adapter experts (Wu et al., 2024, "Parameter-Efficient Sparsity Crafting").

This file depends on torch and transformers only, so it is also the ``modeling_pesc.py`` that
an exported checkpoint carries for ``trust_remote_code=True`` users of stock transformers.

Every upcycled block keeps its FFN ``F`` (the dense model's gate/up/down projections) and adds
``n`` experts that share it and differ only by an adapter each (paper Eq. 7–8)::

    A_i(x) = F(x) + up_i(act(down_i(F(x))))        y = Σ_{i ∈ top-k(router(x))} g_i(x) · A_i(x)

with ``g`` the softmax over the chosen router logits. Since the gates sum to one,
``y = F(x) + Σ g_i · up_i(act(down_i(F(x))))``: ``F`` runs once per token, not once per
expert, and with every ``up_i`` zero the upcycled model computes what the dense one did.

Load balancing is the Switch Transformer loss (Fedus et al., 2021, Eq. 4), per upcycled
block and averaged over them: ``α · n · Σ_i f_i · P_i`` with ``f_i`` the share of the
``tokens × k`` routing slots given to expert ``i`` and ``P_i`` the mean of the *full* softmax
over all ``n`` router logits. (The reference code softmaxes only the top-k logits, which makes
``Σ_i P_i`` over the chosen experts a constant and gives the router no gradient.) An optional
router z-loss (Zoph et al., 2022) ``β · mean(logsumexp(logits)²)`` keeps the logits small.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

MODEL_TYPE = "slimformer_pesc"
_OWN_FIELDS = ("dense_model_type", "num_experts", "num_experts_per_tok", "adapter_dim", "adapter_act",
               "moe_layers", "router_aux_loss_coef", "router_z_loss_coef")


class PescConfig(PretrainedConfig):
    """The dense model's config fields, flat, plus the PESC fields (experts, top-k, adapter width, upcycled blocks)."""

    model_type = MODEL_TYPE

    def __init__(self, dense_model_type: str = "llama", num_experts: int = 8, num_experts_per_tok: int = 2,
                 adapter_dim: int = 64, adapter_act: str = "silu", moe_layers: list[int] | None = None,
                 router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.0, **kwargs):
        self.dense_model_type = dense_model_type
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.adapter_dim = adapter_dim
        self.adapter_act = adapter_act
        self.moe_layers = list(moe_layers) if moe_layers is not None else None
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        super().__init__(**kwargs)

    @classmethod
    def from_dense(cls, dense: PretrainedConfig, **pesc) -> "PescConfig":
        """A PESC config over the dense config ``dense`` with the PESC fields ``pesc``."""
        fields = {k: v for k, v in dense.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
        return cls(dense_model_type=dense.model_type, **pesc, **fields)

    def dense_config(self) -> PretrainedConfig:
        """The config of the dense model the PESC model was made from."""
        fields = {k: v for k, v in self.to_dict().items()
                  if k not in (*_OWN_FIELDS, "model_type", "architectures", "auto_map", "transformers_version")}
        return AutoConfig.for_model(self.dense_model_type, **fields)

    def upcycled_layers(self) -> list[int]:
        """The indices of the blocks whose FFN is a mixture of adapter experts."""
        return list(range(self.num_hidden_layers)) if self.moe_layers is None else list(self.moe_layers)


class PescRouter(nn.Module):
    """A linear router without bias (a plain parameter, so weight pruning and quantization pass it by)."""

    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class PescExperts(nn.Module):
    """The experts' adapters, stacked: ``down (n, d, hidden)`` and ``up (n, hidden, d)``."""

    FEW_SLOTS = 8  # routing slots up to which each slot runs on its own (measured: 85 µs for 2 against 360 grouped)

    def __init__(self, hidden: int, experts: int, width: int, act: str):
        super().__init__()
        self.down = nn.Parameter(torch.empty(experts, width, hidden))
        self.up = nn.Parameter(torch.empty(experts, hidden, width))
        self.act = ACT2FN[act]

    def forward(self, f: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """``Σ_j gates[:, j] · up_e(act(down_e(f)))`` with ``e = experts[:, j]``, tokens grouped by expert.

        ``f`` is ``(tokens, hidden)``, ``experts`` and ``gates`` ``(tokens, k)``. The ``tokens · k``
        routing slots are sorted by expert so each expert runs one matmul on its contiguous group.
        A few slots (one decoded token routes to k experts) run one by one on views of their
        experts' weights: there a sort, a count and a matmul per expert (or a gather that copies
        the weights) cost several times the work itself.
        """
        if experts.numel() <= self.FEW_SLOTS:
            out = torch.zeros_like(f)
            for t, row in enumerate(experts.tolist()):
                for j, e in enumerate(row):
                    out[t] += gates[t, j].to(f.dtype) * (self.up[e] @ self.act(self.down[e] @ f[t]))
            return out
        n = self.down.shape[0]
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // experts.shape[1]
        counts = torch.bincount(flat, minlength=n).tolist()
        grouped = f[token]
        outs = [self.act(x @ self.down[e].t()) @ self.up[e].t()
                for e, x in enumerate(grouped.split(counts)) if counts[e]]
        out = torch.cat(outs) * gates.reshape(-1)[order, None].to(f.dtype)
        return torch.zeros_like(f).index_add_(0, token, out)


class PescMLP(nn.Module):
    """A dense gated FFN (its own projections and activation, unchanged) plus a router and adapter experts."""

    def __init__(self, config: PescConfig, dense_mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = dense_mlp.gate_proj, dense_mlp.up_proj, dense_mlp.down_proj
        self.act_fn = dense_mlp.act_fn
        hidden = self.down_proj.out_features
        self.top_k = config.num_experts_per_tok
        self.router = PescRouter(hidden, config.num_experts)
        self.experts = PescExperts(hidden, config.num_experts, config.adapter_dim, config.adapter_act)
        self.router_logits: torch.Tensor | None = None  # of the last forward, for the balancing loss
        self.selected: torch.Tensor | None = None

    def reset_parameters(self, std: float) -> None:
        """Router and adapter ``down`` ~ N(0, std²); adapter ``up`` zero, so the block computes the dense FFN."""
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.experts.down, std=std)
        nn.init.zeros_(self.experts.up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        f = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        logits = self.router(x)
        top, experts = logits.topk(self.top_k, dim=-1)
        gates = top.float().softmax(-1)
        self.router_logits, self.selected = logits, experts
        return (f + self.experts(f, experts, gates)).reshape(shape)


def balancing_loss(logits: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Switch Transformer loss ``n · Σ_i f_i · P_i`` of one layer (1 for perfectly uniform routing).

    ``f_i``: the share of the routing slots ``selected (tokens, k)`` that went to expert ``i``
    (no gradient); ``P_i``: the mean full-softmax probability of expert ``i`` over the tokens.
    """
    n = logits.shape[-1]
    share = torch.bincount(selected.reshape(-1), minlength=n).to(logits.dtype) / selected.numel()
    mean_prob = logits.float().softmax(-1).mean(0)
    return n * (share * mean_prob).sum()


def router_losses(model: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(balancing loss, z-loss) of the last forward, each averaged over the upcycled blocks; None without any."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "router_logits", None), torch.Tensor)]
    if not layers:
        return None, None
    aux = sum(balancing_loss(m.router_logits, m.selected) for m in layers) / len(layers)
    z = sum(torch.logsumexp(m.router_logits.float(), -1).pow(2).mean() for m in layers) / len(layers)
    return aux, z


class PescForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose chosen blocks route each token through the top-k of ``num_experts`` adapter experts."""

    config_class = PescConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["PescMLP"]

    def __init__(self, config: PescConfig):
        super().__init__(config)
        dense = AutoModelForCausalLM.from_config(config.dense_config())
        self._tied_weights_keys = getattr(dense, "_tied_weights_keys", None)
        self.model = dense.model
        self.lm_head = dense.lm_head
        for i in config.upcycled_layers():
            self.model.layers[i].mlp = PescMLP(config, self.model.layers[i].mlp)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, PescMLP):
            module.reset_parameters(getattr(self.config, "initializer_range", 0.02))

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> MoeCausalLMOutputWithPast:
        """The dense model's forward; with ``labels`` the loss adds the configured balancing and z-losses."""
        cache = kwargs.pop("past_key_values", None) if cache is None else cache  # the name before transformers 5.24
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        loss, aux = None, None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            aux, z = router_losses(self)
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux + self.config.router_z_loss_coef * z
        return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux, logits=logits, cache=out.cache,
                                         hidden_states=out.hidden_states, attentions=out.attentions)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, and those one token activates (the dense ones plus k of the n adapters per upcycled block)."""
        total = sum(p.numel() for p in self.parameters())
        c = self.config
        per_expert = 2 * c.adapter_dim * c.hidden_size
        idle = len(c.upcycled_layers()) * (c.num_experts - c.num_experts_per_tok) * per_expert
        return {"total": total, "activated": total - idle}


def _register() -> None:
    try:
        AutoConfig.register(MODEL_TYPE, PescConfig)
        AutoModelForCausalLM.register(PescConfig, PescForCausalLM)
    except ValueError:  # already registered (the module was imported twice, e.g. as remote code)
        pass

