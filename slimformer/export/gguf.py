"""GGUF export for llama.cpp: tensors named and laid out as llama.cpp reads them, calibrated int8/int4 weights kept code for code.

Written with the ``gguf`` package (``GGUFWriter``, its tensor-name map, vocabularies and quantizers);
nothing here writes GGUF bytes by hand except the block layout of weights slimformer already
quantized, which must not be re-rounded:

- ``int8`` symmetric, groups of 32 → ``Q8_0`` (one float16 scale and 32 signed codes per block);
- ``int4`` symmetric, groups of 32 → ``Q4_0`` (code + 8 in a nibble, weight = (nibble - 8) · scale);
- ``int4`` asymmetric, groups of 32 → ``Q4_1`` (weight = nibble · scale + min, min = -(8 + zero) · scale).

Scales are float16 values already (the quantizer rounds them so; see ``slimformer.models.quantizer``), so
the integer codes and the scales that llama.cpp reads are exactly those slimformer computed. Other
quantized weights (another group size, int2/int3, asymmetric int8) have no GGUF block of their own:
they are de-quantized and rounded again to ``type`` (logged). ``type`` says what float weights
become; a float weight whose rows are not a multiple of 32 stays float16, and in a 4-bit file the
embedding (which is also the output layer when tied) gets ``Q8_0``, as llama.cpp's own quantizer
keeps the output layer at higher precision.

Conventions llama.cpp has and transformers does not store: the q/k rows of Llama-architecture models
are permuted to its rotary layout; Gemma's norms are stored as ``1 + weight``; a tied output weight
is left out; the tokenizer is written as llama.cpp's ``gpt2`` (byte-level BPE with merges and its
pre-tokenizer name) or ``llama`` (SentencePiece-style) vocabulary with its special ids and chat template.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from slimformer.errors import SlimformerError
from slimformer.files import atomic_path
from slimformer.models.adapters import Adapter, get_adapter
from slimformer.models.quantized import quantized_modules
from slimformer.models.quantizer import QuantizedWeight
from slimformer.models.surgery import head_dim

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_QTYPE = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
          "q4_1": gguf.GGMLQuantizationType.Q4_1}
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
              "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}
# slimformer family -> llama.cpp architecture. Mistral is the llama architecture in llama.cpp.
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
                 "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma": gguf.MODEL_ARCH.GEMMA, "gemma2": gguf.MODEL_ARCH.GEMMA2,
                 "gemma3": gguf.MODEL_ARCH.GEMMA3}
BLOCK = 32  # the block width of Q8_0 / Q4_0 / Q4_1


def lossless_type(qweight: QuantizedWeight) -> str | None:
    """The GGUF type that holds this quantized weight exactly (same codes, same scales), or None."""
    s, group = qweight.scheme, qweight.group
    if group != BLOCK:
        return None
    if s.bits == 8 and s.symmetric:
        return "q8_0"
    if s.bits == 4:
        return "q4_0" if s.symmetric else "q4_1"
    return None


def pack_blocks(qweight: QuantizedWeight, qtype: str) -> np.ndarray:
    """The GGUF bytes (rows × blocks·bytes) of a g32 quantized weight, for ``lossless_type(qweight) == qtype``."""
    codes = qweight.codes.to(torch.int8).numpy()
    rows, cols = codes.shape
    codes = codes.reshape(rows, cols // BLOCK, BLOCK)
    scale = qweight.scale.float().numpy().reshape(rows, cols // BLOCK, 1)
    d = scale.astype(np.float16).view(np.uint8)  # (rows, blocks, 2)
    if qtype == "q8_0":
        parts = [d, codes.view(np.uint8)]
    else:
        u = (codes.astype(np.int16) + 8).astype(np.uint8)
        nibbles = u[..., : BLOCK // 2] | (u[..., BLOCK // 2:] << np.uint8(4))  # ggml: low nibbles first half
        if qtype == "q4_0":
            parts = [d, nibbles]
        else:
            zero = qweight.zero.float().numpy().reshape(rows, cols // BLOCK, 1)
            m = (-(8.0 + zero) * scale).astype(np.float16).view(np.uint8)
            parts = [d, m, nibbles]
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def _permute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q/k of Llama-architecture models: each head's two halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(config, layer_type: str = "full_attention") -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:  # per-layer-type parameters (Gemma 3)
        params = params[layer_type]
    return {"rope_theta": getattr(config, "rope_theta", 10000.0), "rope_type": "default", **params}


def check_exportable(adapter: Adapter) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture of a model, or a clear error saying why it cannot be exported."""
    family = adapter.family.name
    config = adapter.config
    if family not in ARCHITECTURES:
        raise SlimformerError(f"GGUF export supports the decoder families {', '.join(ARCHITECTURES)}; "
                              f"this model is '{family}'")
    if getattr(config, "slimformer_layer_shapes", None):
        raise SlimformerError("GGUF export needs every block to have the same shape (llama.cpp reads one head count "
                              "and one FFN width per model); this model's blocks were pruned to different widths")
    rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear"):
        raise SlimformerError(f"GGUF export supports default and linear RoPE, not '{rope['rope_type']}'")
    if family in ("gemma2", "gemma3"):
        width = head_dim(adapter)
        if config.query_pre_attn_scalar != width:
            raise SlimformerError(f"llama.cpp's {family} scales attention by 1/sqrt(head_dim = {width}); this "
                                  f"model's query_pre_attn_scalar is {config.query_pre_attn_scalar}")
    if family == "gemma3":
        local = _rope(config, "sliding_attention")
        if local["rope_theta"] != 10000.0 or local["rope_type"] != "default":
            raise SlimformerError("llama.cpp's gemma3 uses RoPE base 10000 without scaling on sliding-window layers; "
                                  f"this model has {local}")
    return ARCHITECTURES[family]


