"""Architecture adapters: one small, mostly-data description per model family.

An adapter names what every method needs to find in a model — the stack of blocks, the
attention and MLP projections inside a block, the norms, the embeddings, the head — and the
config fields that surgery must keep consistent. It is chosen by ``config.model_type``,
never by a model's name.

How to add a family: write one ``Family(...)`` entry below with the attribute paths of its
modeling file (paths of blocks, final norm and embeddings are relative to
``model.base_model``; projection and norm paths are relative to one block), then add a tiny
config for it to ``tests/conftest.py`` so the contract tests cover it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from slimformer.errors import SlimformerError

_LLAMA_ATTN = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
_GATED_MLP = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_BERT_ATTN = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
}


@dataclass(frozen=True)
class Family:
    """Where a family keeps its parts, and which config fields describe its shape."""

    name: str
    model_types: tuple[str, ...]
    kind: str  # "decoder" or "encoder"
    blocks: str
    attention: dict[str, str]
    mlp: dict[str, str]
    norms: tuple[str, ...]
    embeddings: tuple[str, ...]
    final_norm: str | None = "norm"
    layers_field: str = "num_hidden_layers"
    heads_field: str = "num_attention_heads"
    kv_heads_field: str | None = "num_key_value_heads"
    intermediate_field: str | None = "intermediate_size"
    per_layer_fields: tuple[str, ...] = field(default=("layer_types",))
    # Whether the attention reads its head width from ``config.head_dim`` (else hidden / heads).
    config_head_dim: bool = True
    # Where windows get the BOS the tokenizer adds (see ``BOS_MODES``): "once" for the families the
    # papers measured (Llama, OPT), so published figures compare; "every" for the others.
    bos: str = "every"
    # Where AWQ may fold a per-channel input scale: (what precedes, the projections it feeds). What
    # precedes is a norm path or a projection role; the scale divides its output and multiplies the
    # projections' input columns, so the float model computes the same function. A pair whose shapes
    # do not match (v → o under grouped-query attention) is skipped at run time.
    scale_pairs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Norms that multiply by (offset + weight): Gemma's RMSNorm uses 1 + weight.
    norm_offset: float = 0.0


def _llama_like(name: str, model_type: str | None = None, norms: tuple[str, ...] | None = None,
                bos: str = "every", norm_offset: float = 0.0) -> Family:
    norms = norms or ("input_layernorm", "post_attention_layernorm")
    before_mlp = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in norms else "post_attention_layernorm"
    return Family(
        name=name,
        model_types=(model_type or name,),
        kind="decoder",
        blocks="layers",
        attention=_LLAMA_ATTN,
        mlp=_GATED_MLP,
        norms=norms,
        embeddings=("embed_tokens",),
        bos=bos,
        scale_pairs=(("input_layernorm", ("q", "k", "v")), ("v", ("o",)), (before_mlp, ("gate", "up")),
                     ("up", ("down",))),
        norm_offset=norm_offset,
    )


def _moe(name: str) -> Family:
    """A stock mixture-of-experts family: Llama-like attention and norms; its experts are stacked tensors, not Linears.

    Weight pruning and quantization reach its attention projections; the experts are changed by
    expert pruning and merging (``methods/experts.py``).
    """
    return Family(name=name, model_types=(name,), kind="decoder", blocks="layers", attention=_LLAMA_ATTN, mlp={},
                  norms=("input_layernorm", "post_attention_layernorm"), embeddings=("embed_tokens",),
                  scale_pairs=(("input_layernorm", ("q", "k", "v")), ("v", ("o",))))


_GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

FAMILIES: tuple[Family, ...] = (
    _llama_like("llama", bos="once"),
    _llama_like("mistral"),
    _llama_like("qwen2"),
    _llama_like("qwen3"),
    _llama_like("gemma", norm_offset=1.0),
    _llama_like("gemma2", norms=_GEMMA2_NORMS, norm_offset=1.0),
    _llama_like("gemma3", "gemma3_text", norms=_GEMMA2_NORMS, norm_offset=1.0),  # the text model; multimodal "gemma3" nests it
    *(_moe(name) for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")),
    Family(
        name="gpt2",
        model_types=("gpt2",),
        kind="decoder",
        blocks="h",
        # GPT-2 fuses q, k and v into one Conv1D whose weight is stored (in, out).
        attention={"qkv": "attn.c_attn", "o": "attn.c_proj"},
        mlp={"up": "mlp.c_fc", "down": "mlp.c_proj"},
        norms=("ln_1", "ln_2"),
        embeddings=("wte", "wpe"),
        final_norm="ln_f",
        layers_field="n_layer",
        heads_field="n_head",
        kv_heads_field=None,
        intermediate_field="n_inner",
        config_head_dim=False,
        scale_pairs=(("ln_1", ("qkv",)), ("ln_2", ("up",))),  # GELU sits between c_fc and c_proj
    ),
    Family(
        name="opt",
        model_types=("opt",),
        kind="decoder",
        blocks="decoder.layers",
        attention={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj"},
        mlp={"up": "fc1", "down": "fc2"},
        norms=("self_attn_layer_norm", "final_layer_norm"),
        embeddings=("decoder.embed_tokens", "decoder.embed_positions"),
        final_norm="decoder.final_layer_norm",
        kv_heads_field=None,
        intermediate_field="ffn_dim",
        config_head_dim=False,
        bos="once",
        # ReLU commutes with a positive scale, so fc1 → fc2 folds too (pre-LN OPT; see awq.py for post-LN)
        scale_pairs=(("self_attn_layer_norm", ("q", "k", "v")), ("v", ("o",)), ("final_layer_norm", ("up",)),
                     ("up", ("down",))),
    ),
    *(
        Family(
            name=name,
            model_types=(name,),
            kind="encoder",
            blocks="encoder.layer",
            attention=_BERT_ATTN,
            mlp={"up": "intermediate.dense", "down": "output.dense"},
            norms=("attention.output.LayerNorm", "output.LayerNorm"),
            embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
            final_norm=None,
            kv_heads_field=None,
            config_head_dim=False,
            # post-LN: a LayerNorm's output is also the residual, so only v → o folds (GELU guards up → down)
            scale_pairs=(("v", ("o",)),),
        )
        for name in ("bert", "roberta")
    ),
)

# How a text cut into windows meets the BOS its tokenizer adds: "every" window starts with it (as
# every prompt does in use), or it stands "once" in front of the whole text (GPTQ, SparseGPT, Wanda
# and SLEB slice one tokenised text). "auto" takes the family's own choice.
BOS_MODES = ("auto", "every", "once")

_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_BY_MODEL_TYPE))


def family_for(model_type: str) -> Family:
    """The family of a ``config.model_type``, or a clear error listing the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise SlimformerError(
            f"unsupported model family '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        ) from None


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear or GPT-2 Conv1D as an (out_features, in_features) view that edits in place."""
    if isinstance(module, nn.Linear):
        return module.weight.data
    if isinstance(module, Conv1D):
        return module.weight.data.t()
    if hasattr(module, "codes"):
        raise SlimformerError(f"{type(module).__name__} holds quantized codes: methods that change float weights "
                              "(pruning, surgery, fine-tuning) run before quantization")
    raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear, GPT-2 Conv1D or quantized Linear (which has int codes, no float weight)."""
    codes = getattr(module, "codes", None)
    if codes is not None:
        return tuple(codes.shape)
    return tuple(weight_matrix(module).shape)


class Adapter:
    """A model bound to its family: the parts every method and the block runner use.

    >>> adapter = get_adapter(model)
    >>> adapter.blocks[0], adapter.linears(adapter.blocks[0])["q"], adapter.num_layers
    """

    def __init__(self, model: PreTrainedModel, family: Family):
        self.model = model
        self.family = family

    @property
    def config(self):
        """The model's (text) config, where surgery updates the shape fields."""
        return self.model.config

    @property
    def base(self) -> nn.Module:
        """The model without its task head."""
        return self.model.base_model

    @property
    def blocks(self) -> nn.ModuleList:
        """The stack of transformer blocks, in order."""
        return self.base.get_submodule(self.family.blocks)

    @property
    def block_prefix(self) -> str:
        """The fully-qualified name of the block list inside the model, e.g. ``model.layers``."""
        blocks = self.blocks
        return next(name for name, module in self.model.named_modules() if module is blocks)

    @property
    def num_layers(self) -> int:
        """The block count the config declares."""
        return getattr(self.config, self.family.layers_field)

    def block_origin(self) -> list[int]:
        """The index each block had in the original model (blocks removed since are skipped)."""
        origin = getattr(self.config, "slimformer_block_origin", None)
        n = len(self.blocks)
        return list(origin) if isinstance(origin, (list, tuple)) and len(origin) == n else list(range(n))

    @property
    def embeddings(self) -> list[nn.Module]:
        """The input embeddings (tokens, and positions or token types where the family has them)."""
        return [self.base.get_submodule(path) for path in self.family.embeddings]

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm after the last block (``None`` for post-norm encoders)."""
        return self.base.get_submodule(self.family.final_norm) if self.family.final_norm else None

    @property
    def head(self) -> nn.Module | None:
        """The output projection to the vocabulary (``None`` for a bare encoder)."""
        return self.model.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head applied to final hidden states (after the final norm), soft-capped where the config says so."""
        logits = self.head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3 squash the logits before the softmax
            logits = torch.tanh(logits / cap) * cap
        return logits

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The projections of one block by role: q/k/v/o (or qkv/o), then gate/up/down."""
        paths = {**self.family.attention, **self.family.mlp}
        return {role: block.get_submodule(path) for role, path in paths.items()}

    def norms(self, block: nn.Module) -> list[nn.Module]:
        """The norms of one block, in forward order."""
        return [block.get_submodule(path) for path in self.family.norms]

    def shape(self) -> dict[str, int | None]:
        """The config's shape fields: layers, heads, KV heads, intermediate size."""
        f = self.family
        fields = {
            "layers": f.layers_field,
            "heads": f.heads_field,
            "kv_heads": f.kv_heads_field,
            "intermediate": f.intermediate_field,
        }
        return {key: getattr(self.config, name, None) if name else None for key, name in fields.items()}


@torch.no_grad()
def next_token_nll(adapter: Adapter, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Summed NLL of ``ids[:, 1:]`` given final hidden states ``hidden`` (``(B, T, H)``, after the final norm).

    Negative ids (labels of tokens not scored, such as an instruction's prompt) are left out of the sum.

    The one next-token loss loop of perplexity, block removal and search: the head runs on
    ``chunk`` rows at a time, so the ``(T, vocabulary)`` float32 logits of a whole window (2 GiB
    for a 262,144-token vocabulary at 2048 tokens) never exist at once. Returns ``(B,)`` float64.
    """
    device = next(iter([*adapter.head.parameters(), *adapter.head.buffers()])).device  # a quantized head has buffers only
    sums = torch.zeros(hidden.shape[0], dtype=torch.float64, device=device)
    for b in range(hidden.shape[0]):
        h, target = hidden[b, :-1].to(device), ids[b, 1:].to(device)
        for a in range(0, h.shape[0], chunk):
            logits = adapter.logits(h[a : a + chunk]).float()
            t = target[a : a + chunk]
            picked = logits.gather(1, t.clamp_min(0)[:, None])[:, 0]
            sums[b] += ((torch.logsumexp(logits, -1) - picked) * (t >= 0)).double().sum()
    return sums.cpu()  # one device sync, not one per chunk


def config_family(config) -> Family:
    """The family of a config: its ``model_type``'s, or for a model upcycled from a dense one (PESC) the dense model's."""
    return family_for(getattr(config, "dense_model_type", None) or config.model_type)


def get_adapter(model: PreTrainedModel) -> Adapter:
    """The adapter for a loaded Hugging Face model, chosen by ``config.model_type``."""
    return Adapter(model, config_family(model.config))
