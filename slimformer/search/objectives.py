"""Objectives of the structural search: error (from a caller's quality function), parameters, FLOPs and latency.

All are minimised. ``params`` and ``flops`` are relative to the full model (1.0 = unpruned),
``latency`` is the measured median seconds of one forward of the extracted sub-network.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from slimformer.errors import SlimformerError
from slimformer.evaluation.speed import timed
from slimformer.search.space import SearchSpace, Subnet, count_params, extract, flops_per_token, masked

OBJECTIVES = ("error", "params", "flops", "latency")


def parse_objectives(text: str | list[str]) -> list[str]:
    """``"error,params"`` → ``["error", "params"]``; unknown names are an error."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    bad = [n for n in names if n not in OBJECTIVES]
    if bad or not names:
        raise SlimformerError(f"unknown objective '{(bad or [''])[0]}'; choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise SlimformerError(f"give at least two different objectives, not {','.join(names)}")
    return names


class Objective:
    """Evaluates a parameter set of ``space`` on the chosen objectives.

    ``error(subnet) -> float`` measures quality with the sub-network's masks applied (e.g.
    1 − accuracy, or perplexity). ``latency_input`` is the batch of token ids timed for the
    latency objective (``repeats`` timed forwards after one warm-up, median).
    """

    def __init__(
        self,
        space: SearchSpace,
        objectives: list[str],
        error: Callable[[Subnet], float] | None = None,
        *,
        latency_input: torch.Tensor | None = None,
        repeats: int = 3,
        seq_len: int = 128,
    ):
        if "error" in objectives and error is None:
            raise SlimformerError("the error objective needs a quality function (a task or calibration data)")
        self.space, self.objectives, self.error = space, objectives, error
        self.latency_input, self.repeats, self.seq_len = latency_input, repeats, seq_len
        adapter = space.adapter
        self.total_params = count_params(adapter)
        self.total_flops = flops_per_token(adapter, seq_len=seq_len)

    def measure(self, subnet: Subnet) -> dict[str, float]:
        """Every configured objective of one sub-network."""
        adapter, out = self.space.adapter, {}
        for name in self.objectives:
            if not subnet.kept_blocks and name in ("error", "latency"):
                out[name] = float("inf")
            elif name == "error":
                with masked(adapter, subnet):
                    out[name] = float(self.error(subnet))
            elif name == "params":
                out[name] = count_params(adapter, subnet) / self.total_params
            elif name == "flops":
                out[name] = flops_per_token(adapter, subnet, self.seq_len) / self.total_flops
            else:
                out[name] = self.latency(subnet)
        return out

    def latency(self, subnet: Subnet) -> float:
        """Median wall seconds of one forward of the extracted sub-network over ``latency_input``."""
        if self.latency_input is None:
            raise SlimformerError("the latency objective needs an input batch to time")
        model = extract(self.space.adapter.model, subnet)
        ids = self.latency_input.to(next(model.parameters()).device)
        times = []
        with torch.no_grad():
            for i in range(self.repeats + 1):
                seconds = timed(model, lambda: model(input_ids=ids))[1]
                if i:  # the first run warms up
                    times.append(seconds)
        return statistics.median(times)

    def __call__(self, params: dict) -> tuple[float, ...]:
        values = self.measure(self.space.subnet(params))
        return tuple(values[name] for name in self.objectives)
