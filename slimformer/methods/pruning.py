"""Weight pruning as the papers define it: magnitude, Wanda and SparseGPT, unstructured or N:M.

All three share the mask helpers of :mod:`slimformer.methods.pruning_math`; Wanda and
SparseGPT observe calibration inputs through the one block runner. By default the
projections inside the blocks are pruned and ``lm_head`` and the embeddings stay dense.

Unstructured sparsity makes a model smaller once stored sparsely (see
:mod:`slimformer.models.sparse_storage`) but not faster in a dense forward: zeros cost as
much as any other number in a dense matrix multiply. N:M (2:4) runs faster on GPUs with
sparse tensor cores; for speed on any hardware, remove blocks or heads instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimformer.calibration import PROPAGATE, BlockRunner
from slimformer.errors import SlimformerError
from slimformer.methods import pruning_math as pm
from slimformer.methods.base import MethodResult, config_dict, register, select_linears
from slimformer.models.adapters import Adapter, weight_matrix


@dataclass(frozen=True)
class PruneConfig:
    """Fields every pruning method has; with a ``pattern`` such as ``"2:4"`` the pattern sets the sparsity."""

    sparsity: float = 0.5
    pattern: str | None = None
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if not 0.0 <= self.sparsity < 1.0:
            raise SlimformerError(f"sparsity must be in [0, 1), not {self.sparsity}")
        try:
            pm.parse_pattern(self.pattern)
        except ValueError as e:
            raise SlimformerError(str(e)) from None
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))

    @property
    def n_m(self) -> tuple[int, int] | None:
        return pm.parse_pattern(self.pattern)


@dataclass(frozen=True)
class CalibratedConfig(PruneConfig):
    """Fields of the methods that read calibration data through the block runner."""

    propagate: str = "sequential"
    batch_size: int = 1
    device: str = "cpu"

    def __post_init__(self):
        super().__post_init__()
        if self.propagate not in PROPAGATE:
            raise SlimformerError(f"propagate must be one of {', '.join(PROPAGATE)}, not '{self.propagate}'")


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: zero the smallest |W|, per weight matrix (``scope: layer``) or with one global threshold.

    ``rounds > 1`` prunes iteratively, ``sparsity · r / rounds`` at round r, with
    ``finetune_steps`` of masked fine-tuning on the calibration samples after each round.
    YAML: ``{method: magnitude, sparsity: 0.5, scope: layer}``
    """

    method: ClassVar[str] = "magnitude"
    scope: str = "layer"
    rounds: int = 1
    finetune_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in ("layer", "global"):
            raise SlimformerError(f"magnitude scope must be 'layer' or 'global', not '{self.scope}'")
        if self.scope == "global" and self.pattern:
            raise SlimformerError("an N:M pattern is chosen within rows: use scope 'layer' with it")
        if self.rounds < 1:
            raise SlimformerError(f"rounds must be at least 1, not {self.rounds}")

    @property
    def needs_samples(self) -> bool:
        """Magnitude reads calibration data only to fine-tune between rounds."""
        return self.finetune_steps > 0


@dataclass(frozen=True)
class WandaConfig(CalibratedConfig):
    """Wanda (Sun et al. 2023, arXiv:2306.11695): score |W|·‖X‖₂, compared within each output row.

    YAML: ``{method: wanda, sparsity: 0.5, pattern: "2:4"}``
    """

    method: ClassVar[str] = "wanda"


@dataclass(frozen=True)
class SparseGPTConfig(CalibratedConfig):
    """SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774): OBS reconstruction with the calibration Hessian.

    YAML: ``{method: sparsegpt, sparsity: 0.5, blocksize: 128, percdamp: 0.01}``
    """

    method: ClassVar[str] = "sparsegpt"
    blocksize: int = 128
    percdamp: float = 0.01


def check_pattern_fits(modules: dict[str, nn.Module], n_m: tuple[int, int] | None) -> None:
    """Fail before any work when an N:M group size does not divide a layer's input width."""
    if n_m is None:
        return
    for name, module in modules.items():
        width = weight_matrix(module).shape[1]
        if width % n_m[1]:
            raise SlimformerError(f"pattern {n_m[0]}:{n_m[1]} does not divide the width {width} of {name}")


def sparsity_table(modules: dict[str, nn.Module]) -> dict[str, dict]:
    """Fraction of zero weights of each module, with its shape."""
    return {
        name: {"sparsity": (weight_matrix(m) == 0).float().mean().item(), "shape": list(weight_matrix(m).shape)}
        for name, m in modules.items()
    }


def overall_sparsity(modules: dict[str, nn.Module]) -> float:
    """Fraction of zero weights over all the given modules together."""
    zeros = sum(int((weight_matrix(m) == 0).sum()) for m in modules.values())
    return zeros / sum(weight_matrix(m).numel() for m in modules.values())


