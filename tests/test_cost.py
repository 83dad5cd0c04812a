"""Cost figures on tiny models: parameter counts, FLOPs against hand counts, bytes on disk, measured speed."""

from __future__ import annotations

import statistics

import psutil
import pytest
import torch
from conftest import VOCAB, random_ids, tiny_model, tiny_tokenizer
from torch import nn

from slimformer import SlimformerError, get_adapter, save_model
from slimformer.evaluation.cost import flops_per_token, measure_costs, param_counts, peak_memory, size_on_disk
from slimformer.models.surgery import remove_blocks, shrink_heads, shrink_neurons

# Tiny Llama by hand (tests/conftest.py): hidden 32, 4 heads × 8, 2 KV heads, FFN 48, 3 blocks, vocab 128.
LLAMA_BLOCK_WEIGHTS = 32 * 32 + 2 * (16 * 32) + 32 * 32 + 3 * (48 * 32)  # q, k+v, o, gate+up+down = 7680
LLAMA_HEAD_WEIGHTS = 128 * 32


def llama_flops_by_hand(seq_len: int, blocks: int = 3) -> int:
    attention = 2 * 2 * seq_len * 4 * 8  # QKᵀ and AV for 4 heads of 8
    return blocks * (2 * LLAMA_BLOCK_WEIGHTS + attention) + 2 * LLAMA_HEAD_WEIGHTS


