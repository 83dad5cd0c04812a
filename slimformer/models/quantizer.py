"""Pure integer quantization maths shared by RTN, GPTQ, AWQ and the packed runtime: scales, zero points, codes, packing.

Conventions, identical to compressed-tensors (so a checkpoint maps one to one onto its format):
codes are signed, in ``[-2^(b-1), 2^(b-1) - 1]`` (int4: ``[-8, 7]``), and a weight is
``(code - zero) · scale``. Symmetric schemes have ``zero = 0`` and ``scale = max|w| / ((2^b - 1) / 2)``
(int4: ``max|w| / 7.5``, the GPTQ reference's ``maxq = 15`` with its zero point ``8`` shifted to
signed codes); asymmetric schemes have ``scale = (max - min) / (2^b - 1)`` over a range that
includes 0, and an integer zero point, so a weight of exactly 0 stays exactly 0 after
quantization (a pruned model keeps every zero). Scales are per output row (``group_size``
``None``: one per channel) or per group of ``group_size`` consecutive input columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class QuantScheme:
    """Bits, group size (``None``: per output channel) and symmetry of a weight quantization."""

    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, not {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be positive, not {self.group_size}")

    @property
    def qmin(self) -> int:
        """The smallest code (signed)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """The largest code (signed)."""
        return (1 << (self.bits - 1)) - 1

    def group_of(self, width: int) -> int:
        """Columns per scale for a layer of ``width`` inputs; a group size that does not divide it is an error."""
        if self.group_size is None:
            return width
        if width % self.group_size:
            raise ValueError(f"group size {self.group_size} does not divide the input width {width}")
        return self.group_size

    def describe(self) -> str:
        """A short name such as ``int4 g64 sym`` or ``int8 per-channel sym``."""
        group = f"g{self.group_size}" if self.group_size else "per-channel"
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'}"


@dataclass
class QuantizedWeight:
    """A weight as signed ``codes`` (rows × cols, int8), ``scale`` and integer ``zero`` (rows × groups), and its scheme."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    scheme: QuantScheme

    @property
    def group(self) -> int:
        """Input columns per scale."""
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(codes - zero) · scale``."""
        return dequantize(self.codes, self.scale, self.zero).to(dtype)


def qparams(w: torch.Tensor, scheme: QuantScheme, shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w`` (rows × n), over a range shrunk by ``shrink`` (clipping).

    Returns float32 ``(rows,)`` scales and float32 ``(rows,)`` integer-valued zero points.
    """
    w = w.float()
    levels = float(scheme.qmax - scheme.qmin)
    if scheme.symmetric:
        scale = _half(torch.maximum(w.amax(1), -w.amin(1)) * shrink / (levels / 2))  # max |w|, no |w| copy
        zero = torch.zeros_like(scale)
    else:
        lo = w.amin(1).clamp(max=0) * shrink
        hi = w.amax(1).clamp(min=0) * shrink
        scale = _half((hi - lo) / levels)
        zero = (scheme.qmin - torch.round(lo / scale)).clamp(scheme.qmin, scheme.qmax)
    return scale, zero


def _half(scale: torch.Tensor) -> torch.Tensor:
    """Scales rounded to float16 values (kept in float32), positive.

    Float16 is how GGUF blocks and half-precision checkpoints store a scale; codes computed against
    the rounded scale make those formats hold exactly what was computed. An all-zero row (or one
    below float16's range) gets scale 1, which reproduces its zeros.
    """
    scale = scale.to(torch.float16).float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Signed codes ``clamp(round(w / scale) + zero)`` of ``w`` (rows × n) with per-row ``scale``/``zero`` (rows,)."""
    q = torch.round(w.float() / scale[:, None]) + zero[:, None]
    return q.clamp_(scheme.qmin, scheme.qmax)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``w`` (rows × n) rounded to its grid: ``(quantize(w) - zero) · scale``, in float32."""
    return (quantize(w, scale, zero, scheme) - zero[:, None]) * scale[:, None]


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The float32 weight of ``codes`` (rows × cols) with ``scale``/``zero`` (rows × groups), groups of equal width."""
    rows, cols = codes.shape
    groups = scale.shape[1]
    c = codes.view(rows, groups, cols // groups)
    if not zero.any():  # symmetric: one fused int8 × float32 pass
        return (c * scale.float()[..., None]).view(rows, cols)
    return ((c.to(torch.int16) - zero[..., None]) * scale.float()[..., None]).view(rows, cols)  # int8 - int8 would wrap


def search_shrink(w: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.8,
                  norm: float = 2.4) -> torch.Tensor:
    """Per-row range shrink in ``[1 - max_shrink, 1]`` that minimises ``Σ|w - fq(w)|^norm`` (the GPTQ quantizer's MSE search)."""
    best = torch.full((w.shape[0],), float("inf"), device=w.device)
    best_shrink = torch.ones(w.shape[0], device=w.device)
    w = w.float()
    for i in range(int(max_shrink * grid) + 1):
        p = 1 - i / grid
        scale, zero = qparams(w, scheme, p)
        err = (fake_quantize(w, scale, zero, scheme) - w).abs().pow(norm).sum(1)
        better = err < best
        best = torch.where(better, err, best)
        best_shrink = torch.where(better, torch.full_like(best_shrink, p), best_shrink)
    return best_shrink


def group_params(w: torch.Tensor, scheme: QuantScheme, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (rows × groups) of a whole weight, each group's range optionally MSE-clipped."""
    rows, cols = w.shape
    g = scheme.group_of(cols)
    flat = w.float().reshape(rows * (cols // g), g)  # one row per (row, group)
    shrink = search_shrink(flat, scheme) if mse else 1.0
    scale, zero = qparams(flat, scheme, shrink)
    return scale.view(rows, cols // g), zero.view(rows, cols // g)


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, mse: bool = False) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight (rows × cols): codes, scales and zero points."""
    rows, cols = w.shape
    scale, zero = group_params(w, scheme, mse)
    g = cols // scale.shape[1]
    flat = w.float().reshape(-1, g)
    codes = quantize(flat, scale.reshape(-1), zero.reshape(-1), scheme).view(rows, cols)
    return QuantizedWeight(codes.to(torch.int8), scale, zero.to(torch.int8), scheme)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows × cols, int8) densely packed into int32 words along each row (compressed-tensors' layout)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(codes.to(torch.int8), bits)


def unpack(packed: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The signed int8 codes of ``shape`` back from :func:`pack`'s int32 words."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, bits, torch.Size(shape)).to(torch.int8)
