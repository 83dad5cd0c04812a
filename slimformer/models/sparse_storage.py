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

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.config import BitmaskConfig
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX

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


def _sparse_tensors(items, linear_weights: set[str], min_sparsity: float, counts: dict) -> dict[str, torch.Tensor]:
    """``(name, tensor)`` pairs as stored: each Linear weight at least ``min_sparsity`` zero in bitmask form.

    ``counts`` accumulates the zeros, entries and names of the weights compressed.
    """
    state = {}
    for name, tensor in items:
        tensor = tensor.detach().cpu().contiguous()
        zeros = int((tensor == 0).sum()) if name in linear_weights else 0
        if name in linear_weights and zeros >= min_sparsity * tensor.numel():
            state.update({f"{name}.{k}": v for k, v in compress_weight(tensor).items()})
            counts["zeros"] += zeros
            counts["total"] += tensor.numel()
            counts["names"].append(name)
        else:
            state[name] = tensor
    return state


def _new_counts() -> dict:
    """Empty counts for :func:`_sparse_tensors`."""
    return {"zeros": 0, "total": 0, "names": []}


def _sparse_config(config: dict, counts: dict, structure: str) -> dict:
    """``config`` with the ``quantization_config`` that marks a sparse-bitmask checkpoint."""
    if not counts["names"]:
        raise SlimformerError("no Linear weight is sparse enough to store in the sparse-bitmask format")
    sparsity = BitmaskConfig(global_sparsity=counts["zeros"] / counts["total"], sparsity_structure=structure,
                             targets=sorted({n.rsplit(".", 1)[0] for n in counts["names"]}))
    return {**config, "quantization_config": {"quant_method": "compressed-tensors", "format": FORMAT,
                                              "sparsity_config": sparsity.model_dump()}}


def linear_weight_names(model: nn.Module) -> set[str]:
    """The state-dict names of every Linear weight of ``model`` (a skeleton on the meta device will do)."""
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _unique_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's state, tied tensors (an output head sharing the embedding) once, as ``save_pretrained`` stores them."""
    seen, items = set(), []
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            items.append((name, tensor))
    return items


def write_sparse(model: nn.Module, folder: Path, structure: str = "unstructured") -> list[str]:
    """Write ``model.safetensors`` and ``config.json`` in the sparse-bitmask format into ``folder``."""
    counts = _new_counts()
    state = _sparse_tensors(_unique_tensors(model), linear_weight_names(model), 0.1, counts)
    config = _sparse_config(model.config.to_dict(), counts, structure)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.__class__.from_dict(config).save_pretrained(folder)
    return counts["names"]


def sparsify_checkpoint(source: Path, folder: Path, linear_weights: set[str], structure: str = "unstructured",
                        min_sparsity: float = 0.1) -> list[str]:
    """Write a sparse-bitmask copy of the dense safetensors checkpoint ``source`` into ``folder``, one shard at a time.

    For a model streamed from disk (``--max-memory``): memory holds one shard (one block of a
    streamed output), never the model. The shards are named as ``save_pretrained`` names them,
    with an index when there are several; config, tokenizer and other files are copied, the
    config marked sparse.
    """
    from slimformer.models.streaming import name_shards  # streaming reads checkpoints through this module

    source, folder = Path(source), Path(folder)
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise SlimformerError(f"no safetensors weights in {source}")
    counts, parts = _new_counts(), []
    for k, shard in enumerate(shards):
        state = _sparse_tensors(load_file(str(shard)).items(), linear_weights, min_sparsity, counts)
        parts.append(f"part-{k:05d}.safetensors")
        save_file(state, str(folder / parts[-1]), metadata={"format": "pt"})
    config = _sparse_config(json.loads((source / "config.json").read_text()), counts, structure)
    for other in source.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in ("config.json", INDEX):
            shutil.copy2(other, folder / other.name)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    name_shards(folder, parts)
    return counts["names"]


def read_sparse(folder: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse-bitmask checkpoint folder (one file or shards)."""
    raw = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        raw.update(load_file(str(file)))
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
