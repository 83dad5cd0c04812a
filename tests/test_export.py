"""Deployment: GGUF files that llama.cpp itself runs with transformers' logits, calibrated int4 kept code for code, compressed-tensors read back by ModelCompressor."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from conftest import bpe_tokenizer, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from slimformer.cli import main
from slimformer.errors import SlimformerError
from slimformer.export import decompress_with_compressed_tensors, export_gguf
from slimformer.export import llamacpp as runtime
from slimformer.methods.base import apply
from slimformer.methods.quantization import GPTQConfig, RTNConfig
from slimformer.models import get_adapter, save_model
from slimformer.models.quantized import float_path, quantized_modules
from slimformer.models.quantizer import QuantScheme, quantize_weight
from slimformer.models.surgery import remove_blocks, shrink_neurons

needs_llamacpp = pytest.mark.skipif(not runtime.available(),
                                    reason="llama.cpp binding not installed (pip install 'slimformer[llamacpp]')")

# Widths that Q8_0/Q4_0 blocks of 32 divide; initializer 0.1 so the logits spread over a few nats
# (at 0.02 they are nearly flat and any export would look right).
_SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
_SLIDING = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
GGUF_CONFIGS = {
    "llama": lambda: LlamaConfig(**_SHAPE, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_SHAPE),
    "gemma3": lambda: Gemma3TextConfig(**_SHAPE, head_dim=16, query_pre_attn_scalar=16, **_SLIDING),
}
# llama.cpp computes GELU (Gemma) from a float16 table; the SiLU families agree to float32 rounding.
F32_TOL = {"llama": 1e-4, "qwen2": 1e-4, "gemma3": 3e-3}
PROMPT = [(i * 37 + 11) % 320 for i in range(40)]  # longer than the 16-token sliding window


def gguf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(GGUF_CONFIGS[family]()).eval()


def reference_logprobs(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad(), float_path():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)


def llamacpp_gap(path, model) -> float:
    """Largest |Δ log p| over the whole vocabulary between llama.cpp (the file) and transformers (the model)."""
    ref = reference_logprobs(model)
    got = runtime.LlamaCpp(path, n_ctx=128, kv_f32=True).next_token_logprobs(PROMPT, ref.numel())
    assert len(got) == ref.numel()
    return max(abs(lp - ref[i].item()) for i, lp in got.items())


@needs_llamacpp
@pytest.mark.parametrize("family", list(GGUF_CONFIGS))
def test_llama_cpp_runs_the_export_with_transformers_logits(family, tmp_path):
    model = gguf_model(family)
    export_gguf((model, bpe_tokenizer()), tmp_path / "f32.gguf", "f32")
    assert llamacpp_gap(tmp_path / "f32.gguf", model) <= F32_TOL[family]
    written = export_gguf((model, bpe_tokenizer()), tmp_path / "q8.gguf", "q8_0")
    assert written["tensors"]["q8_0"] >= 3 * 7  # every projection of every block
    # Q8_0 rounds weights (and llama.cpp rounds activations to 8 bits for its dot products): a few hundredths
    # of a nat on logits that spread over ~5 nats; a misplaced block or scale moves them by nats.
    assert llamacpp_gap(tmp_path / "q8.gguf", model) <= 0.15


@needs_llamacpp
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_block_removed_model_exports_and_runs(family, tmp_path):
    model = gguf_model(family)
    remove_blocks(get_adapter(model), [1])
    written = export_gguf((model, bpe_tokenizer()), tmp_path / "m.gguf", "f32")
    assert written["tensors"]["f32"] > 0
    assert llamacpp_gap(tmp_path / "m.gguf", model) <= F32_TOL[family]
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = "gemma3" if family == "gemma3" else "llama"
    assert reader.fields[f"{arch}.block_count"].parts[-1][0] == 2


@pytest.mark.parametrize("scheme, qtype", [(QuantScheme(4, 32, True), "Q4_0"), (QuantScheme(4, 32, False), "Q4_1"),
                                           (QuantScheme(8, 32, True), "Q8_0")])
def test_calibrated_quants_are_written_code_for_code(scheme, qtype, tmp_path):
    model = gguf_model("qwen2")  # no q/k permutation: GGUF rows are transformers rows
    config = GPTQConfig(bits=scheme.bits, group_size=32, symmetric=scheme.symmetric)
    apply(get_adapter(model), config, torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0)))
    modules = quantized_modules(model)
    written = export_gguf((model, bpe_tokenizer()), tmp_path / "q.gguf", "f16")
    assert written["quantized_kept"] == len(modules) == 21 and written["quantized_requantized"] == 0
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    q = modules["model.layers.2.mlp.down_proj"].quantized_weight()
    t = tensors["blk.2.ffn_down.weight"]
    assert t.tensor_type.name == qtype
    blocks = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
    scales = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32).reshape(q.scale.shape))
    assert torch.equal(scales, q.scale)  # bit for bit: the quantizer's scales are float16 values
    if qtype == "Q8_0":
        codes = torch.from_numpy(blocks[:, 2:].copy().view(np.int8).astype(np.int8))
    else:
        nibbles = blocks[:, 4 if qtype == "Q4_1" else 2:]
        codes = torch.from_numpy(np.concatenate([nibbles & 15, nibbles >> 4], axis=1).astype(np.int8) - 8)
        if qtype == "Q4_1":
            mins = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).reshape(q.scale.shape)
            assert np.array_equal(mins, (-(8 + q.zero.float()) * q.scale).numpy().astype(np.float16).astype(np.float32))
    assert torch.equal(codes.reshape(q.codes.shape), q.codes)
    dequant = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    if q.scheme.symmetric:  # (code · fp16 scale) is exact in float32: llama.cpp's weights are slimformer's weights
        assert np.array_equal(dequant, q.dequantize().numpy())


@needs_llamacpp
def test_gptq_int4_runs_in_llama_cpp_as_q4_0(tmp_path):
    model = gguf_model("llama")
    apply(get_adapter(model), GPTQConfig(bits=4, group_size=32),
          torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(0)))
    written = export_gguf((model, bpe_tokenizer()), tmp_path / "q4.gguf", "f32")
    assert written["tensors"]["q4_0"] == 21 and written["quantized_requantized"] == 0
    # the same int4 weights on both sides (q/k rows permuted for llama.cpp's rotary layout included): only
    # llama.cpp's 8-bit activations differ, far less than re-rounding the float model to Q4_0 would
    assert llamacpp_gap(tmp_path / "q4.gguf", model) <= 0.15


def test_other_quantized_weights_are_rounded_again(tmp_path, caplog):
    model = gguf_model("qwen2")
    apply(get_adapter(model), RTNConfig(bits=4, group_size=64))
    written = export_gguf((model, bpe_tokenizer()), tmp_path / "q.gguf", "q8_0")
    assert written["quantized_kept"] == 0 and written["quantized_requantized"] == 21
    assert "rounded again to q8_0" in caplog.text


def test_quantizer_scales_are_float16_values():
    q = quantize_weight(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)), QuantScheme(4, 32, False))
    assert torch.equal(q.scale.half().float(), q.scale)


def test_compressed_tensors_model_compressor_decompresses_the_same_weights(tmp_path):
    model = tiny_model("llama")
    apply(get_adapter(model), GPTQConfig(bits=4, group_size=16), torch.randint(0, 128, (4, 16)))
    path = save_model(model, tiny_tokenizer(), tmp_path / "q")
    state = decompress_with_compressed_tensors(path)
    modules = quantized_modules(model)
    assert len(modules) == 21
    for name, module in modules.items():
        assert torch.equal(state[f"{name}.weight"].float(), module.dequantized()), name


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(SlimformerError, match="GGUF export supports the decoder families"):
        export_gguf((tiny_model("gpt2"), bpe_tokenizer()), tmp_path / "g.gguf")
    model = gguf_model("llama")
    adapter = get_adapter(model)
    shrink_neurons(adapter, adapter.blocks[0], list(range(64)))
    from slimformer.models.surgery import sync_config_shapes
    sync_config_shapes(adapter)
    with pytest.raises(SlimformerError, match="every block to have the same shape"):
        export_gguf((model, bpe_tokenizer()), tmp_path / "s.gguf")
    with pytest.raises(SlimformerError, match="no GGUF vocabulary type"):
        export_gguf((gguf_model("llama"), tiny_tokenizer()), tmp_path / "w.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "x.gguf").write_bytes(b"")
    with pytest.raises(SlimformerError, match="exists"):
        export_gguf((gguf_model("llama"), bpe_tokenizer()), tmp_path / "x.gguf")


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/m.gguf", "--type", "q2_k"], "invalid choice"),
    (["--out", "{tmp}/exists.gguf"], "exists"),
    (["--out", "{tmp}/m.bin"], "ending in .gguf"),
    (["--out", "{tmp}/ct", "--format", "compressed-tensors"], "for quantized models"),
])
def test_cli_export_bad_input_exits_nonzero_with_one_line(saved_tiny, tmp_path, capsys, argv, message):
    path, _ = saved_tiny
    (tmp_path / "exists.gguf").write_bytes(b"")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(["export", str(path), *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and message in err[-1]
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "ct").exists()


@needs_llamacpp
def test_cli_export_writes_a_gguf_llama_cpp_generates_from(tmp_path, capsys):
    model = gguf_model("llama")
    src = save_model(model, bpe_tokenizer(), tmp_path / "m")
    assert main(["export", str(src), "--type", "q8_0", "--out", str(tmp_path / "m.gguf"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "greedy tokens agree" in out and (tmp_path / "m.gguf").stat().st_size > 0


@needs_llamacpp
def test_uniformly_width_pruned_model_exports_and_runs(tmp_path):
    model = gguf_model("qwen2")
    adapter = get_adapter(model)
    for block in adapter.blocks:
        shrink_neurons(adapter, block, list(range(0, 128, 2)))  # 64 of 128 units in every block: one width
    from slimformer.models.surgery import sync_config_shapes
    sync_config_shapes(adapter)
    assert model.config.intermediate_size == 64
    export_gguf((model, bpe_tokenizer()), tmp_path / "w.gguf", "f32")
    assert llamacpp_gap(tmp_path / "w.gguf", model) <= F32_TOL["qwen2"]


@needs_llamacpp
@pytest.mark.integration
def test_smollm2_runs_in_llama_cpp_as_exported(tmp_path):
    from slimformer import load_model
    from slimformer.data import load_text, tokenize

    smollm = load_model("smollm2-135m")
    written = export_gguf(smollm, tmp_path / "s.gguf", "f16")  # 30 blocks, 9 heads / 3 KV heads, tied head
    assert written["architecture"] == "llama" and "output.weight" not in {
        t.name for t in gguf.GGUFReader(tmp_path / "s.gguf").tensors}
    ids = tokenize(smollm.tokenizer, load_text("wikitext2:test"))[0, :128].tolist()
    with torch.no_grad():
        ref = torch.log_softmax(smollm.model(torch.tensor([ids])).logits[0, -1].double(), -1)
    got = runtime.LlamaCpp(tmp_path / "s.gguf", n_ctx=256).next_token_logprobs(ids, 20)
    # float16 weights and KV cache against float32: hundredths of a nat; a wrong rotary layout moves nats
    assert max(abs(lp - ref[i].item()) for i, lp in got.items()) <= 0.05
    assert len(set(got) & set(ref.topk(20).indices.tolist())) >= 18  # the same likely tokens (ties may swap at the edge)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_tied_quantized_head_is_written_once(family, tmp_path):
    config = GGUF_CONFIGS[family]()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    apply(get_adapter(model), RTNConfig(bits=8, group_size=32, head=True, embedding=True, head_bits=8))
    export_gguf((model, bpe_tokenizer()), tmp_path / "t.gguf", "f16")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "t.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_gguf_source_is_converted_tensor_by_tensor_as_transformers_loads_it(family, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from slimformer.models import loading

    model = gguf_model(family)
    path = tmp_path / "m.gguf"
    export_gguf((model, bpe_tokenizer()), path, "f32")
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).state_dict()
    monkeypatch.setenv("SLIMFORMER_CACHE", str(tmp_path / "cache"))
    converted = loading.gguf_checkpoint(path)
    tensors = load_file(converted / "model.safetensors")
    assert set(tensors) <= set(whole) and set(whole) - set(tensors) <= {"lm_head.weight"}
    assert all(torch.equal(tensors[k], whole[k]) for k in tensors)
    if family != "gemma3":  # transformers' GGUF config of Gemma 3 has no per-layer sliding windows
        ids = torch.tensor([PROMPT])
        assert torch.allclose(loading.load_model(str(path)).model(ids).logits, model(ids).logits, atol=1e-5)
