"""Width pruning as a recipe step: the least important attention heads and FFN units of a decoder cut out, by one global threshold.

Importance is the mask gradient of the language-model loss on calibration windows (Michel et
al. 2019 for heads, Kwon et al. 2022 for FFN units; :mod:`slimformer.search.importance`), each
block's scores normalised to unit l2 norm so one threshold compares blocks, which is the
importance-pruning baseline of the structural search (:func:`slimformer.search.structural.importance_prune`)
made a step that chains with the others. Where the search explores many sub-networks, this keeps
the one the threshold gives for a parameter budget; no training happens here (a ``distill`` or
``finetune`` step after it wins quality back). The model is cut physically
(:func:`slimformer.search.space.extract`): blocks of different widths carry
``slimformer_layer_shapes`` in their config and load through :func:`slimformer.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from slimformer.errors import SlimformerError
from slimformer.methods.base import MethodResult, config_dict, register
from slimformer.models.adapters import Adapter
from slimformer.models.surgery import block_shape
from slimformer.search.importance import lm_loss, mask_gradient_importance
from slimformer.search.space import SearchSpace, count_params, extract
from slimformer.search.structural import importance_prune


@dataclass(frozen=True)
class WidthConfig:
    """Cut a decoder's heads and FFN units to ``keep`` of its parameters (embeddings and head count, and stay).

    ``heads: false`` cuts FFN units only. ``align`` rounds every block's unit count to a multiple
    of it, so int4 group sizes and the CPU kernels still divide every width. Importance is
    measured on the first ``importance_batches`` calibration windows, one at a time.
    YAML: ``{method: width, keep: 0.8, heads: false, align: 128}``
    """

    method: ClassVar[str] = "width"
    keep: float = 0.8
    heads: bool = True
    align: int = 1
    importance_batches: int = 8

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise SlimformerError(f"keep is the fraction of the parameters kept and must be in (0, 1], not {self.keep}")
        if self.align < 1 or self.importance_batches < 1:
            raise SlimformerError("align and importance_batches must be at least 1")


@register(WidthConfig)
def apply_width(adapter: Adapter, config: WidthConfig, samples: torch.Tensor | None) -> MethodResult:
    """Rank heads and units on ``samples`` and cut the model in place to the sub-network of ``config.keep``."""
    if adapter.family.kind != "decoder":
        raise SlimformerError(f"width ranks units by the language-model loss; {adapter.family.name} is an encoder "
                              "(use `slimformer search` with a task)")
    if samples is None:
        raise SlimformerError("width ranks heads and units on calibration samples; run it in a recipe or pass samples")
    before = [block_shape(adapter, b) for b in adapter.blocks]
    params_before = count_params(adapter)
    windows = list(samples[: config.importance_batches].split(1))
    importance = mask_gradient_importance(adapter, windows, lm_loss, progress=False)
    space = SearchSpace("large", adapter, importance)  # needs only the blocks' shapes and the scores
    subnet = importance_prune(space, config.keep, heads=config.heads, align=config.align)
    extract(adapter.model, subnet, inplace=True)
    after = [block_shape(adapter, b) for b in adapter.blocks]
    params_after = count_params(adapter)
    layers = {f"{adapter.block_prefix}.{i}": {"heads": [b["heads"], a["heads"]],
                                              "intermediate": [b["intermediate"], a["intermediate"]]}
              for i, (b, a) in enumerate(zip(before, after))}
    return MethodResult(config.method, config_dict(config), layers=layers, summary={
        "params_before": params_before, "params_after": params_after, "kept": params_after / params_before,
        "heads_kept": sum(a["heads"] for a in after) / sum(b["heads"] for b in before),
        "units_kept": sum(a["intermediate"] for a in after) / sum(b["intermediate"] for b in before)})
