"""Structural search of a decoder, one-shot: units ranked on calibration windows, sub-networks scored by perplexity."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from slimformer.evaluation.perplexity import window_nll
from slimformer.models.adapters import Adapter
from slimformer.search.importance import lm_loss, mask_gradient_importance
from slimformer.search.objectives import Objective
from slimformer.search.space import Importance, SearchSpace
from slimformer.search.strategies import run_search
from slimformer.search.structural import SearchConfig, initial_points


def calibration_perplexity(model, samples: torch.Tensor) -> float:
    """exp(mean next-token loss) over calibration windows of equal length."""
    device = next(model.parameters()).device
    with torch.no_grad():
        losses = [nll for window in samples for nll in window_nll(model, window[None].to(device))]
    return math.exp(sum(losses) / len(losses))


def decoder_importance(adapter: Adapter, samples: torch.Tensor, config: SearchConfig,
                       progress: bool = True) -> Importance:
    """Mask-gradient importance of a decoder's heads and units on the first calibration windows."""
    rank = list(samples[: config.importance_batches].split(1))
    return mask_gradient_importance(adapter, rank, lm_loss, progress=progress)


def decoder_search(adapter: Adapter, samples: torch.Tensor, config: SearchConfig, *, storage: Path | None = None,
                   progress: bool = True, latency_input: torch.Tensor | None = None,
                   importance: Importance | None = None) -> dict:
    """One-shot search for a decoder: importance (unless given) and perplexity on calibration windows, no training."""
    if importance is None:
        importance = decoder_importance(adapter, samples, config, progress)
    space = SearchSpace(config.space, adapter, importance)
    objective = Objective(space, list(config.objectives), lambda subnet: calibration_perplexity(adapter.model, samples),
                          latency_input=latency_input if latency_input is not None else samples[:1])
    result = run_search(space.distributions(), objective, objectives=config.objectives, strategy=config.strategy,
                        trials=config.trials, seed=config.seed, storage=storage, backend=config.backend,
                        population=config.population, progress=progress,
                        initial=initial_points(space, config.seed_sizes))
    return {"config": asdict(config), "result": result, "space": space, "importance": importance}
