"""Quantized Linear and Embedding modules that run on packed int8/int4 weights, and the per-shape CPU kernel dispatch.

On a CPU, a decode step (one row per sequence) reads every weight once, so its speed is the
speed of memory traffic: PyTorch's weight-only kernels (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) read 1 or ½ byte per weight instead of 4 and are 2.8–4.5×
faster than the float32 matmul here (``benchmarks/results/cpu_kernels.md``). They take
bfloat16 activations; the output is cast back to the model's dtype. A prefill (hundreds of
rows) is compute-bound, and there these kernels are 2–3× *slower* than float32 (and bfloat16
matmuls 7–10× slower on this AVX2 CPU), so inputs with more than ``decode_rows`` rows run the
float32 matmul on weights dequantized for that call. The crossover is measured by
``benchmarks/quantization.py``; :func:`set_decode_rows` changes it.

The int4 kernel's packed layout depends on the CPU's instruction set, so it is made at load
time from the ISA-neutral codes; the checkpoint on disk holds compressed-tensors' int32 packing
(see :mod:`slimformer.models.quant_storage`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from slimformer.models.quantizer import QuantizedWeight, QuantScheme, dequantize

_KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the CPU int4 kernel takes
DECODE_ROWS = 64  # rows up to which the packed kernels run: the crossover measured by benchmarks/quantization.py
_state = {"decode_rows": DECODE_ROWS, "kernels": True}


def set_decode_rows(rows: int) -> None:
    """Inputs with at most ``rows`` rows run on the packed kernels, larger ones on float32 dequantized weights."""
    _state["decode_rows"] = int(rows)


@contextlib.contextmanager
def float_path() -> Iterator[None]:
    """Inside, every quantized module computes in float32 on dequantized weights (exact comparisons, training)."""
    saved = _state["kernels"]
    _state["kernels"] = False
    try:
        yield
    finally:
        _state["kernels"] = saved


def _kernel_group(width: int, group: int) -> int | None:
    """The int4 kernel group size that reproduces groups of ``group`` columns (a divisor of it), or None."""
    return next((g for g in _KERNEL_GROUPS if group % g == 0 and width % g == 0), None)


class QuantizedLinear(nn.Module):
    """A Linear whose weight is int8 or int4 codes with float scales and integer zero points.

    ``codes`` (out × in, int8), ``weight_scale`` and ``weight_zero_point`` (out × groups) are what
    is saved; ``int4_packed``/``int4_scales_zeros`` or ``int8_scales`` are the CPU kernels' view
    of the same numbers, rebuilt at load. ``forward`` takes any float dtype and returns it.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.scheme = qweight.scheme
        self.out_features, self.in_features = qweight.codes.shape
        codes = qweight.codes.to(torch.int8).contiguous()
        # Codes read from a safetensors file can start at any byte; the int8 kernel's AVX-512 path
        # reads them with aligned loads and crashes on a start 8 bytes past a 16-byte boundary.
        # A fresh tensor starts where torch's allocator puts it, on a 64-byte boundary.
        self.register_buffer("codes", codes.clone() if codes.data_ptr() % 64 else codes)
        self.register_buffer("weight_scale", qweight.scale.float().contiguous())
        self.register_buffer("weight_zero_point", qweight.zero.to(torch.int8).contiguous())
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.has_zero = bool(self.weight_zero_point.any())
        self.kernel = self._pack_for_cpu()

    @property
    def group(self) -> int:
        """Input columns per scale."""
        return self.in_features // self.weight_scale.shape[1]

    def quantized_weight(self) -> QuantizedWeight:
        """Codes, scales and zero points as a :class:`QuantizedWeight`."""
        return QuantizedWeight(self.codes, self.weight_scale, self.weight_zero_point, self.scheme)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (out × in) these codes stand for."""
        return dequantize(self.codes, self.weight_scale, self.weight_zero_point).to(dtype)

    def _pack_for_cpu(self) -> str | None:
        """Build the weight-only kernel's layout; returns its name, or None where no kernel fits."""
        bits, group, zero = self.scheme.bits, self.group, self.weight_zero_point.float()
        if bits == 8 and group == self.in_features:
            # x·((c - z)·s)ᵀ = (x·cᵀ)·s - (Σx)·(z·s): the zero point becomes a per-row term
            self.register_buffer("int8_scales", self.weight_scale[:, 0].to(torch.bfloat16), persistent=False)
            self.register_buffer("int8_offsets", zero[:, 0] * self.weight_scale[:, 0], persistent=False)
            return "int8"
        kernel_group = _kernel_group(self.in_features, group) if bits == 4 else None
        if kernel_group is None or self.codes.device.type != "cpu":
            return None
        unsigned = (self.codes.to(torch.int32) + 8).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        repeat = group // kernel_group
        scale = self.weight_scale.repeat_interleave(repeat, dim=1)  # (out, in / kernel_group)
        offset = -zero.repeat_interleave(repeat, dim=1) * scale  # the kernel computes (u - 8)·scale + offset
        scales_zeros = torch.stack([scale.T, offset.T], dim=-1).to(torch.bfloat16).contiguous()
        self.register_buffer("int4_packed", packed, persistent=False)
        self.register_buffer("int4_scales_zeros", scales_zeros, persistent=False)
        self.kernel_group = kernel_group
        return "int4"

    def _apply(self, fn, recurse=True):
        """Move or cast as nn.Module does, then keep the int4 kernel's view with the codes: dropped
        off the CPU (only the CPU kernel reads it) and rebuilt on the way back, so a model quantized
        or trained on a GPU decodes on the CPU kernel once it is moved there."""
        super()._apply(fn, recurse)
        if self.scheme.bits == 4 and (self.codes.device.type == "cpu") != (self.kernel == "int4"):
            for name in ("int4_packed", "int4_scales_zeros"):
                self._buffers.pop(name, None)
            self.kernel = self._pack_for_cpu()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.kernel and _state["kernels"] and rows <= _state["decode_rows"] and x.device.type == "cpu":
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            if self.kernel == "int8":
                out = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.int8_scales).to(x.dtype)
                if self.has_zero:
                    out = out - flat.to(x.dtype).sum(-1, keepdim=True) * self.int8_offsets.to(x.dtype)
            else:
                out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.int4_packed, self.kernel_group,
                                                                 self.int4_scales_zeros).to(x.dtype)
            out = out.reshape(*x.shape[:-1], self.out_features)
            return out + self.bias.to(x.dtype) if self.bias is not None else out
        return nn.functional.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}, kernel={self.kernel}"


