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
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from slimformer.calibration import BlockRunner
from slimformer.errors import SlimformerError
from slimformer.methods import pruning_math as pm
from slimformer.methods.base import CalibratedFields, MethodResult, config_dict, register, select_linears
from slimformer.methods.obs import obs_compress
from slimformer.methods.quantization import BlockInstaller
from slimformer.methods.statistics import InputStats, ModuleVisitor, StatsVisitor
from slimformer.models.adapters import Adapter, weight_matrix
from slimformer.models.streaming import stream_of
from slimformer.models.quantizer import QuantizedWeight, QuantScheme


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
        """``(n, m)`` of an N:M pattern, ``None`` for unstructured sparsity."""
        return pm.parse_pattern(self.pattern)


@dataclass(frozen=True)
class CalibratedConfig(CalibratedFields, PruneConfig):
    """Fields of the pruning methods that read calibration data through the block runner."""

    def __post_init__(self):
        super().__post_init__()
        self.check_propagate()


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
    # Joint sparsity + quantization (the paper's §3.4): each kept weight is also rounded to this many bits.
    bits: int | None = None
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.bits is not None:
            try:
                QuantScheme(self.bits, self.group_size, self.symmetric)
            except ValueError as e:
                raise SlimformerError(str(e)) from None

    def scheme(self) -> QuantScheme | None:
        """The joint quantization scheme, or None when SparseGPT only prunes."""
        return QuantScheme(self.bits, self.group_size, self.symmetric) if self.bits is not None else None


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


class _Sparsity:
    """The sparsity of each pruned module, recorded as its block finishes (a streamed block leaves memory after)."""

    def __init__(self, installer=None):
        self.layers: dict[str, dict] = {}
        self.zeros = self.total = 0
        self.installer = installer  # SparseGPT's joint quantization: packed modules swapped in per block

    def finish(self, index: int, modules: dict[str, nn.Module]) -> dict:
        """Measure the block's modules (float weights, before any packing)."""
        record = {"layers": sparsity_table(modules),
                  "zeros": sum(int((weight_matrix(m) == 0).sum()) for m in modules.values()),
                  "total": sum(weight_matrix(m).numel() for m in modules.values())}
        if self.installer is not None:
            record["quant"] = self.installer.finish(index, modules)
        self.restore(index, {k: v for k, v in record.items() if k != "quant"})
        return record

    def restore(self, index: int, record: dict) -> None:
        """Add a finished block's record."""
        self.layers.update(record["layers"])
        self.zeros += record["zeros"]
        self.total += record["total"]
        if self.installer is not None and "quant" in record:
            self.installer.restore(index, record["quant"])

    def result(self, config, **summary) -> MethodResult:
        return MethodResult(config.method, config_dict(config), layers=dict(self.layers),
                            summary={"sparsity": self.zeros / max(self.total, 1), "pruned_modules": len(self.layers),
                                     **summary})


def _magnitude_masks(modules: dict[str, nn.Module], config: MagnitudeConfig, sparsity: float) -> list[torch.Tensor]:
    scores = [weight_matrix(m).abs() for m in modules.values()]
    if config.scope == "global":
        return pm.mask_global(scores, sparsity)
    if config.n_m:
        return [pm.mask_n_m(s, *config.n_m) for s in scores]
    return [pm.mask_per_matrix(s, sparsity) for s in scores]


@register(MagnitudeConfig)
def magnitude(adapter: Adapter, config: MagnitudeConfig, samples: torch.Tensor | None = None) -> MethodResult:
    """Prune by |W|; with ``rounds > 1``, prune → fine-tune → prune more, up to the target.

    One round with per-matrix thresholds runs block by block through the runner (so it streams
    from disk); a global threshold or several rounds need the whole model in memory.
    """
    modules = select_linears(adapter, config.targets, config.ignore)
    check_pattern_fits(modules, config.n_m)
    if config.finetune_steps and samples is None:
        raise SlimformerError("iterative magnitude pruning with fine-tuning needs calibration samples")
    rounds = 1 if config.n_m else config.rounds  # an N:M pattern is reached in one step
    inside = all(n.startswith(adapter.block_prefix + ".") for n in modules)
    if rounds == 1 and config.scope == "layer" and inside:
        sparsity = _Sparsity()

        def compress(name: str, module: nn.Module) -> None:
            (mask,) = _magnitude_masks({name: module}, config, config.sparsity)
            pm.apply_mask(weight_matrix(module), mask)

        with torch.no_grad():
            BlockRunner(adapter, None, progress=False).run(
                ModuleVisitor(adapter, modules, compress, finish_fn=sparsity.finish, restore_fn=sparsity.restore))
        return sparsity.result(config, rounds=1)
    if stream_of(adapter) is not None:
        raise SlimformerError("magnitude pruning with a global threshold, several rounds or targets outside the "
                              "blocks needs the whole model in memory: drop --max-memory or prune per layer in one round")
    for r in range(1, rounds + 1):
        with torch.no_grad():
            for module, mask in zip(modules.values(), _magnitude_masks(modules, config, config.sparsity * r / rounds)):
                pm.apply_mask(weight_matrix(module), mask)
        if config.finetune_steps:
            from slimformer.methods.recovery import FinetuneConfig, recover

            # between rounds the calibration windows are the training text, passes over them allowed
            round_config = FinetuneConfig(steps=config.finetune_steps, seqlen=min(512, samples.shape[1]), batch_size=1,
                                          lr=1e-4, heldout=0, max_epochs=float("inf"), warmup=0.0)
            recover(adapter, round_config, samples.reshape(1, -1), progress=False)
    return MethodResult(config.method, config_dict(config), layers=sparsity_table(modules),
                        summary={"sparsity": overall_sparsity(modules), "pruned_modules": len(modules), "rounds": rounds})


