"""Fewer experts in a mixture-of-experts model: expert pruning and expert merging, calibrated block by block.

Both work on PESC models and on stock MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) and
keep the same number of experts in every MoE block, so the result is the same class with a
smaller expert count, which stock transformers loads.

- ``expert-prune`` with ``criterion: frequency`` drops the experts that the calibration tokens
  are routed to least (counting every top-k slot); with ``criterion: output`` it removes, one at
  a time, the expert whose removal changes the block's output on the calibration tokens least
  (the squared error of the whole block, re-measured after every removal, as SLEB does for
  blocks). The routers keep the rows of the experts left and softmax over them, so routing
  renormalises.
- ``expert-merge`` follows M-SMoE (Li et al., 2024, "Merge, Then Compress"): the ``keep``
  experts used most are the group centres; every other expert joins the centre whose outputs
  on the calibration tokens are most similar to its own (cosine of the concatenated outputs);
  each group's weights are averaged with the experts' routing frequencies as weights, and
  the router keeps the centre's row. (M-SMoE aligns permutations of FFN neurons before
  averaging; PESC experts are adapters over one shared FFN and stock experts are averaged
  as they are: the permutation step is left out.)

The inputs of each MoE block come from the one block runner; at most ``max_tokens`` of them
(evenly spaced) are kept per block.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimformer.calibration import BlockRunner
from slimformer.errors import SlimformerError
from slimformer.methods.base import CalibratedFields, MethodResult, config_dict, register
from slimformer.models.adapters import Adapter
from slimformer.models.moe import (expert_outputs, keep_experts, merge_experts, moe_modules, moe_modules_within,
                                   router_weight, routing, set_expert_count, top_k_of)

CRITERIA = ("frequency", "output")


@dataclass(frozen=True)
class ExpertFields(CalibratedFields):
    """How many experts every MoE block keeps (``keep``, or a ``ratio`` removed) and the calibration tokens scored per block."""

    keep: int | None = None
    ratio: float | None = None
    max_tokens: int = 8192

    def check_count(self) -> None:
        """Refuse a missing, double or impossible expert count."""
        self.check_propagate()
        if (self.keep is None) == (self.ratio is None):
            raise SlimformerError("give the experts to keep per block (keep) or the fraction to remove (ratio), not both")
        if self.keep is not None and self.keep < 1:
            raise SlimformerError(f"keep must be at least 1, not {self.keep}")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise SlimformerError(f"ratio must be in (0, 1), not {self.ratio}")
        if self.max_tokens < 1:
            raise SlimformerError(f"max_tokens must be at least 1, not {self.max_tokens}")

    def kept(self, n: int) -> int:
        """Experts kept out of ``n``."""
        keep = self.keep if self.keep is not None else n - int(round(self.ratio * n))
        if not 1 <= keep < n:
            raise SlimformerError(f"keeping {keep} of {n} experts per block changes nothing or removes them all")
        return keep


@dataclass(frozen=True)
class ExpertPruneConfig(ExpertFields):
    """Expert pruning: keep ``keep`` experts per MoE block, chosen by routing ``frequency`` or by least ``output`` change.

    YAML: ``{method: expert-prune, keep: 4, criterion: output}``
    """

    method: ClassVar[str] = "expert-prune"
    criterion: str = "frequency"

    def __post_init__(self):
        self.check_count()
        if self.criterion not in CRITERIA:
            raise SlimformerError(f"unknown criterion '{self.criterion}'; choose one of {', '.join(CRITERIA)}")


@dataclass(frozen=True)
class ExpertMergeConfig(ExpertFields):
    """Expert merging (M-SMoE): group similar experts around the ``keep`` most used and average each group.

    YAML: ``{method: expert-merge, keep: 4}``
    """

    method: ClassVar[str] = "expert-merge"

    def __post_init__(self):
        self.check_count()


def _block_output(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return block(x[None])[0]


def greedy_output_removal(block: nn.Module, x: torch.Tensor, keep: int) -> tuple[list[int], list[float]]:
    """The experts to keep after removing, one at a time, the one whose removal changes the block output on ``x`` least.

    Returns (kept experts in their order, the relative squared error after each removal).
    """
    n = router_weight(block).shape[0]
    reference = _block_output(block, x)
    scale = float(reference.pow(2).sum()) or 1.0
    kept, errors = list(range(n)), []
    while len(kept) > keep:
        best = None
        for e in kept:
            trial = [i for i in kept if i != e]
            if len(trial) < top_k_of(block):
                continue
            candidate = copy.deepcopy(block)
            keep_experts(candidate, trial)
            error = float((_block_output(candidate, x) - reference).pow(2).sum()) / scale
            if best is None or error < best[0]:
                best = (error, e)
        kept.remove(best[1])
        errors.append(best[0])
    return kept, errors


def similarity_groups(outputs: torch.Tensor, frequency: torch.Tensor, keep: int) -> list[list[int]]:
    """Groups around the ``keep`` most frequent experts: each other expert joins the centre its outputs are most like.

    ``outputs`` is ``(n, N, hidden)``; the centre comes first in its group. Ties in frequency go to the lower index.
    """
    n = outputs.shape[0]
    order = sorted(range(n), key=lambda e: (-float(frequency[e]), e))
    centres = order[:keep]
    flat = torch.nn.functional.normalize(outputs.reshape(n, -1).double(), dim=1)
    groups = {c: [c] for c in centres}
    for e in sorted(order[keep:]):
        similarity = flat[centres] @ flat[e]
        groups[centres[int(similarity.argmax())]].append(e)
    return [groups[c] for c in centres]


class _ExpertVisitor:
    """Keeps each MoE block's inputs (up to ``max_tokens``) and prunes or merges its experts once all are seen."""

    def __init__(self, adapter: Adapter, config: ExpertFields):
        self.config = config
        self.blocks = moe_modules(adapter.model)
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.layers: dict[str, dict] = {}
        self.keep: int | None = None

    def targets(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        """The MoE blocks inside transformer block ``index``."""
        return moe_modules_within(self.blocks, block)

    def observe(self, name: str, module: nn.Module, inputs: torch.Tensor, batch: int) -> None:
        """Keep the block's inputs, flattened to tokens."""
        self.inputs.setdefault(name, []).append(inputs.reshape(-1, inputs.shape[-1]).float().cpu())

    def compress(self, name: str, module: nn.Module) -> None:
        """Score the experts of one MoE block on its inputs and keep or merge them."""
        x = torch.cat(self.inputs.pop(name))
        if x.shape[0] > self.config.max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, self.config.max_tokens).long()]
        x = x.to(router_weight(module).dtype).to(router_weight(module).device)
        n = router_weight(module).shape[0]
        keep = self.keep = self.config.kept(n)
        _, chosen = routing(module, x)
        frequency = torch.bincount(chosen.reshape(-1).cpu(), minlength=n).double() / chosen.numel()
        info = {"experts_before": n, "frequency": [round(float(f), 6) for f in frequency]}
        if isinstance(self.config, ExpertMergeConfig):
            groups = similarity_groups(expert_outputs(module, x).cpu(), frequency, keep)
            merge_experts(module, groups, frequency)
            info["groups"] = groups
        elif self.config.criterion == "output":
            kept, errors = greedy_output_removal(module, x, keep)
            keep_experts(module, kept)
            info.update(kept=kept, removal_errors=errors)
        else:
            kept = sorted(sorted(range(n), key=lambda e: (-float(frequency[e]), e))[:keep])
            keep_experts(module, kept)
            info["kept"] = kept
        self.layers[name] = info

    def finish(self, index: int, block: nn.Module) -> dict:
        """Block ``index``'s record: what each of its MoE blocks kept or merged, and the count kept."""
        return {"layers": {n: self.layers[n] for n in self.targets(index, block)}, "keep": self.keep}

    def restore(self, index: int, record: dict) -> None:
        """Take a block finished by an interrupted streamed run: its record, and its smaller expert count.

        The block itself is on disk, written; its modules here (on the meta device) only take the
        new shapes, so the model's parameter count and config agree with what was written.
        """
        self.layers.update(record["layers"])
        self.keep = record["keep"]
        for name in record["layers"]:
            keep_experts(self.blocks[name], range(self.keep))


