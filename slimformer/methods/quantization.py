"""Weight-only quantization as the papers define it: round-to-nearest (RTN), GPTQ and AWQ, int8 / int4, per channel or group-wise.

All three share the pure quantizer of :mod:`slimformer.models.quantizer`; GPTQ shares the OBS
column loop and the Hessian statistics with SparseGPT (:mod:`slimformer.methods.obs`,
:mod:`slimformer.methods.statistics`); GPTQ and AWQ observe calibration inputs through the
one block runner. While a method runs, each quantized weight is written back in float (its
exact dequantized values), so later blocks see what the quantized model computes; at the end
every quantized projection is swapped for a :class:`~slimformer.models.quantized.QuantizedLinear`
that runs on packed int8/int4 kernels, and ``save_model`` writes a compressed-tensors checkpoint.

A weight that is exactly zero stays zero (its code is the zero point), and GPTQ treats it as
pruned: quantizing a pruned model keeps its sparsity and its N:M pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimformer.calibration import BlockRunner
from slimformer.errors import SlimformerError
from slimformer.methods.base import CalibratedFields, MethodResult, config_dict, register, select_linears
from slimformer.methods.obs import obs_compress
from slimformer.methods.statistics import InputStats, ModuleVisitor, StatsVisitor
from slimformer.models.adapters import Adapter, weight_matrix
from slimformer.models.quantized import install, scheme_summary
from slimformer.models.streaming import ensure_loaded
from slimformer.models.quantizer import BITS, QuantizedWeight, QuantScheme, fake_quantize, qparams, quantize_weight

AUTO_GROUPS = (128, 64, 32)  # group sizes tried, in order, when none is given for 2/3/4 bits


@dataclass(frozen=True)
class QuantConfig:
    """Fields every weight quantization method has.

    ``group_size``: columns per scale; ``None`` picks per channel for 8 bits and, for fewer bits,
    the largest of 128, 64, 32 that divides every quantized layer's width; ``-1`` is per channel.
    ``head``/``embedding`` also quantize ``lm_head`` / the input embedding, per row, to
    ``head_bits`` (round to nearest; a tied pair shares one table of codes).
    """

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    mse: bool = False
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    head: bool = False
    embedding: bool = False
    head_bits: int = 8

    def __post_init__(self):
        for name in ("bits", "head_bits"):
            if getattr(self, name) not in BITS:
                raise SlimformerError(f"{name.replace('_', ' ')} must be one of {', '.join(map(str, BITS))}, "
                                      f"not {getattr(self, name)}")
        if self.group_size is not None and self.group_size != -1 and self.group_size < 1:
            raise SlimformerError(f"group size must be positive, -1 (per channel) or unset, not {self.group_size}")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))

    def scheme_for(self, widths: list[int]) -> QuantScheme:
        """The scheme of the block projections, given their input widths; a group size that does not divide one fails."""
        group = self.group_size
        if group is None:
            group = -1 if self.bits == 8 else next((g for g in AUTO_GROUPS if all(w % g == 0 for w in widths)), -1)
        for w in widths:
            if group != -1 and w % group:
                fits = [g for g in (16, 32, 64, 128, 256) if all(v % g == 0 for v in widths)]
                raise SlimformerError(f"group size {group} does not divide the input width {w}; "
                                      f"sizes that fit: {', '.join(map(str, fits)) or 'none (use -1, per channel)'}")
        return QuantScheme(self.bits, None if group == -1 else group, self.symmetric)


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Round to nearest: each weight to its closest grid point, scales from each row's (or group's) range.

    ``mse`` shrinks each range to the clipping that minimises the rounding error (the GPTQ
    quantizer's grid search). YAML: ``{method: rtn, bits: 8}``
    """

    method: ClassVar[str] = "rtn"
    needs_samples: ClassVar[bool] = False


@dataclass(frozen=True)
class CalibratedQuantConfig(CalibratedFields, QuantConfig):
    """Fields of the quantization methods that read calibration data through the block runner."""

    def __post_init__(self):
        super().__post_init__()
        self.check_propagate()