def _prune_with(config: CalibratedConfig, quantized: dict[str, QuantizedWeight]) -> Callable[[str, nn.Module, InputStats], None]:
    """Wanda's or SparseGPT's change of one module, given the statistics of its inputs."""

    def compress(name: str, module: nn.Module, stats: InputStats) -> None:
        W = weight_matrix(module)
        if isinstance(config, SparseGPTConfig):
            try:
                H, own = stats.use_hessian()
                result = obs_compress(W, H, sparsity=config.sparsity, pattern=config.pattern, scheme=config.scheme(),
                                      blocksize=config.blocksize, percdamp=config.percdamp, own_hessian=own,
                                      own_weight=True)
            except ValueError as e:
                raise SlimformerError(f"{name}: {e}") from None
            W.copy_(result.weight)
            if result.quantized is not None:
                quantized[name] = result.quantized
        else:
            score = pm.wanda_scores(W.float(), stats.sqnorm)
            mask = pm.mask_n_m(score, *config.n_m) if config.n_m else pm.mask_per_row(score, config.sparsity)
            pm.apply_mask(W, mask)

    return compress


def prune_visitor(adapter: Adapter, modules: dict[str, nn.Module], config: CalibratedConfig,
                  quantized: dict[str, QuantizedWeight] | None = None, **finish) -> StatsVisitor:
    """The block visitor of Wanda (input norms) or SparseGPT (input Hessians); joint quantization fills ``quantized``."""
    kind = "hessian" if isinstance(config, SparseGPTConfig) else "sqnorm"
    return StatsVisitor(adapter, modules, (kind,), _prune_with(config, {} if quantized is None else quantized), **finish)


def _calibrated(adapter: Adapter, config: CalibratedConfig, samples: torch.Tensor | None) -> MethodResult:
    """Wanda or SparseGPT: calibrate and prune block by block through the runner."""
    if samples is None or samples.numel() == 0:
        raise SlimformerError(f"{config.method} needs calibration samples; the calibration set is empty")
    modules = select_linears(adapter, config.targets, config.ignore)
    check_pattern_fits(modules, config.n_m)
    scheme = config.scheme() if isinstance(config, SparseGPTConfig) else None
    for name, module in modules.items() if scheme else ():
        try:
            scheme.group_of(weight_matrix(module).shape[1])
        except ValueError as e:
            raise SlimformerError(f"{name}: {e}") from None
    runner = BlockRunner(adapter, samples, batch_size=config.batch_size, device=config.device)
    quantized: dict[str, QuantizedWeight] = {}
    installer = BlockInstaller(adapter, quantized) if scheme else None
    sparsity = _Sparsity(installer)
    visitor = prune_visitor(adapter, modules, config, quantized, finish_fn=sparsity.finish, restore_fn=sparsity.restore)
    with torch.no_grad():
        runner.run(visitor, propagate=config.propagate, desc=config.method)
    result = sparsity.result(config, samples=int(samples.shape[0]), seqlen=int(samples.shape[1]))
    if installer is not None:  # sparsity measured on the float weights, then the packed modules swapped in
        for name, info in installer.layers.items():
            result.layers.setdefault(name, {}).update(info)
        result.summary["quantized_modules"] = installer.totals["modules"]
        result.summary["mean_bits"] = float(config.bits)
        result.summary["scheme"] = config.scheme().describe()
    return result


register(WandaConfig)(_calibrated)
register(SparseGPTConfig)(_calibrated)
