"""What every method shares: the registry, module selection by name, and the result record.

A method is a frozen config dataclass with a ``method`` name plus one function
``fn(adapter, config, samples) -> MethodResult`` registered against the config type with
:func:`register`. The CLI, recipes and reports know only this protocol.

How to add a method (``methods/pruning.py`` is a complete example):

1. Write the maths as pure tensor functions in their own module or section (a weight and its
   statistics in, new weights or a mask out), each tested on a small tensor against a slow,
   obviously correct reference written in the test.
2. Write the config: a ``@dataclass(frozen=True)`` with ``method: ClassVar[str] = "name"``,
   plain-data fields with defaults, validation in ``__post_init__`` raising
   ``SlimformerError``, and a docstring giving the paper and a YAML sample. A
   ``needs_samples`` attribute or property that is False spares the caller calibration data.
3. Write ``@register(Config) def apply_name(adapter, config, samples) -> MethodResult``. Reach
   the model only through the adapter (``adapter.blocks``, ``adapter.linears(block)``,
   :func:`select_linears` for ``targets``/``ignore``). A calibrated method implements a
   :class:`slimformer.calibration.BlockVisitor` (``targets``, ``observe``, ``compress``) and
   hands it to the one :class:`~slimformer.calibration.BlockRunner`: never a loop of its own
   over blocks or samples. What the result reports about a block is recorded when the block
   finishes (the visitor's ``finish`` / ``restore``, see ``statistics.ModuleVisitor``): a
   streamed model (``--max-memory``) writes the block and drops it right after. Surgery that changes shapes goes through
   :mod:`slimformer.models.surgery`, so the config stays valid and stock ``transformers``
   loads the result.
4. Import the module in ``methods/__init__.py`` (registration happens at import); the recipe
   name, the YAML reader and the reports then know it. Add its config to the case table of
   ``tests/test_recipes.py`` (YAML round trip, invariants on the tiny models).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimformer.errors import SlimformerError
from slimformer.machine import peak_rss_gib, reset_peak_rss
from slimformer.models.adapters import Adapter

_HANDLERS: dict[type, Callable] = {}
METHODS: dict[str, type] = {}


def register(config_cls: type) -> Callable:
    """Register ``fn`` as the handler of ``config_cls`` (and its ``method`` name)."""

    def wrap(fn: Callable) -> Callable:
        _HANDLERS[config_cls] = fn
        METHODS[config_cls.method] = config_cls
        return fn

    return wrap


@dataclass
class MethodResult:
    """What a method did: its config, per-module details, wall time and peak resident memory."""

    method: str
    config: dict[str, Any]
    seconds: float = 0.0
    peak_rss_gib: float = 0.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def apply(adapter: Adapter, config, samples: torch.Tensor | None = None) -> MethodResult:
    """Run the method of ``config`` on the adapted model; time it and record peak memory."""
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise SlimformerError(f"no method registered for {type(config).__name__}")
    reset_peak_rss()  # the peak of this method alone, not of measurements made before it
    start = time.perf_counter()
    result = handler(adapter, config, samples)
    result.seconds = time.perf_counter() - start
    result.peak_rss_gib = peak_rss_gib()
    return result


def config_dict(config) -> dict[str, Any]:
    """A config as plain data, its method name first."""
    return {"method": config.method, **dataclasses.asdict(config)}


@dataclass(frozen=True)
class CalibratedFields:
    """Fields of every method that reads calibration data through the block runner (mixed into its config)."""

    propagate: str = "sequential"
    batch_size: int = 1
    device: str = "cpu"

    def check_propagate(self) -> None:
        """Refuse a propagation mode the runner does not know."""
        from slimformer.calibration import PROPAGATE

        if self.propagate not in PROPAGATE:
            raise SlimformerError(f"propagate must be one of {', '.join(PROPAGATE)}, not '{self.propagate}'")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_linears(
    adapter: Adapter, targets: tuple[str, ...] = (), ignore: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """Linear (and GPT-2 Conv1D) modules by fully-qualified name.

    Without ``targets``, every projection inside the blocks (so ``lm_head`` and embeddings
    stay dense); with them, any Linear of the model whose name equals a target, ends with
    ``.target``, or fully matches a ``re:``-prefixed regex. ``ignore`` uses the same rules.
    """
    prefix = adapter.block_prefix + "."
    chosen = {}
    for name, module in adapter.model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        wanted = any(_matches(name, t) for t in targets) if targets else name.startswith(prefix)
        if wanted and not any(_matches(name, p) for p in ignore):
            chosen[name] = module
    if not chosen:
        raise SlimformerError(f"no Linear module matches targets {list(targets)} (ignoring {list(ignore)})")
    return chosen
