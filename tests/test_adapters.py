"""Adapter contract: every family's adapter finds the right parts, with the shapes its config says."""

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.pytorch_utils import Conv1D

from conftest import MOE_FAMILIES, TINY_CONFIGS, tiny_model
from slimformer import SlimformerError, get_adapter
from slimformer.models import FAMILIES, SUPPORTED_MODEL_TYPES, weight_matrix


def test_every_family_has_a_tiny_model():
    # the stock MoE families have their own tiny models (conftest.tiny_moe), tested in test_experts.py
    assert {f.name for f in FAMILIES} == set(TINY_CONFIGS) | set(MOE_FAMILIES)


def test_adapter_contract(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    config = model.config
    shape = adapter.shape()
    hidden = config.hidden_size
    heads = shape["heads"]
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = shape["kv_heads"] or heads
    inter = shape["intermediate"] or 4 * hidden  # GPT-2's n_inner=None means 4 × hidden

    assert adapter.family.name == family
    assert len(adapter.blocks) == adapter.num_layers == shape["layers"] == 3
    assert model.get_submodule(adapter.block_prefix) is adapter.blocks
    for block in adapter.blocks:
        lin = {role: tuple(weight_matrix(m).shape) for role, m in adapter.linears(block).items()}
        if "qkv" in lin:
            assert lin["qkv"] == (3 * heads * head_dim, hidden)
        else:
            assert lin["q"] == (heads * head_dim, hidden)
            assert lin["k"] == lin["v"] == (kv_heads * head_dim, hidden)
        assert lin["o"] == (hidden, heads * head_dim)
        assert lin["up"] == (inter, hidden) and lin["down"] == (hidden, inter)
        if "gate" in lin:
            assert lin["gate"] == (inter, hidden)
        norms = adapter.norms(block)
        assert norms and all(n.weight.shape == (hidden,) for n in norms)
    assert adapter.embeddings[0] is model.get_input_embeddings()
    assert all(isinstance(e, torch.nn.Embedding) for e in adapter.embeddings)
    if adapter.family.kind == "decoder":
        assert adapter.final_norm.weight.shape == (hidden,)
        assert adapter.head.weight.shape == (config.vocab_size, hidden)
    else:
        assert adapter.final_norm is None and adapter.head is None


def test_unsupported_family_lists_supported_ones():
    config = T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    with pytest.raises(SlimformerError, match="unsupported model family 't5'") as err:
        get_adapter(T5ForConditionalGeneration(config))
    assert all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)


def test_weight_matrix_is_out_by_in_and_edits_in_place():
    conv = Conv1D(nf=6, nx=4)  # GPT-2 stores (in, out)
    w = weight_matrix(conv)
    assert w.shape == (6, 4)
    w[2, 3] = 7.0
    assert conv.weight[3, 2] == 7.0
    lin = torch.nn.Linear(4, 6)
    assert weight_matrix(lin).data_ptr() == lin.weight.data_ptr()
    with pytest.raises(TypeError):
        weight_matrix(torch.nn.LayerNorm(4))
