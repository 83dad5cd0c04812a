"""Stage 1 of the two-stage search: train the whole model as a weight-sharing super-network with the sandwich rule.

Klein et al. (2024), following BigNAS (Yu et al. 2020): every step trains the largest
sub-network on the labels, and the smallest plus a few random sub-networks of the search
space. ``distill`` says what those learn from:

- ``"inplace"`` (the paper's choice): the largest sub-network's detached predictions of the
  same step (in-place distillation);
- ``"reference"``: a fixed teacher, the fine-tuned reference model, as DynaBERT (Hou et al.
  2020) distils every width from its fine-tuned full model. The largest sub-network then
  learns from the teacher as well as from the labels (the two losses averaged), so every size,
  the full one included, gets the teacher's soft targets;
- ``"none"``: the labels, like the largest.

The gradients of all of them are summed, so the shared weights learn to work at every size;
the search of stage 2 then evaluates sub-networks with these weights and no retraining.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from slimformer.errors import SlimformerError
from slimformer.search.space import SearchSpace, masked

DISTILL = ("inplace", "reference", "none")
# How the random sub-networks are drawn: each parameter uniformly (the paper), or a size first
# and every parameter near it (SearchSpace.sample's ``spread``), so that sizes cover the range.
SAMPLING = {"uniform": None, "sized": 0.2}


def _label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to class labels; MSE to the score of a one-output regression head (STS-B)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits[:, 0].float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def _distill_loss(teacher: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy to the teacher's distribution; MSE to its score for a regression head, as Klein et al. for STS-B."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.float(), teacher.float())
    return -(F.softmax(teacher.float(), dim=-1) * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def sandwich_loss(
    space: SearchSpace, *, random_subnets: int = 2, distill: str = "inplace", teacher: torch.nn.Module | None = None,
    sampling: str = "sized", seed: int = 0,
) -> Callable[[torch.nn.Module, dict], torch.Tensor]:
    """A per-step loss ``fn(model, batch)`` for a sequence classifier: largest + smallest + ``random_subnets`` random ones.

    ``distill`` is one of :data:`DISTILL` (module doc); ``"reference"`` needs ``teacher``, a
    classifier with the same labels, which is run without gradients. ``sampling`` is a key of
    :data:`SAMPLING`: ``"uniform"`` draws each parameter of the space uniformly, as Klein et al.;
    the default ``"sized"`` draws a size first (see :meth:`SearchSpace.sample`), because in a
    space with a head and a unit count per block uniform draws almost never train the
    sub-networks near full size, where importance pruning is strongest.
    """
    if distill not in DISTILL:
        raise SlimformerError(f"unknown distillation '{distill}'; choose one of {', '.join(DISTILL)}")
    if sampling not in SAMPLING:
        raise SlimformerError(f"unknown sampling '{sampling}'; choose one of {', '.join(SAMPLING)}")
    if distill == "reference" and teacher is None:
        raise SlimformerError("distill='reference' needs the teacher model")
    generator = torch.Generator().manual_seed(seed)
    smallest = space.subnet(space.smallest())

    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**batch)
        if distill == "reference":
            with torch.no_grad():
                target = teacher(**inputs).logits
            total = (out.loss + _distill_loss(target, out.logits)) / 2
        else:
            target = out.logits.detach()
            total = out.loss
        subnets = [smallest] + [space.subnet(space.sample(generator, SAMPLING[sampling])) for _ in range(random_subnets)]
        for subnet in subnets:
            if not subnet.kept_blocks:
                continue
            with masked(space.adapter, subnet):
                logits = model(**inputs).logits
            total = total + (_label_loss(logits, batch["labels"]) if distill == "none"
                             else _distill_loss(target, logits))
        return total

    return loss
