"""Structural search, shared by both paths: the search config, plain importance pruning, and the first trials.

The encoder path (two-stage, on a GLUE task) is :mod:`slimformer.search.encoder`; the decoder
path (one-shot, on calibration windows) is :mod:`slimformer.search.decoder`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimformer.errors import SlimformerError
from slimformer.search.importance import normalised
from slimformer.search.objectives import parse_objectives
from slimformer.search.space import SPACES, SearchSpace, Subnet, count_params
from slimformer.search.strategies import BACKENDS, STRATEGIES
from slimformer.search.supernet import DISTILL, SAMPLING


@dataclass(frozen=True)
class SearchConfig:
    """What to search (space, objectives), how (strategy, trials, backend), and the training of stage 1."""

    space: str = "small"
    objectives: tuple[str, ...] = ("error", "params")
    strategy: str = "nsga2"
    trials: int = 100
    seed: int = 0
    backend: str = "local"
    population: int | None = None
    importance_batches: int = 8
    # Encoders: fine-tuning of the reference model and of the super-network.
    epochs: int = 3
    supernet: bool = True
    supernet_init: str = "reference"
    random_subnets: int = 2
    distill: str = "inplace"
    sampling: str = "sized"
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    train_limit: int | None = None
    search_valid: int = 500
    # Importance pruning is measured at these fractions of the parameters (empty: at the sizes of
    # the searched Pareto set), and its sub-networks there seed the search when ``seed_baseline``.
    baseline_sizes: tuple[float, ...] = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    seed_baseline: bool = True

    @property
    def seed_sizes(self) -> tuple[float, ...]:
        """The sizes whose importance-pruned sub-networks seed the search (none unless ``seed_baseline``)."""
        return self.baseline_sizes if self.seed_baseline else ()

    def __post_init__(self):
        if self.space not in SPACES:
            raise SlimformerError(f"unknown search space '{self.space}'; choose one of {', '.join(SPACES)}")
        if self.strategy not in STRATEGIES:
            raise SlimformerError(f"unknown strategy '{self.strategy}'; choose one of {', '.join(STRATEGIES)}")
        if self.backend not in BACKENDS:
            raise SlimformerError(f"unknown backend '{self.backend}'; choose one of {', '.join(BACKENDS)}")
        object.__setattr__(self, "objectives", tuple(parse_objectives(list(self.objectives))))
        if self.trials < 1:
            raise SlimformerError(f"trials must be at least 1, not {self.trials}")
        if self.epochs != int(self.epochs) or self.epochs < 1:
            raise SlimformerError(f"epochs must be a whole number of at least 1, not {self.epochs}")
        object.__setattr__(self, "epochs", int(self.epochs))
        if self.distill not in DISTILL:
            raise SlimformerError(f"unknown distillation '{self.distill}'; choose one of {', '.join(DISTILL)}")
        if self.sampling not in SAMPLING:
            raise SlimformerError(f"unknown sampling '{self.sampling}'; choose one of {', '.join(SAMPLING)}")
        if self.supernet_init not in ("reference", "pretrained"):
            raise SlimformerError(f"supernet_init must be 'reference' or 'pretrained', not '{self.supernet_init}'")


def importance_prune(space: SearchSpace, target: float, *, heads: bool = True, align: int = 1) -> Subnet:
    """Plain importance pruning: one global threshold on the normalised head and unit scores, sized to ``target``.

    ``target`` is the fraction of the model's parameters to keep; the threshold is found by
    bisection. Every block keeps at least its best head group and its best unit. ``heads=False``
    keeps every head (FFN units only); ``align`` rounds each block's unit count to a multiple of
    it (the most important ones kept), so quantization groups and kernels still fit the widths.
    """
    adapter, imp = space.adapter, normalised(space.importance)
    total = count_params(adapter)
    every_head = list(range(space.heads))

    def units_at(b: int, t: float) -> list[int]:
        count = int((imp.units[b] >= t).sum())
        if align > 1:
            count = min(space.units, max(align, align * round(count / align)))
        return sorted(imp.units[b].topk(max(count, 1)).indices.tolist())

    def subnet_at(t: float) -> Subnet:
        kept_heads, units = [], []
        for b in range(space.blocks):
            if heads:
                groups = imp.heads[b].view(space.groups, space.group_size)
                per_group = max(1, int((groups >= t).sum(1).min()))  # a KV group keeps as many heads as the others
                top = groups.topk(per_group, dim=1).indices + torch.arange(space.groups)[:, None] * space.group_size
                kept_heads.append(sorted(top.flatten().tolist()))
            else:
                kept_heads.append(every_head)
            units.append(units_at(b, t))
        return Subnet(kept_heads, units)

    top = max(float(u.max()) for u in imp.units)
    lo, hi = 0.0, (max(top, max(float(h.max()) for h in imp.heads)) if heads else top) + 1e-6
    for _ in range(50):
        mid = (lo + hi) / 2
        if count_params(adapter, subnet_at(mid)) / total > target:
            lo = mid
        else:
            hi = mid
    return subnet_at(hi)


def initial_points(space: SearchSpace, sizes: tuple[float, ...] = ()) -> list[dict]:
    """The first trials: the largest and the smallest network, evenly shrunk ones in between, and
    the importance-pruned networks at ``sizes`` (fractions of the parameters) the space can express.

    Seeding with importance pruning's own sub-networks means the search starts from the
    baseline's solutions, measured with the super-network's weights, and improves on them;
    without them NSGA-II's few generations may never visit that corner of a large space.
    """
    evenly = [space.uniform(f) for f in (0.9, 0.75, 0.5)]
    pruned = [space.params_of(importance_prune(space, size)) for size in sizes]
    points = [space.largest(), space.smallest()]
    for p in [*evenly, *pruned]:
        if p is not None and p not in points:
            points.append(p)
    return points
