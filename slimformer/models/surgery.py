"""Model surgery that keeps the config consistent: remove whole blocks, cut attention heads and FFN units."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimformer.errors import SlimformerError
from slimformer.models.adapters import Adapter, weight_matrix, weight_shape


def remove_blocks(adapter: Adapter, remove: Iterable[int]) -> list[int]:
    """Delete blocks by index; return the original indices of the blocks kept.

    Updates the layer count and every per-layer config list (such as ``layer_types``, which
    says which layers use sliding-window attention), and renumbers ``layer_idx`` so the KV
    cache of ``generate`` addresses the remaining layers.
    """
    blocks = adapter.blocks
    n = len(blocks)
    drop = sorted(set(remove))
    if any(not 0 <= i < n for i in drop):
        raise SlimformerError(f"block indices must be in [0, {n}); got {drop}")
    if len(drop) >= n:
        raise SlimformerError(f"cannot remove all {n} blocks")
    keep = [i for i in range(n) if i not in drop]
    origin = adapter.block_origin()
    parent_path, _, attr = adapter.family.blocks.rpartition(".")
    parent = adapter.base.get_submodule(parent_path) if parent_path else adapter.base
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    config = adapter.config
    setattr(config, adapter.family.layers_field, len(keep))
    for field in adapter.family.per_layer_fields:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, field, [values[i] for i in keep])
    # A periodic pattern (Gemma 3's "every 6th layer is global") no longer describes the kept
    # layers; the per-layer list above does, so the pattern goes rather than contradicting it.
    for name in ("_sliding_window_pattern", "sliding_window_pattern"):
        if name in config.__dict__ and isinstance(getattr(config, "layer_types", None), list):
            delattr(config, name)
    # Which block of the original model each kept block is, across repeated removals and saves:
    # distillation maps a student block to the teacher block it came from.
    config.slimformer_block_origin = [origin[i] for i in keep]
    for new_index, block in enumerate(adapter.blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return keep


# Attributes that attention modules of the supported families read in ``forward``.
_HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads")


def _pick(module: nn.Module, dim: int, index: torch.Tensor) -> nn.Module:
    """A copy of a Linear/Conv1D keeping the output (``dim=0``) or input (``dim=1``) features ``index``.

    ``dim`` is in the (out, in) convention of :func:`weight_matrix`; GPT-2's Conv1D stores the
    transpose. A bias follows the output features and is kept whole when inputs are cut.
    """
    index = index.to(weight_matrix(module).device)
    w = weight_matrix(module).index_select(dim, index).clone()
    bias = module.bias
    if bias is not None and dim == 0:
        bias = bias.data.index_select(0, index).clone()
    if isinstance(module, Conv1D):
        new = Conv1D(w.shape[0], w.shape[1])
        new.weight = nn.Parameter(w.t().contiguous())
        new.bias = nn.Parameter(bias.data.clone() if bias is not None else torch.zeros(w.shape[0], device=w.device))
    else:
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        new.weight = nn.Parameter(w.contiguous())
        if bias is not None:
            new.bias = nn.Parameter(bias.data.clone())
    return new.train(module.training).requires_grad_(module.weight.requires_grad)


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, module)


def head_dim(adapter: Adapter) -> int:
    """Width of one attention head."""
    config = adapter.config
    return getattr(config, "head_dim", None) or config.hidden_size // getattr(config, adapter.family.heads_field)


def block_shape(adapter: Adapter, block: nn.Module) -> dict[str, int]:
    """The heads, KV heads and FFN units one block has now (blocks may differ after structural pruning)."""
    f, hd, lin = adapter.family, head_dim(adapter), adapter.linears(block)
    if "qkv" in lin:
        heads = weight_shape(lin["qkv"])[0] // (3 * hd)
        kv = heads
    else:
        heads = weight_shape(lin["q"])[0] // hd
        kv = weight_shape(lin["k"])[0] // hd
    ffn = next((r for r in ("up", "gate") if r in lin), None)  # a stock MoE block has experts, no FFN projections
    units = weight_shape(lin[ffn])[0] if ffn else None
    return {"heads": heads, "kv_heads": kv if f.kv_heads_field else heads, "intermediate": units}


def shrink_heads(adapter: Adapter, block: nn.Module, keep: list[int]) -> None:
    """Keep only the query heads ``keep`` of one block (indices into its current heads).

    With grouped-query attention every KV group must keep the same number of query heads
    (so the module's single group size stays valid); a group left with none is removed with
    its key/value head.
    """
    lin, hd, f = adapter.linears(block), head_dim(adapter), adapter.family
    shape = block_shape(adapter, block)
    heads, kv = shape["heads"], shape["kv_heads"]
    keep = sorted(set(keep))
    if not keep or any(not 0 <= h < heads for h in keep):
        raise SlimformerError(f"head indices must be a non-empty subset of [0, {heads}); got {keep}")
    rows = lambda hs: torch.tensor([h * hd + d for h in hs for d in range(hd)])  # noqa: E731
    group = heads // kv
    kept_groups = sorted({h // group for h in keep})
    per_group = {g: [h for h in keep if h // group == g] for g in kept_groups}
    if f.kv_heads_field and len({len(v) for v in per_group.values()}) != 1:
        raise SlimformerError("with grouped-query attention every kept KV group must keep the same number of heads")
    attention_path = (f.attention.get("q") or f.attention["qkv"]).rpartition(".")[0]
    attention = block.get_submodule(attention_path)
    if "qkv" in lin:  # GPT-2: q, k and v side by side in one projection
        width = heads * hd
        index = torch.cat([rows(keep) + part * width for part in range(3)])
        _set(block, f.attention["qkv"], _pick(lin["qkv"], 0, index))
        attention.split_size = len(keep) * hd
    else:
        _set(block, f.attention["q"], _pick(lin["q"], 0, rows(keep)))
        kv_keep = kept_groups if f.kv_heads_field else keep
        for role in ("k", "v"):
            _set(block, f.attention[role], _pick(lin[role], 0, rows(kv_keep)))
    _set(block, f.attention["o"], _pick(lin["o"], 1, rows(keep)))
    new_heads, new_kv = len(keep), (len(kept_groups) if f.kv_heads_field else len(keep))
    for name in _HEAD_COUNT_ATTRS:
        if hasattr(attention, name):
            setattr(attention, name, new_heads)
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = new_kv
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = new_heads // new_kv
    if hasattr(attention, "all_head_size"):
        attention.all_head_size = new_heads * hd


def shrink_neurons(adapter: Adapter, block: nn.Module, keep: list[int]) -> None:
    """Keep only the FFN units ``keep`` of one block (rows of up/gate, columns of down)."""
    lin, f = adapter.linears(block), adapter.family
    units = block_shape(adapter, block)["intermediate"]
    keep = sorted(set(keep))
    if not keep or any(not 0 <= u < units for u in keep):
        raise SlimformerError(f"unit indices must be a non-empty subset of [0, {units}); got {keep}")
    index = torch.tensor(keep)
    for role in ("gate", "up"):
        if role in lin:
            _set(block, f.mlp[role], _pick(lin[role], 0, index))
    _set(block, f.mlp["down"], _pick(lin["down"], 1, index))


def _refused(config) -> bool:
    """Whether the config class's own validation (``hidden % heads`` and the like) refuses the config."""
    try:
        config.validate()
    except (ValueError, StrictDataclassError):
        return True
    return False


def sync_config_shapes(adapter: Adapter) -> list[dict[str, int]]:
    """Write the blocks' shapes into the config; return them.

    Uniform shapes that the family's config can express go into the standard fields, so stock
    ``transformers`` loads the model. Otherwise — shapes that differ between blocks, fewer heads
    in a family that derives the head width from ``hidden / heads`` (BERT, GPT-2, OPT), or a
    head count the config class refuses (Gemma 3 checks ``hidden % heads``) — they are stored
    as ``slimformer_layer_shapes`` and :func:`reshape_blocks` rebuilds the model
    (``slimformer.load_model`` does it) from standard fields every block can be cut from.
    """
    f, config = adapter.family, adapter.config
    hd = head_dim(adapter)
    shapes = [block_shape(adapter, b) for b in adapter.blocks]
    widest = {k: max(s[k] for s in shapes) for k in shapes[0]}
    uniform = all(s == shapes[0] for s in shapes)
    stock = uniform and (f.config_head_dim or widest["heads"] * hd == config.hidden_size)
    if f.config_head_dim:
        config.head_dim = hd
    if f.intermediate_field:
        setattr(config, f.intermediate_field, widest["intermediate"])
    if stock:
        _set_heads(adapter, widest["heads"], widest["kv_heads"])
        stock = not _refused(config)
    if not stock:
        # a shape every block can be cut from: the widest KV count times a group at least as large as
        # every block's (grown until the config class accepts it); for families without
        # config.head_dim, the heads that keep hidden / heads equal to the head width
        kv = widest["kv_heads"] if f.config_head_dim else config.hidden_size // hd
        group = max(s["heads"] // s["kv_heads"] for s in shapes) if f.config_head_dim else 1
        _set_heads(adapter, kv * group, kv)
        while _refused(config) and kv * group < config.hidden_size:
            group += 1
            _set_heads(adapter, kv * group, kv)
        config.slimformer_layer_shapes = shapes
    elif hasattr(config, "slimformer_layer_shapes"):
        del config.slimformer_layer_shapes
    return shapes


def _set_heads(adapter: Adapter, heads: int, kv: int) -> None:
    setattr(adapter.config, adapter.family.heads_field, heads)
    if adapter.family.kv_heads_field:
        setattr(adapter.config, adapter.family.kv_heads_field, kv)


def reshape_blocks(adapter: Adapter, shapes: list[dict[str, int]]) -> None:
    """Give a freshly built model the per-block shapes of a saved one (weights are loaded afterwards)."""
    if len(shapes) != len(adapter.blocks):
        raise SlimformerError(f"{len(shapes)} layer shapes for {len(adapter.blocks)} blocks")
    for block, shape in zip(adapter.blocks, shapes):
        now = block_shape(adapter, block)
        if shape["heads"] != now["heads"] or shape["kv_heads"] != now["kv_heads"]:
            group, per = now["heads"] // now["kv_heads"], shape["heads"] // shape["kv_heads"]
            shrink_heads(adapter, block, [g * group + i for g in range(shape["kv_heads"]) for i in range(per)])
        if shape["intermediate"] != now["intermediate"]:
            shrink_neurons(adapter, block, list(range(shape["intermediate"])))
