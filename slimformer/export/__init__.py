"""Deployment formats: GGUF for llama.cpp and compressed-tensors for vLLM, and the runtime checks that read them back."""

from slimformer.export.compressed import decompress_with_compressed_tensors
from slimformer.export.gguf import GGUF_TYPES, export_gguf, lossless_type

__all__ = ["GGUF_TYPES", "decompress_with_compressed_tensors", "export_gguf", "lossless_type"]