def test_param_counts_see_pruned_zeros():
    model = tiny_model("llama")
    dense = param_counts(model)
    assert dense["total"] == dense["nonzero"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[:, :10] = 0  # 32 rows × 10 columns
    assert param_counts(model) == {"total": dense["total"], "nonzero": dense["total"] - 320}


def test_param_counts_count_tied_weights_once():
    gpt2 = tiny_model("gpt2")  # ties lm_head to the token embedding
    stored = sum(t.numel() for t in gpt2.state_dict().values())
    assert param_counts(gpt2)["total"] == stored - gpt2.lm_head.weight.numel()
    llama = tiny_model("llama")
    before = param_counts(llama)["total"]
    # Tied through a second Parameter object over the same memory, which model.parameters() would count twice.
    llama.lm_head.weight = nn.Parameter(llama.model.embed_tokens.weight.data)
    assert param_counts(llama)["total"] == before - LLAMA_HEAD_WEIGHTS


def test_flops_of_tiny_llama_match_a_hand_count():
    model = tiny_model("llama")
    for seq_len in (1, 16, 64):
        assert flops_per_token(model, seq_len) == llama_flops_by_hand(seq_len)


def test_flops_follow_blocks_of_different_shapes():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    shrink_neurons(adapter, adapter.blocks[1], list(range(24)))  # 48 → 24 units: 3 × 24 × 32 weights fewer
    shrink_heads(adapter, adapter.blocks[0], [0, 1])  # 4 → 2 heads, 2 → 1 KV head: q, o −512, k, v −256 each
    seq_len = 16
    attention_saved = 2 * 2 * seq_len * 2 * 8
    shrunk = llama_flops_by_hand(seq_len) - 2 * (3 * 24 * 32 + 1536) - attention_saved
    assert flops_per_token(model, seq_len) == shrunk
    remove_blocks(adapter, [2])  # a full-size block
    assert flops_per_token(model, seq_len) == shrunk - (2 * LLAMA_BLOCK_WEIGHTS + 2 * 2 * seq_len * 4 * 8)


def test_flops_cap_the_context_of_sliding_window_layers():
    model = tiny_model("gemma2")  # window 8 on blocks 0 and 2; block 1 attends to everything
    assert flops_per_token(model, 32) - flops_per_token(model, 8) == 2 * 2 * (32 - 8) * 4 * 8


def test_flops_of_an_encoder_leave_out_the_pooler():
    model = tiny_model("bert")  # no head; the pooler sees only the first token
    blocks = 3 * (2 * (4 * 32 * 32 + 2 * 48 * 32) + 2 * 2 * 16 * 32)
    assert flops_per_token(model, 16) == blocks
    with pytest.raises(SlimformerError, match="seq_len"):
        flops_per_token(model, 0)


def test_size_on_disk_of_a_saved_model(tmp_path):
    model = tiny_model("llama")
    folder = save_model(model, tiny_tokenizer(), tmp_path / "m")
    weights = list(folder.glob("*.safetensors"))
    size = size_on_disk(folder)
    assert size == sum(f.stat().st_size for f in weights)
    assert 4 * param_counts(model)["total"] <= size < 4 * param_counts(model)["total"] + 64 * 1024  # float32 + header
    assert size_on_disk(weights[0]) == weights[0].stat().st_size
    with pytest.raises(SlimformerError, match="no model file"):
        size_on_disk(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimformerError, match="no weight files"):
        size_on_disk(tmp_path / "empty")


def test_peak_memory_is_at_least_the_current_resident_memory():
    memory = peak_memory()
    current = psutil.Process().memory_info().rss / 2**30
    assert current * 0.99 <= memory["rss_gib"] < 1024


def test_measure_costs_gives_medians_for_a_dense_and_a_smaller_model():
    dense, small = tiny_model("llama"), tiny_model("llama")
    remove_blocks(get_adapter(small), [1])
    costs = measure_costs({"dense": dense, "small": small}, random_ids(1, 16), repeats=3, prompt_tokens=8, new_tokens=4)
    assert costs["settings"] == {"seq_len": 16, "repeats": 3, "decode": True, "prompt_tokens": 8, "new_tokens": 4}
    d, s = costs["models"]["dense"], costs["models"]["small"]
    for figures in (d, s):
        runs = figures["runs"]
        assert len(runs["prefill_s"]) == 3 and len(runs["decode_step_s"]) == 3 * 3  # new_tokens − 1 steps per run
        assert figures["prefill_s"] == statistics.median(runs["prefill_s"])
        assert figures["decode_tok_s"] == pytest.approx(1 / statistics.median(runs["decode_step_s"]))
    assert d["prefill_speedup"] == d["decode_speedup"] == 1.0
    assert s["prefill_speedup"] == pytest.approx(d["prefill_s"] / s["prefill_s"])
    assert s["params"] == d["params"] - sum(p.numel() for p in dense.model.layers[1].parameters())
    assert s["flops_per_token"] == llama_flops_by_hand(16, blocks=2)
    assert costs["peak_memory"]["rss_gib"] > 0


def test_measure_costs_times_only_the_prefill_of_encoders():
    costs = measure_costs({"bert": tiny_model("bert")}, random_ids(1, 16), repeats=2)
    figures = costs["models"]["bert"]
    assert costs["settings"] == {"seq_len": 16, "repeats": 2, "decode": False}
    assert "decode_tok_s" not in figures and len(figures["runs"]["prefill_s"]) == 2
    assert figures["prefill_s"] == statistics.median(figures["runs"]["prefill_s"])
    with pytest.raises(SlimformerError, match="shape"):
        measure_costs({"bert": tiny_model("bert")}, random_ids(2, 16))


def test_decode_cost_model_calibrates_on_one_model_and_prices_removed_blocks_and_formats():
    from slimformer.evaluation import DecodeCost
    from slimformer.methods import RTNConfig, apply
    from slimformer.models.surgery import remove_blocks

    model = tiny_model("llama")
    cost = DecodeCost(repeats=3)
    cost.calibrate(model, step_seconds=0.05)
    assert cost.predict(model) == pytest.approx(0.05)  # the measured step, split into layers and per-block overhead
    assert len(cost.layers(model)) == 3 * 7 + 1  # 7 projections per block and the head
    keys = set(cost.per_call)
    shorter = tiny_model("llama")
    remove_blocks(get_adapter(shorter), [1])
    assert cost.predict(shorter) == pytest.approx(0.05 * 2 / 3 + cost.per_call[next(k for k in keys if k[2] == VOCAB)] / 3,
                                                  rel=1e-6)
    quantized = tiny_model("llama")
    apply(get_adapter(quantized), RTNConfig(bits=8), None)
    cost.predict(quantized)
    assert any(k[0] == "quantized" for k in cost.per_call) and keys < set(cost.per_call)  # new formats timed on first use
    assert set(cost.to_dict()) == {"per_block_s", "per_call_s"}