@dataclass(frozen=True)
class GPTQConfig(CalibratedQuantConfig):
    """GPTQ (Frantar et al. 2022, arXiv:2210.17323): column-by-column rounding with OBS error feedback.

    ``act_order`` (default on, as llm-compressor's ``actorder: static``) takes columns by decreasing
    Hessian diagonal (the reference's ``desc_act``) and implies ``static_groups``: group scales from
    the unquantized weight, so the codes keep their original column order. On SmolLM2 int4 g64 it
    is what makes GPTQ beat round-to-nearest (8 × 512 calibration tokens, 4 test windows: RTN 34.6,
    GPTQ 34.2 without it, 32.5 with it). ``propagate: sequential`` is the reference's true-sequential order.
    YAML: ``{method: gptq, bits: 4, group_size: 64, act_order: false}``
    """

    method: ClassVar[str] = "gptq"
    blocksize: int = 128
    percdamp: float = 0.01
    act_order: bool = True
    static_groups: bool = False


@dataclass(frozen=True)
class AWQConfig(CalibratedQuantConfig):
    """AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware per-channel scales, then RTN or GPTQ.

    For each pair the family names (a norm or projection → the projections it feeds), the scale
    ``s = mean|x|^α`` (normalised by ``sqrt(max · min)``) with α on a grid of ``grid`` points in
    [0, 1) that minimises the pair's output error after quantization is folded into the pair, so
    the float function is unchanged. With ``clip``, each group's range is then shrunk to the
    value that minimises its output error on ``clip_rows`` input rows (not for q/k, as in the
    reference). ``then: gptq`` quantizes the scaled weights with GPTQ instead of RTN.
    Deviation: the reference measures a pair's error at the output of the module around it
    (attention, MLP); here it is the summed output error of the pair's projections, which needs
    no second run of the block.
    YAML: ``{method: awq, bits: 4, group_size: 64}``
    """

    method: ClassVar[str] = "awq"
    propagate: str = "dense"
    grid: int = 20
    clip: bool = True
    max_rows: int = 4096
    clip_rows: int = 512
    then: str = "rtn"
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.then not in ("rtn", "gptq"):
            raise SlimformerError(f"awq then must be 'rtn' or 'gptq', not '{self.then}'")
        if self.propagate == "sequential":
            raise SlimformerError("awq searches scales for a whole block at once: propagate 'dense' or 'compressed'")


# -- shared steps ------------------------------------------------------------------------------------
def _write_back(module: nn.Module, qweight: QuantizedWeight) -> None:
    """The dequantized values into the float weight, so the rest of the calibration sees them."""
    W = weight_matrix(module)
    W.copy_(qweight.dequantize(W.dtype))


def _head_and_embedding(adapter: Adapter, config: QuantConfig) -> dict[str, QuantizedWeight]:
    """RTN, per row, of ``lm_head`` and/or the input embedding (one table when they are tied)."""
    out: dict[str, QuantizedWeight] = {}
    ensure_loaded(adapter, adapter.head if config.head else None)
    ensure_loaded(adapter, adapter.model.get_input_embeddings() if config.embedding else None)
    scheme = QuantScheme(config.head_bits, None, config.symmetric)
    model = adapter.model
    names = {m: n for n, m in model.named_modules()}
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if config.head and head is not None:
        out[names[head]] = quantize_weight(weight_matrix(head), scheme, config.mse)
    if config.embedding and embed is not None:
        tied = head is not None and config.head and head.weight.data_ptr() == embed.weight.data_ptr()
        out[names[embed]] = out[names[head]] if tied else quantize_weight(embed.weight.data, scheme, config.mse)
    return out


def _modules(adapter: Adapter, config: QuantConfig) -> tuple[dict[str, nn.Module], QuantScheme]:
    modules = select_linears(adapter, config.targets, config.ignore)
    try:
        return modules, config.scheme_for([weight_matrix(m).shape[1] for m in modules.values()])
    except ValueError as e:
        raise SlimformerError(str(e)) from None


def _counts(weights: list[QuantizedWeight]) -> dict[str, int]:
    """Weights, weight bits and codes equal to their zero point, over distinct quantized weights."""
    unique = list({id(q): q for q in weights}.values())  # a tied head and embedding share one table
    return {"params": sum(q.codes.numel() for q in unique),
            "bits": sum(q.codes.numel() * q.scheme.bits for q in unique),
            "zeros": sum(int((q.codes == q.zero.repeat_interleave(q.group, 1)).sum()) for q in unique)}