def _result(config, modules: dict[str, nn.Module], **summary) -> MethodResult:
    return MethodResult(config.method, config_dict(config), layers=sparsity_table(modules),
                        summary={"sparsity": overall_sparsity(modules), "pruned_modules": len(modules), **summary})


def _magnitude_masks(modules: dict[str, nn.Module], config: MagnitudeConfig, sparsity: float) -> list[torch.Tensor]:
    scores = [weight_matrix(m).abs() for m in modules.values()]
    if config.scope == "global":
        return pm.mask_global(scores, sparsity)
    if config.n_m:
        return [pm.mask_n_m(s, *config.n_m) for s in scores]
    return [pm.mask_per_matrix(s, sparsity) for s in scores]


@register(MagnitudeConfig)
def magnitude(adapter: Adapter, config: MagnitudeConfig, samples: torch.Tensor | None = None) -> MethodResult:
    """Prune by |W|; with ``rounds > 1``, prune → fine-tune → prune more, up to the target."""
    modules = select_linears(adapter, config.targets, config.ignore)
    check_pattern_fits(modules, config.n_m)
    if config.finetune_steps and samples is None:
        raise SlimformerError("iterative magnitude pruning with fine-tuning needs calibration samples")
    rounds = 1 if config.n_m else config.rounds  # an N:M pattern is reached in one step
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for module, mask in zip(modules.values(), _magnitude_masks(modules, config, config.sparsity * r / rounds)):
                pm.apply_mask(weight_matrix(module), mask)
        if config.finetune_steps:
            from slimformer.methods.finetune import FinetuneConfig, finetune

            finetune(adapter, FinetuneConfig(steps=config.finetune_steps), samples)
    return _result(config, modules, rounds=rounds)


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


class _PruneVisitor:
    """Block visitor of Wanda and SparseGPT: gathers per-input statistics, then prunes each module.

    Modules fed the very same input tensor (q/k/v, gate/up) share one statistic, computed once.
    """

    def __init__(self, adapter: Adapter, modules: dict[str, nn.Module], config: CalibratedConfig):
        self.adapter, self.modules, self.config = adapter, modules, config
        self.hessian = isinstance(config, SparseGPTConfig)
        self.stats: dict[str, list] = {}  # name -> [statistic, number of sequences]
        self.last: dict[int, tuple[torch.Tensor, str]] = {}  # batch -> (its last input seen, by which module)

    def targets(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        self.stats.clear()
        self.last.clear()
        prefix = f"{self.adapter.block_prefix}.{index}."
        return {n: m for n, m in self.modules.items() if n.startswith(prefix)}

    def observe(self, name: str, module: nn.Module, inputs: torch.Tensor, batch: int) -> None:
        last = self.last.get(batch)
        if last is not None and last[0] is inputs:
            self.stats[name] = self.stats[last[1]]
            return
        self.last[batch] = (inputs, name)
        sequences = inputs.shape[0] if inputs.ndim == 3 else 1
        x = inputs.reshape(-1, inputs.shape[-1]).float()  # (tokens, in)
        entry = self.stats.get(name)
        if entry is None:
            width = x.shape[1]
            entry = self.stats[name] = [x.new_zeros((width, width) if self.hessian else (width,)), 0]
        if self.hessian:
            add_upper_gram(entry[0], x)
        else:
            entry[0] += (x * x).sum(0)
        entry[1] += sequences

    def compress(self, name: str, module: nn.Module) -> None:
        if name not in self.stats:
            raise SlimformerError(f"{name} saw no calibration input")
        stat, sequences = self.stats[name]
        W = weight_matrix(module)
        cfg = self.config
        if self.hessian:
            H = (stat.triu() + stat.triu(1).T) * (2.0 / sequences)  # SparseGPT's 2·XᵀX / n, made whole
            new, _ = pm.sparsegpt_prune(W, H, cfg.sparsity, cfg.pattern, cfg.blocksize, cfg.percdamp)
            W.copy_(new)
        else:
            score = pm.wanda_scores(W.float(), stat)
            mask = pm.mask_n_m(score, *cfg.n_m) if cfg.n_m else pm.mask_per_row(score, cfg.sparsity)
            pm.apply_mask(W, mask)


def _calibrated(adapter: Adapter, config: CalibratedConfig, samples: torch.Tensor | None) -> MethodResult:
    """Wanda or SparseGPT: calibrate and prune block by block through the runner."""
    if samples is None or samples.numel() == 0:
        raise SlimformerError(f"{config.method} needs calibration samples; the calibration set is empty")
    modules = select_linears(adapter, config.targets, config.ignore)
    check_pattern_fits(modules, config.n_m)
    runner = BlockRunner(adapter, samples, batch_size=config.batch_size, device=config.device)
    with torch.no_grad():
        runner.run(_PruneVisitor(adapter, modules, config), propagate=config.propagate, desc=config.method)
    return _result(config, modules, samples=int(samples.shape[0]), seqlen=int(samples.shape[1]))


register(WandaConfig)(_calibrated)
register(SparseGPTConfig)(_calibrated)
