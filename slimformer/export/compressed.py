"""compressed-tensors checkpoints (what vLLM loads), checked with compressed-tensors' own ModelCompressor rather than with slimformer's reader."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimformer.errors import SlimformerError


def decompress_with_compressed_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """The float weights of a quantized checkpoint as compressed-tensors itself decompresses them.

    The same steps vLLM's and transformers' loaders take: build the model from its config, attach
    the ``quantization_config``'s schemes (``apply_quantization_config``), put the modules in their
    compressed layout (``ModelCompressor.compress_model``), load the safetensors into it, then
    ``ModelCompressor.decompress_model``. Returns the state dict after decompression.
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors" or not qc.get("config_groups"):
        raise SlimformerError(f"'{folder}' is not a compressed-tensors quantized checkpoint")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    apply_quantization_config(model, QuantizationConfig.model_validate(qc))
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(qc))
    compressor.compress_model(model)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # a tied head is the embedding
    if missing or unexpected:
        raise SlimformerError(f"compressed-tensors layout mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    compressor.decompress_model(model)
    return model.state_dict()
