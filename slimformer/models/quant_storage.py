"""Quantized checkpoints in the compressed-tensors format that vLLM, llm-compressor and ``transformers`` read.

Per quantized module ``NAME``: int4 (and 2/3-bit) weights are ``pack-quantized`` —
``NAME.weight_packed`` (int32, codes densely packed along each row), ``NAME.weight_scale``
(out × groups), ``NAME.weight_shape`` and, when asymmetric, ``NAME.weight_zero_point`` (packed
along the output dimension); int8 weights are ``int-quantized`` — ``NAME.weight`` (int8),
``NAME.weight_scale`` and, when asymmetric, ``NAME.weight_zero_point``. ``config.json`` carries
the ``quantization_config`` llm-compressor writes (``quant_method: compressed-tensors``, one
config group per scheme listing its modules, ``format`` per group or for all,
``quantization_status: compressed``). A quantized head of a tied model is saved untied.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimformer.errors import SlimformerError
from slimformer.models.quantized import QuantizedEmbedding, install, quantized_modules
from slimformer.models.sparse_storage import fill
from slimformer.models.quantizer import QuantizedWeight, QuantScheme, pack, unpack

_PACKED, _INT = "pack-quantized", "int-quantized"
_ZERO_BITS_DTYPE = torch.int8


def is_quantized_checkpoint(config) -> bool:
    """Whether a config describes a compressed-tensors weight-quantized checkpoint."""
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return qc.get("quant_method") == "compressed-tensors" and bool(qc.get("config_groups"))


def _format(scheme: QuantScheme) -> str:
    return _INT if scheme.bits == 8 else _PACKED


def module_tensors(name: str, qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized module (scales in the model's float ``dtype``)."""
    s = qweight.scheme
    out = {f"{name}.weight_scale": qweight.scale.to(dtype).contiguous()}
    zero = None if s.symmetric else qweight.zero.to(_ZERO_BITS_DTYPE)
    if _format(s) == _INT:
        out[f"{name}.weight"] = qweight.codes.to(torch.int8).contiguous()
        if zero is not None:
            out[f"{name}.weight_zero_point"] = zero.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack(qweight.codes, s.bits)
        out[f"{name}.weight_shape"] = torch.tensor(list(qweight.codes.shape), dtype=torch.int64)
        if zero is not None:
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

            out[f"{name}.weight_zero_point"] = pack_to_int32(zero, s.bits, packed_dim=0).contiguous()
    return out


def quantization_config(modules: dict[str, nn.Module], ignore: list[str]) -> dict:
    """The ``quantization_config`` of ``config.json``: one group per scheme, its modules listed by name."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_scheme: dict[QuantScheme, list[str]] = defaultdict(list)
    for name, module in modules.items():
        by_scheme[module.scheme].append(name)
    groups, formats = {}, set()
    for i, (scheme, names) in enumerate(by_scheme.items()):
        args = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=scheme.symmetric,
                                strategy="group" if scheme.group_size else "channel", group_size=scheme.group_size)
        formats.add(_format(scheme))
        groups[f"group_{i}"] = QuantizationScheme(targets=sorted(names), weights=args, format=_format(scheme))
    config = QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=ignore)
    return config.model_dump(exclude_none=True)


def checkpoint_tensors(module: nn.Module, prefix: str = "", dtype: torch.dtype | None = None,
                       skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module`` (a model or one block), names prefixed with ``prefix``.

    Quantized modules give their compressed-tensors tensors (scales in ``dtype``), everything
    else its state-dict entries cast to ``dtype`` when floating. Tied tensors are stored once,
    as ``save_pretrained`` does; names starting with one of ``skip`` are left out.
    """
    modules = {n: m for n, m in quantized_modules(module).items() if not n.startswith(skip)}
    if dtype is None:
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    cast = lambda t: (t.to(dtype) if t.is_floating_point() else t).detach().cpu().contiguous()  # noqa: E731
    state: dict[str, torch.Tensor] = {}
    for name, qmodule in modules.items():  # cloned: a head and an embedding may share their codes in memory
        tensors = module_tensors(f"{prefix}{name}", qmodule.quantized_weight(), dtype)
        state.update({k: v.clone() for k, v in tensors.items()})
        if getattr(qmodule, "bias", None) is not None:
            state[f"{prefix}{name}.bias"] = cast(qmodule.bias)
    inside = tuple(f"{n}." for n in modules)
    seen: set[int] = set()
    for name, tensor in module.state_dict().items():
        if name.startswith(inside) or name.startswith(skip) or tensor.data_ptr() in seen:
            continue  # tied tensors are stored once, as save_pretrained does
        seen.add(tensor.data_ptr())
        state[f"{prefix}{name}"] = cast(tensor)
    return state