def _metadata(w: gguf.GGUFWriter, adapter: Adapter, ftype: str) -> None:
    config, family = adapter.config, adapter.family.name
    shape, width = adapter.shape(), head_dim(adapter)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(getattr(config, "_name_or_path", "") or family)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(shape["layers"])
    w.add_feed_forward_length(shape["intermediate"])
    w.add_head_count(shape["heads"])
    w.add_head_count_kv(shape["kv_heads"] or shape["heads"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_key_length(width)
    w.add_value_length(width)
    w.add_rope_dimension_count(width)
    w.add_vocab_size(config.vocab_size)
    rope = _rope(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    layer_types = getattr(config, "layer_types", None) or []
    if family in ("gemma2", "gemma3"):
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
    if family == "gemma2":
        w.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        w.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    if family not in ("gemma2", "gemma3") and "sliding_attention" in layer_types or (family == "mistral" and getattr(config, "sliding_window", None)):
        log.warning("llama.cpp's %s architecture attends to the whole context; this model's sliding window "
                    "(%s tokens) is not kept, so outputs differ beyond it", ARCHITECTURES[family].name.lower(),
                    config.sliding_window)
    w.add_file_type(_FILE_TYPE[ftype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read from its ``tokenizer.json``."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    splits = [(p.get("pattern") or {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    if not splits and "ByteLevel" in kinds:
        digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
        return "smollm" if digits else "gpt-2"
    if any("\\p{N}{1,3}" in s for s in splits):
        return "llama-bpe"
    if any("\\p{N}|" in s and s.startswith("(?i:'s") for s in splits):
        return "qwen2"
    log.warning("pre-tokenizer %s has no llama.cpp name here; written as 'default', so llama.cpp may split text "
                "differently from transformers (token ids given directly are unaffected)", kinds)
    return "default"


def _vocab(w: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tokenizer.save_pretrained(folder)
        spec = json.loads((folder / "tokenizer.json").read_text()) if (folder / "tokenizer.json").exists() else {}
        model = spec.get("model", {})
        if (folder / "tokenizer.model").exists():
            vocab, kind = SentencePieceVocab(folder), "llama"
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab, kind = LlamaHfVocab(folder), "llama"
        elif model.get("type") == "BPE":
            vocab, kind = BpeVocab(folder), "gpt2"
        else:
            raise SlimformerError(f"the tokenizer ({model.get('type', 'unknown')} model) has no GGUF vocabulary type; "
                                  "llama.cpp reads byte-level BPE and SentencePiece-style tokenizers")
        tokens, scores, types = [], [], []
        for text, score, kind_of in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind_of)
        if len(tokens) > vocab_size:
            raise SlimformerError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
        for i in range(len(tokens), vocab_size):  # embedding rows no token uses (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model(kind)
        w.add_tokenizer_pre(bpe_pre_tokenizer(spec) if kind == "gpt2" else "default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size).add_to_gguf(w, quiet=True)


def _weights(adapter: Adapter) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every tensor to write, by its transformers name: float tensors, or the quantized weights as they are.

    The output weight is left out when it is the embedding's (tied, or a quantized pair sharing one table
    of codes): llama.cpp then uses ``token_embd`` for both.
    """
    model = adapter.model
    quantized = quantized_modules(model)
    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    for name, module in quantized.items():
        out[f"{name}.weight"] = module.quantized_weight()
    for name, tensor in model.state_dict().items():
        module_name = name.rpartition(".")[0]
        if module_name in quantized and not name.endswith(".bias"):
            continue
        out.setdefault(name, tensor.detach())
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None)
    embed_name = next((n for n, m in model.named_modules() if m is embed), None)
    if head_name and embed_name and f"{head_name}.weight" in out:
        a, b = out[f"{head_name}.weight"], out[f"{embed_name}.weight"]
        a, b = (a.codes, b.codes) if isinstance(a, QuantizedWeight) and isinstance(b, QuantizedWeight) else (a, b)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr():
            del out[f"{head_name}.weight"]
    return out


def _row_permuted(q: QuantizedWeight | torch.Tensor, heads: int):
    if isinstance(q, QuantizedWeight):
        return QuantizedWeight(_permute_rows(q.codes, heads), _permute_rows(q.scale, heads),
                               _permute_rows(q.zero, heads), q.scheme)
    return _permute_rows(q, heads)


def export_gguf(source, out: str | Path, ftype: str = "f16", *, overwrite: bool = False) -> dict:
    """Write a loaded model (``LoadedModel``, or a model and tokenizer pair) as one GGUF file at ``out``.

    Returns what was written: the path, architecture, type and how many tensors took each GGUF
    type (with the count of quantized weights kept exactly and re-quantized). The file appears only
    when complete.
    """
    model, tokenizer = (source.model, source.tokenizer) if hasattr(source, "tokenizer") else source
    if ftype not in GGUF_TYPES:
        raise SlimformerError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, not '{ftype}'")
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimformerError(f"output '{out}' exists; choose another path or allow overwriting")
    adapter = get_adapter(model)
    arch = check_exportable(adapter)
    config, shape = adapter.config, adapter.shape()
    names = gguf.get_tensor_name_map(arch, shape["layers"])
    heads, kv_heads = shape["heads"], shape["kv_heads"] or shape["heads"]
    offset = adapter.family.norm_offset
    counts: dict[str, int] = {}
    kept = requantized = 0

    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        _metadata(w, adapter, ftype)
        _vocab(w, tokenizer, config.vocab_size)
        for hf_name, value in _weights(adapter).items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise SlimformerError(f"no GGUF name for tensor '{hf_name}' in llama.cpp's {arch.name.lower()} architecture")
            if arch == gguf.MODEL_ARCH.LLAMA and (name.endswith("attn_q.weight") or name.endswith("attn_q.bias")):
                value = _row_permuted(value, heads)
            elif arch == gguf.MODEL_ARCH.LLAMA and (name.endswith("attn_k.weight") or name.endswith("attn_k.bias")):
                value = _row_permuted(value, kv_heads)
            if isinstance(value, QuantizedWeight):
                exact = lossless_type(value)
                if exact is not None:
                    w.add_tensor(name, pack_blocks(value, exact), raw_dtype=_QTYPE[exact])
                    counts[exact] = counts.get(exact, 0) + 1
                    kept += 1
                    continue
                requantized += 1
                value = value.dequantize()
            data = value.float().numpy()
            if offset and name.endswith("norm.weight"):
                data = data + np.float32(offset)
            kind = _float_type(name, data, ftype)
            array = data if kind == "f32" else data.astype(np.float16) if kind == "f16" else \
                gguf.quants.quantize(data, _QTYPE[kind])
            w.add_tensor(name, array, raw_dtype=None if kind in ("f32", "f16") else _QTYPE[kind])
            counts[kind] = counts.get(kind, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    if requantized:
        log.warning("%d quantized weights have no exact GGUF block (only int8/int4 in groups of 32 do) and were "
                    "rounded again to %s", requantized, ftype)
    return {"path": str(out), "architecture": gguf.MODEL_ARCH_NAMES[arch], "type": ftype, "tensors": counts,
            "quantized_kept": kept, "quantized_requantized": requantized, "bytes": out.stat().st_size}


def _float_type(name: str, data: np.ndarray, ftype: str) -> str:
    """The GGUF type of one float tensor in a file of type ``ftype``."""
    if data.ndim < 2 or ftype == "f32":
        return "f32"  # norms and biases stay float32, as llama.cpp's converter keeps them
    if ftype == "f16" or data.shape[-1] % BLOCK:
        return "f16"
    if ftype in ("q4_0", "q4_1") and name.startswith(("token_embd", "output.")):
        return "q8_0"
    return ftype
