"""The one block visitor of every calibrated weight method: gathers statistics of each target's inputs, then compresses.

Wanda reads each input's squared norm, SparseGPT and GPTQ the Hessian ``2 XᵀX / n``, AWQ the
mean ``|x|`` of each input channel and a sample of input rows. Modules fed the very same input
tensor (q/k/v, gate/up) share one statistic, computed once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.models.adapters import Adapter

KINDS = ("hessian", "sqnorm", "absmean", "rows")


def add_upper_gram(H: torch.Tensor, x: torch.Tensor, block: int | None = None) -> None:
    """Add the block-upper triangle of ``xᵀx`` to ``H`` in place (``x``: tokens × width).

    The Gram matrix is symmetric: computing only the block rows right of the diagonal saves a
    third of the multiply-adds, which dominate SparseGPT's calibration after the forward passes
    (about 30% less time at width 1536 on a CPU; below width 1024 the smaller products lose
    more in efficiency than they save, so one full product is used). Below the diagonal blocks
    ``H`` stays untouched; ``H.triu() + H.triu(1).T`` is the whole matrix.
    """
    width = x.shape[1]
    block = block or (384 if width >= 1024 else width)
    for a in range(0, width, block):
        H[a : a + block, a:].addmm_(x[:, a : a + block].T, x[:, a:])


def _mirror_upper_(H: torch.Tensor, band: int = 1024) -> None:
    """Make ``H`` symmetric from its upper triangle, in place, a band of rows at a time.

    ``H.triu() + H.triu(1).T`` would allocate a second ``w × w`` matrix; here the temporaries are
    one ``band × band`` diagonal block. The values are the same: every entry below the diagonal
    becomes its mirror image's.
    """
    for a in range(0, H.shape[0], band):
        b = min(a + band, H.shape[0])
        D = H[a:b, a:b]
        D.copy_(D.triu() + D.triu(1).T)
        H[a:b, :a].copy_(H[:a, a:b].T)


@dataclass
class InputStats:
    """What was gathered about one input: the requested statistics and how many sequences and tokens fed them."""

    hessian: torch.Tensor | None = None  # upper triangle of XᵀX while gathering
    full: torch.Tensor | None = None  # 2 XᵀX / n once gathering is over (see full_hessian)
    sqnorm: torch.Tensor | None = None  # Σ x², per input channel
    abssum: torch.Tensor | None = None  # Σ |x|, per input channel
    rows: list[torch.Tensor] = field(default_factory=list)  # up to ``max_rows`` input rows
    sequences: int = 0
    tokens: int = 0

    last_use: bool = False  # set by the visitor: no module left in the block reads these statistics

    def full_hessian(self, take: bool = False) -> torch.Tensor:
        """``2 XᵀX / n`` over the ``n`` sequences seen (SparseGPT's and GPTQ's normalisation).

        Made once, in the accumulator's memory (no second ``w × w`` matrix: 0.7 GiB at a 13B
        model's intermediate width), and shared by the modules fed the same input. Callers must
        not change it, unless they ``take`` it: then these statistics let go of it, and the
        caller may work in it (only the last module fed this input may: see ``last_use``). No
        observation may follow.
        """
        if self.full is None:
            if self.hessian is None:
                raise SlimformerError("the Hessian was already taken by the last module fed this input")
            H, self.hessian = self.hessian, None
            _mirror_upper_(H)
            self.full = H.mul_(2.0 / self.sequences)
        H = self.full
        if take:
            self.full = None
        return H

    def use_hessian(self) -> tuple[torch.Tensor, bool]:
        """The full Hessian for one module, and whether that module may work in it (it is the last one fed this input)."""
        return self.full_hessian(take=self.last_use), self.last_use

    def absmean(self) -> torch.Tensor:
        """Mean ``|x|`` of each input channel over every token seen."""
        return self.abssum / self.tokens

    def sample(self) -> torch.Tensor:
        """The input rows kept (tokens × width)."""
        return torch.cat(self.rows)


class ModuleVisitor:
    """Block visitor over the chosen modules of each block: ``compress_fn(name, module)`` once every sample went through it.

    ``finish_fn(index, modules)`` is called when block ``index`` is done (its chosen modules by
    name) and returns a JSON-able record of it; ``restore_fn(index, record)`` gets the records
    of blocks finished before a streamed run was resumed. Without samples (magnitude, RTN) the
    runner calls ``compress`` on each block without a forward pass.
    """

    def __init__(self, adapter: Adapter, modules: dict[str, nn.Module], compress_fn: Callable,
                 finish_fn: Callable[[int, dict[str, nn.Module]], Any] | None = None,
                 restore_fn: Callable[[int, Any], None] | None = None):
        self.adapter, self.modules, self.compress_fn = adapter, modules, compress_fn
        self.finish_fn, self.restore_fn = finish_fn, restore_fn
        self.current: dict[str, nn.Module] = {}

    def targets(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        """The chosen modules of block ``index``, by name."""
        prefix = f"{self.adapter.block_prefix}.{index}."
        self.current = {n: m for n, m in self.modules.items() if n.startswith(prefix)}
        return self.current

    def observe(self, name: str, module: nn.Module, inputs: torch.Tensor, batch: int) -> None:
        """One batch's input to ``name`` (this visitor keeps nothing of it)."""

    def compress(self, name: str, module: nn.Module) -> None:
        """Compress ``name`` once every sample went through it."""
        self.compress_fn(name, module)

    def finish(self, index: int, block: nn.Module) -> Any:
        """The record of block ``index``, now that its modules are compressed; then the visitor lets go of them.

        A quantized block holds stand-ins by now: the replaced modules, with their float weights,
        must not outlive it (in a streamed run they would stay in memory, one block's worth each).
        ``current`` is emptied in place, as the runner holds it too.
        """
        record = self.finish_fn(index, self.current) if self.finish_fn else None
        for name in self.current:
            self.modules.pop(name, None)
        self.current.clear()
        return record

    def restore(self, index: int, record: Any) -> None:
        """Take back the record of a block finished by an interrupted run."""
        if self.restore_fn:
            self.restore_fn(index, record)