def config_with_quantization(model: nn.Module):
    """``model.config`` with the ``quantization_config`` of its quantized modules (the float Linears ignored)."""
    modules = quantized_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in modules]
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "compressed-tensors", **quantization_config(modules, linears)}
    return model.config.__class__.from_dict(config)


def write_quantized(model: nn.Module, folder: Path) -> list[str]:
    """Write ``model.safetensors`` and ``config.json`` of a model holding quantized modules into ``folder``."""
    save_file(checkpoint_tensors(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    config_with_quantization(model).save_pretrained(folder)
    return list(quantized_modules(model))


def _scheme_of(args: dict) -> QuantScheme:
    if args.get("type", "int") != "int" or args.get("strategy") not in ("group", "channel"):
        raise SlimformerError(f"unsupported compressed-tensors weight scheme {args}: slimformer reads integer "
                              "per-channel and group-wise weights")
    return QuantScheme(bits=int(args["num_bits"]), group_size=args.get("group_size") if args["strategy"] == "group"
                       else None, symmetric=bool(args.get("symmetric", True)))


def _read_weight(name: str, state: dict[str, torch.Tensor], scheme: QuantScheme) -> QuantizedWeight:
    scale = state.pop(f"{name}.weight_scale").float()
    zero_t = state.pop(f"{name}.weight_zero_point", None)
    if f"{name}.weight_packed" in state:
        shape = tuple(state.pop(f"{name}.weight_shape").tolist())
        codes = unpack(state.pop(f"{name}.weight_packed"), scheme.bits, shape)
        if zero_t is not None:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            zero_t = unpack_from_int32(zero_t, scheme.bits, torch.Size((shape[0], scale.shape[1])), packed_dim=0)
    else:
        codes = state.pop(f"{name}.weight").to(torch.int8)
    if scale.ndim == 1:
        scale = scale[:, None]
    zero = torch.zeros(scale.shape, dtype=torch.int8) if zero_t is None else zero_t.to(torch.int8).view(scale.shape)
    return QuantizedWeight(codes, scale, zero, scheme)


def _targeted(name: str, module: nn.Module, targets: list[str]) -> bool:
    """compressed-tensors' matching: a module name, ``re:`` + a regex of names, or a class name such as ``Linear``."""
    for t in targets:
        if t == name or t == type(module).__name__ or (t.startswith("re:") and re.match(t[3:], name)):
            return True
        if t == "Linear" and isinstance(module, nn.Linear) or t == "Embedding" and isinstance(module, nn.Embedding):
            return True
    return False


def load_quantized(folder: Path, model_class, config, dtype: torch.dtype) -> nn.Module:
    """Build ``model_class`` from ``config`` and fill it from a compressed-tensors checkpoint, as packed modules."""
    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    plain = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = model_class.from_config(plain, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(file))
    ignore = list(qc.get("ignore") or [])
    weights = {}
    for group in qc["config_groups"].values():
        scheme = _scheme_of(group["weights"])
        for name, module in model.named_modules():
            stored = f"{name}.weight_scale" in state
            if stored and name not in weights and _targeted(name, module, group["targets"]) \
                    and not _targeted(name, module, ignore):
                weights[name] = _read_weight(name, state, scheme)
    if not weights:
        raise SlimformerError(f"quantized checkpoint {folder}: no module of this model matches its config groups")
    install(model, weights)
    for name, module in quantized_modules(model).items():
        if isinstance(module, QuantizedEmbedding):
            continue
        bias = state.pop(f"{name}.bias", None)
        if (bias is None) != (module.bias is None):
            raise SlimformerError(f"quantized checkpoint {folder}: bias of {name} does not match the model")
        if bias is not None:
            module.bias.data.copy_(bias)
    fill(model, state, f"quantized checkpoint {folder}", skip=tuple(f"{n}." for n in weights))
    return model
