"""Stage 1 of the two-stage search: train the whole model as a weight-sharing super-network with the sandwich rule.

Klein et al. (2024), following BigNAS (Yu et al. 2020): every step trains the largest
sub-network on the labels, and the smallest plus a few random sub-networks of the search
space — by in-place distillation from the largest one's (detached) predictions when
``distill`` is on, else on the labels too. The gradients of all of them are summed, so the
shared weights learn to work at every size; the search of stage 2 then evaluates
sub-networks with these weights and no retraining.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimformer.search.space import SearchSpace, masked


def sandwich_loss(
    space: SearchSpace, *, random_subnets: int = 2, distill: bool = True, seed: int = 0
) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """A per-step loss ``fn(model, batch)`` for a sequence classifier: largest + smallest + ``random_subnets`` random ones."""
    generator = torch.Generator().manual_seed(seed)
    smallest = space.subnet(space.smallest())

    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        out = model(**batch)
        total = out.loss
        teacher = F.softmax(out.logits.detach().float(), dim=-1)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        subnets = [smallest] + [space.subnet(space.sample(generator)) for _ in range(random_subnets)]
        for subnet in subnets:
            if not subnet.kept_blocks:
                continue
            with masked(space.adapter, subnet):
                logits = model(**inputs).logits.float()
            if distill:  # soft cross-entropy against the largest sub-network (in-place distillation)
                total = total - (teacher * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            else:
                total = total + F.cross_entropy(logits, batch["labels"])
        return total

    return loss
