"""Recovery fine-tuning: a short causal-LM fine-tune on calibration text that keeps pruned weights at zero."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from slimformer.errors import SlimformerError
from slimformer.methods.base import MethodResult, config_dict, register, select_linears
from slimformer.models.adapters import Adapter


@dataclass(frozen=True)
class FinetuneConfig:
    """Masked fine-tuning after pruning: every weight that is exactly zero in a block projection stays zero.

    All parameters train with AdamW (no weight decay, so a zero gradient leaves a zero weight
    unchanged); gradients of pruned weights are masked and the mask is applied again after
    every step. ``seqlen`` crops the samples to their first ``seqlen`` tokens to shorten steps on
    a CPU (``None``: whole samples).
    YAML: ``{method: finetune, steps: 100, lr: 1e-4}``
    """

    method: ClassVar[str] = "finetune"
    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 1
    seqlen: int | None = 512
    device: str = "cpu"

    def __post_init__(self):
        if self.steps < 1:
            raise SlimformerError(f"fine-tuning needs at least 1 step, not {self.steps}")
        if self.lr <= 0:
            raise SlimformerError(f"learning rate must be positive, not {self.lr}")


def _zero_masks(adapter: Adapter) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(weight, mask of its zeros) of every block projection that has any zero."""
    masks = []
    for module in select_linears(adapter).values():
        zeros = module.weight.detach() == 0
        if zeros.any():
            masks.append((module.weight, zeros))
    return masks


@register(FinetuneConfig)
def finetune(adapter: Adapter, config: FinetuneConfig, samples: torch.Tensor | None) -> MethodResult:
    """Fine-tune the causal LM on ``samples`` for ``config.steps`` steps; pruned weights stay exactly zero."""
    if samples is None or samples.numel() == 0:
        raise SlimformerError("fine-tuning needs calibration samples; the calibration set is empty")
    if adapter.family.kind != "decoder":
        raise SlimformerError("causal-LM fine-tuning needs a decoder model")
    model = adapter.model.to(config.device).train()
    masks = _zero_masks(adapter)
    handles = [p.register_hook(lambda grad, z=zeros: grad.masked_fill(z, 0)) for p, zeros in masks]
    data = samples[:, : config.seqlen] if config.seqlen else samples
    batches = itertools.cycle(data.split(config.batch_size))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    losses = []
    try:
        for _ in (bar := tqdm(range(config.steps), desc="finetune")):
            batch = next(batches).to(config.device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for p, zeros in masks:
                    p.masked_fill_(zeros, 0)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for handle in handles:
            handle.remove()
        model.to("cpu").eval()
    head = max(1, len(losses) // 10)
    return MethodResult(config.method, config_dict(config),
                        summary={"first_loss": sum(losses[:head]) / head, "last_loss": sum(losses[-head:]) / head,
                                 "masked_weights": sum(int(z.sum()) for _, z in masks)})