class QuantizedEmbedding(nn.Module):
    """An Embedding whose table is int8/int4 codes with per-row (or per-group) scales; rows are dequantized on lookup."""

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.scheme = qweight.scheme
        # Gemma's embedding multiplies its rows by sqrt(hidden) inside the module: kept, not saved
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)
        self.num_embeddings, self.embedding_dim = qweight.codes.shape
        self.padding_idx = padding_idx
        self.register_buffer("codes", qweight.codes.to(torch.int8).contiguous())
        self.register_buffer("weight_scale", qweight.scale.float().contiguous())
        self.register_buffer("weight_zero_point", qweight.zero.to(torch.int8).contiguous())

    def quantized_weight(self) -> QuantizedWeight:
        """Codes, scales and zero points as a :class:`QuantizedWeight`."""
        return QuantizedWeight(self.codes, self.weight_scale, self.weight_zero_point, self.scheme)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float table."""
        return dequantize(self.codes, self.weight_scale, self.weight_zero_point).to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize(self.codes[flat], self.weight_scale[flat], self.weight_zero_point[flat])
        rows = rows if self.embed_scale is None else rows * self.embed_scale.float()
        return rows.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme.describe()}"


QUANTIZED_TYPES = (QuantizedLinear, QuantizedEmbedding)


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every quantized module of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANTIZED_TYPES)}


def is_quantized(model: nn.Module) -> bool:
    """Whether any module of ``model`` holds quantized weights."""
    return any(isinstance(m, QUANTIZED_TYPES) for m in model.modules())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module called ``name`` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_module_for(module: nn.Module, qweight: QuantizedWeight) -> nn.Module:
    """The quantized stand-in of a Linear, GPT-2 Conv1D or Embedding with ``qweight`` as its weight."""
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(qweight, module.padding_idx, getattr(module, "embed_scale", None))
    bias = getattr(module, "bias", None)
    return QuantizedLinear(qweight, bias.data if bias is not None else None)


def install(model: nn.Module, weights: dict[str, QuantizedWeight]) -> None:
    """Swap each named module of ``model`` for its quantized stand-in; a tied head keeps sharing with the embedding."""
    for name, qweight in weights.items():
        old = model.get_submodule(name)
        new = quantized_module_for(old, qweight)
        where = next((t.device for t in [*old.parameters(), *old.buffers()] if not t.is_meta), None)
        if where is not None and where != qweight.codes.device:  # codes made on an accelerator, for a model back on the CPU
            new = new.to(where)
        replace_module(model, name, new)
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, QuantizedLinear) and not isinstance(embed, QuantizedEmbedding):
        return
    # A tied pair with a quantized side is two modules from now on: transformers ties only float weights.
    config.tie_word_embeddings = False
    if getattr(config, "get_text_config", None):
        config.get_text_config().tie_word_embeddings = False
    if isinstance(head, QuantizedLinear) and isinstance(embed, QuantizedEmbedding) and \
            head.scheme == embed.scheme and torch.equal(head.codes, embed.codes):
        embed.codes, embed.weight_scale, embed.weight_zero_point = head.codes, head.weight_scale, head.weight_zero_point


def dequantize_model(model: nn.Module) -> None:
    """Replace every quantized module by a float Linear / Embedding holding its dequantized weight (for training)."""
    for name, module in quantized_modules(model).items():
        W = module.dequantized()
        if isinstance(module, QuantizedEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                               device=W.device)
        else:
            new = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=W.device)
            if module.bias is not None:
                new.bias.data.copy_(module.bias)
        new.weight.data.copy_(W)
        replace_module(model, name, new)


def scheme_summary(model: nn.Module) -> dict[str, dict]:
    """Bits, group size, symmetry and shape of every quantized module, by name."""
    return {n: {"bits": m.scheme.bits, "group_size": m.scheme.group_size, "symmetric": m.scheme.symmetric,
                "shape": list(m.codes.shape)} for n, m in quantized_modules(model).items()}


__all__ = ["DECODE_ROWS", "QuantScheme", "QuantizedEmbedding", "QuantizedLinear", "dequantize_model", "float_path",
           "install", "is_quantized", "quantized_module_for", "quantized_modules", "replace_module", "scheme_summary",
           "set_decode_rows"]