class BlockInstaller:
    """Swaps a finished block's quantized weights into the model and keeps only their counts.

    So the codes of one block at a time are held besides the model (a streamed run writes the
    block and drops it), and the method's summary is summed block by block.
    """

    def __init__(self, adapter: Adapter, weights: dict[str, QuantizedWeight]):
        self.adapter, self.weights = adapter, weights
        self.layers: dict[str, dict] = {}
        self.totals = {"params": 0, "bits": 0, "zeros": 0, "modules": 0}

    def finish(self, index: int, modules: dict[str, nn.Module]) -> dict:
        """Install block ``index``'s quantized weights; its record (layers and counts)."""
        mine = {n: self.weights.pop(n) for n in modules if n in self.weights}
        install(self.adapter.model, mine)
        record = {"layers": {n: info for n, info in scheme_summary(self.adapter.model).items() if n in mine},
                  "counts": {**_counts(list(mine.values())), "modules": len(mine)}}
        self.restore(index, record)
        return record

    def restore(self, index: int, record: dict) -> None:
        """Add a finished block's record to the totals."""
        self.layers.update(record["layers"])
        for k, v in record["counts"].items():
            self.totals[k] += v


def _finish(adapter: Adapter, config, installer: BlockInstaller, **summary) -> MethodResult:
    """Swap in the head and embedding and whatever is left, and describe what was quantized."""
    rest = {**installer.weights, **_head_and_embedding(adapter, config)}
    install(adapter.model, rest)
    layers = {**installer.layers, **{n: i for n, i in scheme_summary(adapter.model).items() if n in rest}}
    counts = _counts(list(rest.values()))
    total = {k: installer.totals[k] + counts[k] for k in counts}
    params = total["params"]
    return MethodResult(config.method, config_dict(config), layers=layers,
                        summary={"quantized_modules": installer.totals["modules"] + len(rest), "quantized_params": params,
                                 "mean_bits": total["bits"] / max(params, 1), "zero_fraction": total["zeros"] / max(params, 1),
                                 **summary})


def _visitor(cls, adapter: Adapter, modules: dict[str, nn.Module], installer: BlockInstaller, *args, **kwargs):
    """A block visitor over ``modules`` whose finished blocks go through ``installer``."""
    return cls(adapter, modules, *args, finish_fn=installer.finish, restore_fn=installer.restore, **kwargs)


# -- RTN -----------------------------------------------------------------------------------------------
@register(RTNConfig)
def rtn(adapter: Adapter, config: RTNConfig, samples: torch.Tensor | None = None) -> MethodResult:
    """Round every selected weight to nearest on its scheme's grid, block by block (no calibration pass)."""
    modules, scheme = _modules(adapter, config)
    weights: dict[str, QuantizedWeight] = {}
    installer = BlockInstaller(adapter, weights)

    def compress(name: str, module: nn.Module) -> None:
        weights[name] = quantize_weight(weight_matrix(module), scheme, config.mse)
        _write_back(module, weights[name])

    outside = {n: m for n, m in modules.items() if not n.startswith(adapter.block_prefix + ".")}
    with torch.no_grad():
        BlockRunner(adapter, None, progress=False).run(_visitor(ModuleVisitor, adapter, modules, installer, compress))
        for name, module in outside.items():  # targets named outside the blocks
            compress(name, module)
    return _finish(adapter, config, installer, scheme=scheme.describe())


# -- GPTQ ----------------------------------------------------------------------------------------------
def _gptq_weight(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme, config, own: bool = False) -> QuantizedWeight:
    result = obs_compress(W, H, scheme=scheme, blocksize=config.blocksize, percdamp=config.percdamp,
                          act_order=getattr(config, "act_order", False),
                          static_groups=getattr(config, "static_groups", False), mse=config.mse, keep_zeros=True,
                          own_hessian=own, own_weight=True)  # W is overwritten by the result right after
    return result.quantized


def _calibrated_run(adapter: Adapter, config, samples: torch.Tensor | None, visitor: StatsVisitor) -> None:
    if samples is None or samples.numel() == 0:
        raise SlimformerError(f"{config.method} needs calibration samples; the calibration set is empty")
    runner = BlockRunner(adapter, samples, batch_size=config.batch_size, device=config.device)
    with torch.no_grad():
        runner.run(visitor, propagate=config.propagate, desc=config.method)


@register(GPTQConfig)
def gptq(adapter: Adapter, config: GPTQConfig, samples: torch.Tensor | None = None) -> MethodResult:
    """GPTQ every selected projection, block by block, with the Hessian of its calibration inputs."""
    modules, scheme = _modules(adapter, config)
    weights: dict[str, QuantizedWeight] = {}
    installer = BlockInstaller(adapter, weights)

    def compress(name: str, module: nn.Module, stats: InputStats) -> None:
        W = weight_matrix(module)
        H, own = stats.use_hessian()
        weights[name] = _gptq_weight(W, H, scheme, config, own=own)
        _write_back(module, weights[name])

    _calibrated_run(adapter, config, samples, _visitor(StatsVisitor, adapter, modules, installer, ("hessian",), compress))
    return _finish(adapter, config, installer, scheme=scheme.describe(), samples=int(samples.shape[0]),
                   seqlen=int(samples.shape[1]))


