"""Model surgery that leaves a stock ``transformers`` model: remove whole blocks and keep the config consistent."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from slimformer.errors import SlimformerError
from slimformer.models.adapters import Adapter


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
    parent_path, _, attr = adapter.family.blocks.rpartition(".")
    parent = adapter.base.get_submodule(parent_path) if parent_path else adapter.base
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in keep]))
    config = adapter.config
    setattr(config, adapter.family.layers_field, len(keep))
    for field in adapter.family.per_layer_fields:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, field, [values[i] for i in keep])
    for new_index, block in enumerate(adapter.blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return keep
