"""Sparse checkpoints in the compressed-tensors ``sparse-bitmask`` format, so a pruned model is smaller on disk.

Each sparse weight ``W`` (rows × cols) is stored as four tensors: ``W.shape``, ``W.compressed``
(the non-zero values in row order), ``W.bitmask`` (one bit per entry, packed little-endian
along each row) and ``W.row_offsets`` (where each row's values start), with a
``quantization_config`` whose ``sparsity_config`` says ``"format": "sparse-bitmask"`` in
``config.json`` — the layout of compressed-tensors' ``BitmaskCompressor`` (≤ 0.14, and the
llm-compressor and vLLM releases built on it). compressed-tensors ≥ 0.15, which transformers 5 requires,
dropped its sparse compressors, so :func:`load_model` decompresses these checkpoints
itself; the dense save (:func:`save_model`) remains the copy stock ``transformers`` loads.
A 50%-sparse float32 weight takes 50% + 1/32 of its dense size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.config import BitmaskConfig
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from safetensors.torch import load_file, save_file
from torch import nn

from slimformer.errors import SlimformerError

FORMAT = "sparse-bitmask"
_PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def is_sparse_checkpoint(config) -> bool:
    """Whether a loaded config describes a sparse-bitmask checkpoint."""
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    return (qc.get("sparsity_config") or {}).get("format") == FORMAT


def compress_weight(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four tensors of the bitmask format for a 2-D weight (keys without the weight's name)."""
    nonzero = W != 0
    row_counts = nonzero.sum(dim=-1)
    return {
        "shape": torch.tensor(W.shape),
        "compressed": W[nonzero],
        "bitmask": pack_bitmasks(nonzero.cpu()),
        "row_offsets": torch.cumsum(row_counts, 0) - row_counts,
    }


def decompress_weight(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The dense weight back from its four bitmask-format tensors."""
    shape = torch.Size(parts["shape"].tolist())
    nonzero = unpack_bitmasks(parts["bitmask"], shape)
    W = torch.zeros(shape, dtype=parts["compressed"].dtype)
    W[nonzero] = parts["compressed"]
    return W


def sparse_state_dict(model: nn.Module, min_sparsity: float = 0.1) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors with every Linear weight at least ``min_sparsity`` zero in bitmask form.

    Tied tensors (an output head sharing the embedding) are stored once, as ``save_pretrained`` does.
    """
    state, seen, compressed = {}, set(), []
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().cpu().contiguous()
        if name in linear_weights and (tensor == 0).float().mean().item() >= min_sparsity:
            state.update({f"{name}.{k}": v for k, v in compress_weight(tensor).items()})
            compressed.append(name)
        else:
            state[name] = tensor
    return state, compressed


def write_sparse(model: nn.Module, folder: Path, structure: str = "unstructured") -> list[str]:
    """Write ``model.safetensors`` and ``config.json`` in the sparse-bitmask format into ``folder``."""
    state, compressed = sparse_state_dict(model)
    if not compressed:
        raise SlimformerError("no Linear weight is sparse enough to store in the sparse-bitmask format")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    zeros = sum(int((t == 0).sum()) for n, t in model.state_dict().items() if n in compressed)
    total = sum(t.numel() for n, t in model.state_dict().items() if n in compressed)
    sparsity = BitmaskConfig(global_sparsity=zeros / total, sparsity_structure=structure,
                             targets=sorted({n.rsplit(".", 1)[0] for n in compressed}))
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": FORMAT,
                                     "sparsity_config": sparsity.model_dump()}
    model.config.__class__.from_dict(config).save_pretrained(folder)
    return compressed


def read_sparse(folder: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse-bitmask checkpoint folder."""
    raw = load_file(str(Path(folder) / "model.safetensors"))
    state, groups = {}, {}
    for key, tensor in raw.items():
        base, _, part = key.rpartition(".")
        if part in _PARTS and base.endswith(".weight"):
            groups.setdefault(base, {})[part] = tensor
        else:
            state[key] = tensor
    for name, parts in groups.items():
        if set(parts) != set(_PARTS):
            raise SlimformerError(f"sparse checkpoint {folder}: {name} lacks {sorted(set(_PARTS) - set(parts))}")
        state[name] = decompress_weight(parts)
    return state


def load_sparse(folder: Path, model_class, config, dtype: torch.dtype) -> nn.Module:
    """Build ``model_class`` from ``config`` and fill it from a sparse-bitmask checkpoint."""
    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = model_class.from_config(config, dtype=dtype)
    fill(model, read_sparse(folder), f"sparse checkpoint {folder}")
    return model


def fill(model: nn.Module, state: dict[str, torch.Tensor], what: str, skip: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` and tie its weights; a tensor missing (not tied, not under ``skip``) or unexpected fails."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(skip)] if skip else missing
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in missing if k in params and params[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise SlimformerError(f"{what} does not match its config: missing {untied[:3]}, unexpected {unexpected[:3]}")