# -- AWQ -----------------------------------------------------------------------------------------------
def _rtn_error(W: torch.Tensor, x: torch.Tensor, scheme: QuantScheme) -> float:
    """Summed squared output error ``‖x·(Q(W) - W)ᵀ‖²`` of RTN on ``x`` (tokens × in)."""
    q = quantize_weight(W, scheme).dequantize()
    return float(((x @ (q - W).T) ** 2).sum())


def search_scale(weights: list[torch.Tensor], x: torch.Tensor, absmean: torch.Tensor, scheme: QuantScheme,
                 grid: int = 20) -> tuple[torch.Tensor, float]:
    """AWQ's grid search: the per-input-channel scale ``s`` minimising Σ ‖Q(W·diag(s))·(x/s) − W·x‖² over ``weights``.

    ``x`` holds input rows (tokens × in), ``absmean`` the mean ``|x|`` per channel over all
    calibration tokens. Returns the best scale (α = 0 gives all ones) and the α chosen.
    """
    best, best_alpha, best_s = float("inf"), 0.0, torch.ones_like(absmean)
    ref = [x @ W.T for W in weights]
    for i in range(grid):
        alpha = i / grid
        s = absmean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for W, r in zip(weights, ref):
            q = quantize_weight(W * s, scheme).dequantize() / s
            err += float(((x @ q.T - r) ** 2).sum())
        if err < best:
            best, best_alpha, best_s = err, alpha, s
    return best_s, best_alpha


