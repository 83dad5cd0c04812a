"""Importance of attention heads and FFN units measured on data: the gradient of the loss with respect to a unit's mask.

Michel et al., "Are Sixteen Heads Really Better than One?" (NeurIPS 2019): a head's
importance is E_x |∂L(x)/∂ξ_h| for a mask variable ξ_h = 1 multiplying its output; the same
score for an FFN unit is the first-order (Fisher-like) criterion of Kwon et al. (2022).
Scores are accumulated over batches; :func:`normalised` rescales each block's scores to unit
l2 norm as Michel et al. do before comparing heads across layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from slimformer.calibration import scaled_inputs
from slimformer.models.adapters import Adapter
from slimformer.models.surgery import block_shape, head_dim
from slimformer.search.space import Importance


def mask_gradient_importance(
    adapter: Adapter,
    batches: Iterable,
    loss_fn: Callable[[torch.nn.Module, object], torch.Tensor],
    *,
    progress: bool = True,
) -> Importance:
    """Accumulate |∂loss/∂mask| per head and per FFN unit over ``batches``; ``loss_fn(model, batch)`` gives the loss.

    Only the masks get gradients (weights are frozen for the pass and restored after).
    """
    model, hd = adapter.model, head_dim(adapter)
    shapes = [block_shape(adapter, b) for b in adapter.blocks]
    device = next(model.parameters()).device
    head_masks = [torch.ones(s["heads"], device=device, requires_grad=True) for s in shapes]
    unit_masks = [torch.ones(s["intermediate"], device=device, requires_grad=True) for s in shapes]
    scores = Importance([torch.zeros(s["heads"]) for s in shapes], [torch.zeros(s["intermediate"]) for s in shapes])
    scales = []
    for block, hm, um in zip(adapter.blocks, head_masks, unit_masks):
        lin = adapter.linears(block)
        scales += [(lin["o"], lambda hm=hm: hm.repeat_interleave(hd)), (lin["down"], um)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    try:
        for p in trainable:
            p.requires_grad_(False)
        with scaled_inputs(scales):
            for batch in tqdm(batches, desc="importance", disable=not progress):
                loss = loss_fn(model, batch)
                grads = torch.autograd.grad(loss, head_masks + unit_masks)
                for i, g in enumerate(grads[: len(head_masks)]):
                    scores.heads[i] += g.abs().float().cpu()
                for i, g in enumerate(grads[len(head_masks) :]):
                    scores.units[i] += g.abs().float().cpu()
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return scores


def normalised(importance: Importance) -> Importance:
    """Each block's head scores and unit scores scaled to unit l2 norm (Michel et al.), for cross-layer thresholds."""
    unit = lambda t: t / t.norm().clamp_min(1e-12)  # noqa: E731
    return Importance([unit(h) for h in importance.heads], [unit(u) for u in importance.units])


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token loss of a causal LM on a batch of token ids (the decoders' importance and search loss)."""
    ids = ids.to(next(model.parameters()).device)
    return model(input_ids=ids, labels=ids).loss


def classifier_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Cross-entropy of a sequence classifier on a batch carrying ``labels`` (moved to the model's device)."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items()}).loss