@register(ExpertPruneConfig)
@register(ExpertMergeConfig)
def apply_experts(adapter: Adapter, config: ExpertFields, samples: torch.Tensor) -> MethodResult:
    """Prune or merge the experts of every MoE block of the model on calibration ``samples``."""
    blocks = moe_modules(adapter.model)
    if not blocks:
        raise SlimformerError(f"{config.method} needs a mixture-of-experts model; {adapter.model.config.model_type} "
                              "has no MoE blocks")
    counts = {router_weight(m).shape[0] for m in blocks.values()}
    if len(counts) != 1:
        raise SlimformerError(f"MoE blocks with different expert counts ({sorted(counts)}) are not supported")
    params_before = sum(p.numel() for p in adapter.model.parameters())
    visitor = _ExpertVisitor(adapter, config)
    with torch.no_grad():
        BlockRunner(adapter, samples, batch_size=config.batch_size, device=config.device).run(
            visitor, propagate=config.propagate, desc=config.method)
    set_expert_count(adapter.model.config, visitor.keep)
    params_after = sum(p.numel() for p in adapter.model.parameters())
    return MethodResult(config.method, config_dict(config), layers=visitor.layers, summary={
        "experts_before": counts.pop(), "experts_after": visitor.keep, "moe_blocks": len(blocks),
        "params_before": params_before, "params_after": params_after})