def search_clip(W: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's clipping search: the per-(row, group) range shrink minimising the group's output error on ``x``.

    Returns the shrink factors (rows × groups) in ``[1 - max_shrink, 1]``.
    """
    rows, cols = W.shape
    g = scheme.group_of(cols)
    groups = cols // g
    xg = x.view(x.shape[0], groups, g)
    Wg = W.float().view(rows, groups, g)
    ref = torch.einsum("tgc,rgc->rgt", xg, Wg)
    best = torch.full((rows, groups), float("inf"))
    shrink = torch.ones(rows, groups)
    flat = Wg.reshape(-1, g)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = qparams(flat, scheme, p)
        q = fake_quantize(flat, scale, zero, scheme).view(rows, groups, g)
        err = ((torch.einsum("tgc,rgc->rgt", xg, q) - ref) ** 2).mean(-1)
        better = err < best
        best = torch.where(better, err, best)
        shrink = torch.where(better, torch.full_like(shrink, p), shrink)
    return shrink


def _fold(prev: nn.Module, prev_is_norm: bool, offset: float, targets: list[nn.Module], s: torch.Tensor) -> None:
    """Divide ``prev``'s output by ``s`` and multiply the targets' input columns by it: the float function is unchanged."""
    if prev_is_norm:
        w = prev.weight.data
        w.copy_((offset + w.float()) / s - offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s)
    else:
        weight_matrix(prev).div_(s[:, None])
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s)
    for t in targets:
        weight_matrix(t).mul_(s[None, :])


class _AWQBlock:
    """AWQ for one block: search and fold the scales of every pair, then quantize each projection."""

    def __init__(self, adapter: Adapter, config: AWQConfig, scheme: QuantScheme, modules: dict[str, nn.Module]):
        self.adapter, self.config, self.scheme, self.modules = adapter, config, scheme, modules
        self.weights: dict[str, QuantizedWeight] = {}
        self.alphas: dict[str, float] = {}
        self.block: int | None = None
        self.in_scale: dict[str, torch.Tensor] = {}

    def _pairs(self, index: int, stats: dict[str, InputStats]) -> None:
        """Search and fold every pair of block ``index``; remember each projection's input scale."""
        block = self.adapter.blocks[index]
        roles = self.adapter.linears(block)
        prefix = f"{self.adapter.block_prefix}.{index}."
        name_of = {id(m): n for n, m in self.modules.items()}
        self.in_scale = {}
        for prev_path, target_roles in self.adapter.family.scale_pairs:
            targets = [roles[r] for r in target_roles if id(roles[r]) in name_of]
            if len(targets) != len(target_roles):
                continue  # a projection of the pair is not quantized: scaling would only move error around
            prev_is_norm = prev_path not in roles
            prev = block.get_submodule(prev_path) if prev_is_norm else roles[prev_path]
            width = weight_matrix(targets[0]).shape[1]
            out_width = prev.weight.shape[0] if prev_is_norm else weight_matrix(prev).shape[0]
            if out_width != width or (prev_is_norm and prev.weight.ndim != 1):
                continue  # v → o under grouped-query attention: the shapes do not line up
            st = stats[name_of[id(targets[0])]]
            x = st.sample().to(weight_matrix(targets[0]).dtype)
            s, alpha = search_scale([weight_matrix(t).float() for t in targets], x.float(), st.absmean(), self.scheme,
                                    self.config.grid)
            _fold(prev, prev_is_norm, self.adapter.family.norm_offset, targets, s)
            for t in targets:
                self.in_scale[name_of[id(t)]] = s
            self.alphas[f"{prefix}{prev_path}"] = alpha

    def compress(self, name: str, module: nn.Module, stats: InputStats, all_stats: dict[str, InputStats]) -> None:
        index = int(name[len(self.adapter.block_prefix) + 1 :].split(".")[0])
        if self.block != index:
            self.block = index
            self._pairs(index, all_stats)
        W = weight_matrix(module)
        s = self.in_scale.get(name)
        x = stats.sample().float()
        if s is not None:
            x = x / s
        if self.config.clip and not name.endswith(("q_proj", "k_proj", "query", "key", "c_attn")):
            shrink = search_clip(W.float(), x[: self.config.clip_rows], self.scheme)
            self._clamp(W, shrink)
        if self.config.then == "gptq":
            H, own = stats.use_hessian()
            if s is not None:
                H, own = H / s[:, None] / s[None, :], True
            self.weights[name] = _gptq_weight(W, H, self.scheme, self.config, own=own)
        else:
            self.weights[name] = quantize_weight(W, self.scheme)
        _write_back(module, self.weights[name])

    def _clamp(self, W: torch.Tensor, shrink: torch.Tensor) -> None:
        """Clip each group of W to its shrunk range, so RTN's min-max scales follow the search."""
        rows, cols = W.shape
        groups = shrink.shape[1]
        Wg = W.view(rows, groups, cols // groups)
        if self.scheme.symmetric:
            hi = Wg.abs().amax(-1) * shrink
            lo = -hi
        else:
            hi, lo = Wg.amax(-1).clamp(min=0) * shrink, Wg.amin(-1).clamp(max=0) * shrink
        Wg.copy_(torch.maximum(torch.minimum(Wg, hi[..., None]), lo[..., None]))


class _AWQInstaller(BlockInstaller):
    """A :class:`BlockInstaller` whose block records also hold the block's searched α, so a resumed run reports them all."""

    def __init__(self, adapter: Adapter, weights: dict[str, QuantizedWeight], state: _AWQBlock):
        super().__init__(adapter, weights)
        self.state = state

    def finish(self, index: int, modules: dict[str, nn.Module]) -> dict:
        """Install block ``index``'s weights; its record with its α per scaled pair."""
        record = super().finish(index, modules)
        prefix = f"{self.adapter.block_prefix}.{index}."
        record["alphas"] = {k: v for k, v in self.state.alphas.items() if k.startswith(prefix)}
        return record

    def restore(self, index: int, record: dict) -> None:
        """Add a finished block's record to the totals and its α to the method's."""
        super().restore(index, record)
        self.state.alphas.update(record.get("alphas", {}))


@register(AWQConfig)
def awq(adapter: Adapter, config: AWQConfig, samples: torch.Tensor | None = None) -> MethodResult:
    """AWQ every selected projection: scales searched on calibration activations and folded, then RTN or GPTQ."""
    modules, scheme = _modules(adapter, config)
    state = _AWQBlock(adapter, config, scheme, modules)
    kinds = ("absmean", "rows") + (("hessian",) if config.then == "gptq" else ())
    tokens = samples.numel() if samples is not None else 1
    installer = _AWQInstaller(adapter, state.weights, state)
    visitor = _visitor(StatsVisitor, adapter, modules, installer, kinds,
                       lambda n, m, st: state.compress(n, m, st, visitor.stats),
                       max_rows=config.max_rows, stride=max(1, tokens // config.max_rows))
    _calibrated_run(adapter, config, samples, visitor)
    return _finish(adapter, config, installer, scheme=scheme.describe(), alphas=state.alphas,
                   samples=int(samples.shape[0]), seqlen=int(samples.shape[1]))