class StatsVisitor(ModuleVisitor):
    """Block visitor that gathers ``kinds`` of statistics of each target's inputs, then calls ``compress_fn``.

    ``compress_fn(name, module, stats)`` changes one module once every sample went through it.
    ``max_rows`` bounds the input rows kept for ``"rows"`` (every ``stride``-th token, evenly).
    """

    def __init__(self, adapter: Adapter, modules: dict[str, nn.Module], kinds: tuple[str, ...],
                 compress_fn: Callable[[str, nn.Module, InputStats], None], max_rows: int = 4096, stride: int = 1,
                 **finish):
        super().__init__(adapter, modules, compress_fn, **finish)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {', '.join(KINDS)}")
        self.kinds = kinds
        self.max_rows, self.stride = max_rows, stride
        self.stats: dict[str, InputStats] = {}
        self.used: set[str] = set()  # modules of this block compressed already
        # batch -> (its last input seen, weak so no pass's activations outlive it; its statistics)
        self.last: dict[int, tuple[weakref.ref, InputStats]] = {}

    def targets(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        """The chosen modules of block ``index``, with no statistics yet."""
        self.stats.clear()
        self.used.clear()
        self.last.clear()
        return super().targets(index, block)

    def observe(self, name: str, module: nn.Module, inputs: torch.Tensor, batch: int) -> None:
        """Add one batch's input to ``name``'s statistics; modules fed the very same tensor share them."""
        last = self.last.get(batch)
        if last is not None and last[0]() is inputs:
            self.stats[name] = last[1]
            return
        sequences = inputs.shape[0] if inputs.ndim == 3 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # (tokens, in)
        if name in self.used:
            raise SlimformerError(f"{name} was observed after it was compressed")
        entry = self.stats.get(name)
        if entry is None:
            width = x.shape[1]
            entry = self.stats[name] = InputStats(
                hessian=x.new_zeros((width, width)) if "hessian" in self.kinds else None,
                sqnorm=x.new_zeros(width) if "sqnorm" in self.kinds else None,
                abssum=x.new_zeros(width) if "absmean" in self.kinds else None)
        if entry.full is not None or ("hessian" in self.kinds and entry.hessian is None):
            raise SlimformerError(f"{name} was observed after its Hessian was used")
        self.last[batch] = (weakref.ref(inputs), entry)
        if entry.hessian is not None:
            add_upper_gram(entry.hessian, x)
        if entry.sqnorm is not None:
            entry.sqnorm += (x * x).sum(0)
        if entry.abssum is not None:
            entry.abssum += x.abs().sum(0)
        if "rows" in self.kinds:
            kept = sum(r.shape[0] for r in entry.rows)
            if kept < self.max_rows:
                entry.rows.append(x[:: self.stride][: self.max_rows - kept].cpu())
        entry.sequences += sequences
        entry.tokens += x.shape[0]

    def compress(self, name: str, module: nn.Module) -> None:
        """Compress ``name`` with its statistics, then let go of them once no module left needs them.

        So a block's Hessians do not pile up: each goes as soon as the last module fed its input is
        compressed, and that module may work in it (``InputStats.last_use``).
        """
        if name not in self.stats:
            raise SlimformerError(f"{name} saw no calibration input")
        entry = self.stats[name]
        # the last module fed this input: every target was observed (a later one cannot share it)
        # and no other one holds it
        everyone = set(self.current) <= {*self.stats, *self.used}
        entry.last_use = everyone and sum(s is entry for s in self.stats.values()) == 1
        self.compress_fn(name, module, entry)
        del self.stats[name]
        self.used.add(name)
