"""Search spaces: sub-networks have the configured shapes, extraction equals masking, costs are exact."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from conftest import TINY_CONFIGS, TINY_REL, assert_close_scaled, random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model, save_model
from slimformer.models.surgery import block_shape
from slimformer.search.importance import lm_loss, mask_gradient_importance, normalised
from slimformer.search.space import SPACES, Importance, SearchSpace, Subnet, count_params, extract, masked

FAMILIES = ["llama", "qwen3", "gemma2", "gpt2", "opt", "bert"]


def outputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def random_importance(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [block_shape(adapter, b) for b in adapter.blocks]
    return Importance([torch.rand(s["heads"], generator=g) for s in shapes],
                      [torch.rand(s["intermediate"], generator=g) for s in shapes])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("space_name", SPACES)
def test_extracted_equals_masked_and_costs_are_exact(family, space_name):
    model = tiny_model(family)
    adapter = get_adapter(model)
    space = SearchSpace(space_name, adapter, random_importance(adapter))
    ids = random_ids(2, 12)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        params = space.sample(g)
        subnet = space.subnet(params)
        if not subnet.kept_blocks:
            continue
        with masked(adapter, subnet):
            expected = outputs(model, ids)
        small = extract(model, subnet)
        assert_close_scaled(outputs(small, ids), expected)
        assert count_params(adapter, subnet) == sum(p.numel() for p in small.parameters())
        kept = [block_shape(get_adapter(small), b) for b in get_adapter(small).blocks]
        assert [s["heads"] for s in kept] == [len(subnet.heads[b]) for b in subnet.kept_blocks]
        assert [s["intermediate"] for s in kept] == [len(subnet.units[b]) for b in subnet.kept_blocks]
    torch.testing.assert_close(outputs(model, ids), outputs(tiny_model(family), ids))  # masks leave no trace


def test_counts_keep_the_most_important_units_and_respect_kv_groups():
    adapter = get_adapter(tiny_model("llama"))  # 4 heads in 2 KV groups, 48 units, 3 blocks
    imp = Importance([torch.tensor([0.1, 0.9, 0.8, 0.2])] * 3, [torch.arange(48.0)] * 3)
    space = SearchSpace("small", adapter, imp)
    dist = space.distributions()
    assert (dist["heads"].low, dist["heads"].high, dist["heads"].step) == (2, 4, 2)
    subnet = space.subnet({"blocks": 2, "heads": 2, "units": 5})
    assert subnet.heads == [[1, 2], [1, 2], None]  # the best head of each KV group
    assert subnet.units[0] == [43, 44, 45, 46, 47]
    large = SearchSpace("large", adapter, imp)
    assert sum(k.startswith("head_0_") for k in large.distributions()) == 2  # one choice per KV group
    params = {k: 1 for k in large.distributions()} | {"head_1_0": 0}
    assert large.subnet(params).heads[1] == [2, 3]
    # A block with neither heads nor units is dropped; with only units it keeps its best head group.
    params = params | {"head_2_0": 0, "head_2_1": 0}
    assert large.subnet(params).heads[2] == [0, 1]
    params = params | {f"unit_2_{u}": 0 for u in range(48)}
    assert large.subnet(params).heads[2] is None


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_extracted_models_save_and_load(tmp_path, family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    ids = random_ids(2, 10)
    uniform = SearchSpace("small", adapter).subnet({"blocks": 2, "heads": 2, "units": 20})
    ragged = SearchSpace("medium", adapter).subnet({"heads_0": 4, "units_0": 7, "heads_1": 2, "units_1": 48,
                                                    "heads_2": 2 if family == "llama" else 3, "units_2": 1})
    for name, subnet in (("uniform", uniform), ("ragged", ragged)):
        small = extract(model, subnet)
        path = save_model(small, tiny_tokenizer(), tmp_path / name)
        loaded = load_model(str(path)).model
        torch.testing.assert_close(outputs(loaded, ids), outputs(small, ids))
        stock = name == "uniform" and family == "llama"  # BERT derives head width from hidden / heads
        assert hasattr(small.config, "slimformer_layer_shapes") != stock
        if stock:
            cls = AutoModelForCausalLM if family == "llama" else AutoModel
            torch.testing.assert_close(outputs(cls.from_pretrained(path), ids), outputs(small, ids))


def test_extracted_decoder_generates_like_the_masked_one():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    subnet = SearchSpace("medium", adapter, random_importance(adapter)).subnet(
        {"heads_0": 2, "units_0": 9, "heads_1": 4, "units_1": 30, "heads_2": 2, "units_2": 48})
    small = extract(model, subnet)
    prompt = random_ids(1, 6)
    with torch.no_grad(), masked(adapter, subnet):
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(small.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0), expected)


def test_mask_gradient_importance_matches_finite_differences():
    model = tiny_model("llama").double()
    adapter = get_adapter(model)
    batches = [random_ids(2, 8, seed=s) for s in range(2)]

    def loss64(model, ids):  # the library loss upcasts to float32, too coarse for finite differences
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    assert loss64(model, batches[0]).item() == pytest.approx(lm_loss(model, batches[0]).item(), rel=TINY_REL)
    scores = mask_gradient_importance(adapter, batches, loss64, progress=False)
    o_proj = adapter.linears(adapter.blocks[1])["o"]
    eps, hd = 1e-2, 8  # RMSNorm computes in float32 inside: a larger step keeps the rounding out
    for head in range(4):
        expected = 0.0
        for ids in batches:
            losses = []
            for sign in (1, -1):
                scale = torch.ones(4 * hd, dtype=torch.float64)
                scale[head * hd : (head + 1) * hd] += sign * eps
                h = o_proj.register_forward_pre_hook(lambda m, a, s=scale: (a[0] * s,))
                with torch.no_grad():
                    losses.append(loss64(model, ids).item())
                h.remove()
            expected += abs(losses[0] - losses[1]) / (2 * eps)
        assert scores.heads[1][head].item() == pytest.approx(expected, rel=1e-2)
    assert all(p.requires_grad for p in model.parameters())
    norm = normalised(scores)
    assert norm.units[0].norm().item() == pytest.approx(1.0)


def test_bad_space_and_mismatched_subnet():
    adapter = get_adapter(tiny_model("llama"))
    with pytest.raises(SlimformerError, match="unknown search space 'huge'"):
        SearchSpace("huge", adapter)
    with pytest.raises(SlimformerError, match="missing"):
        SearchSpace("small", adapter).subnet({"blocks": 1})
    with pytest.raises(SlimformerError, match="keeps no block"):
        extract(adapter.model, Subnet([None] * 3, [None] * 3))
    with pytest.raises(SlimformerError, match="sub-network has 2 blocks"):
        with masked(adapter, Subnet([[0], [0]], [[0], [0]])):
            pass


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "gemma2", "mistral"])  # the last two: sliding windows
def test_subnet_flops_match_the_cost_formula_on_the_extracted_model(family):
    from slimformer.evaluation.cost import flops_per_token as measured
    from slimformer.search.space import flops_per_token

    model = tiny_model(family)
    adapter = get_adapter(model)
    space = SearchSpace("medium", adapter, random_importance(adapter))
    subnet = space.subnet(space.sample(torch.Generator().manual_seed(3)))
    assert flops_per_token(adapter, subnet, 24) == pytest.approx(measured(extract(model, subnet), 24))
    assert flops_per_token(adapter, None, 24) == pytest.approx(measured(model, 24))  # 24 > the window of 8


def test_uniform_points_shrink_every_count_evenly():
    adapter = get_adapter(tiny_model("llama"))  # 4 heads (2 KV groups), 48 units, 3 blocks
    medium = SearchSpace("medium", adapter).uniform(0.5)
    assert medium == {f"{k}_{b}": v for b in range(3) for k, v in (("heads", 2), ("units", 24))}
    small = SearchSpace("small", adapter).uniform(0.9)
    assert small["blocks"] == 3 and small["heads"] == 4 and small["units"] == 43
    assert SearchSpace("layer", adapter).uniform(0.5) is None


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("space_name", SPACES)
def test_params_of_inverts_subnet(family, space_name):
    adapter = get_adapter(tiny_model(family))
    space = SearchSpace(space_name, adapter, random_importance(adapter))
    g = torch.Generator().manual_seed(2)
    for params in [space.largest(), space.smallest(), *(space.sample(g) for _ in range(5))]:
        subnet = space.subnet(params)
        if space_name == "large" and not subnet.kept_blocks:
            continue
        assert space.subnet(space.params_of(subnet)) == subnet


def test_params_of_refuses_what_a_space_cannot_express():
    adapter = get_adapter(tiny_model("bert"))  # 4 heads, 48 units, 3 blocks
    imp = random_importance(adapter)
    medium, small = SearchSpace("medium", adapter, imp), SearchSpace("small", adapter, imp)
    uneven = medium.subnet({"heads_0": 4, "units_0": 10, "heads_1": 2, "units_1": 30, "heads_2": 1, "units_2": 48})
    assert small.params_of(uneven) is None  # per-block counts differ
    assert medium.params_of(uneven) == {"heads_0": 4, "units_0": 10, "heads_1": 2, "units_1": 30,
                                        "heads_2": 1, "units_2": 48}
    not_top = Subnet([[0]] * 3, [[0]] * 3)  # one head and one unit, but not the most important ones
    if int(imp.heads[0].argmax()) != 0 or int(imp.units[0].argmax()) != 0:
        assert medium.params_of(not_top) is None
    dropped = Subnet([[0, 1, 2, 3], None, None], [list(range(48)), None, None])
    assert medium.params_of(dropped) is None and small.params_of(dropped) == {"blocks": 1, "heads": 4, "units": 48}
    assert SearchSpace("layer", adapter, imp).params_of(dropped) == {"block_0": 1, "block_1": 0, "block_2": 0}


def test_sized_sampling_covers_the_size_range_that_uniform_draws_miss():
    adapter = get_adapter(tiny_model("llama"))  # 3 blocks: the medium space has 6 parameters
    space = SearchSpace("medium", adapter, random_importance(adapter))
    dists = space.distributions()
    low, full = count_params(adapter, space.subnet(space.smallest())), count_params(adapter)

    def relative_sizes(spread):
        g = torch.Generator().manual_seed(0)
        draws = [space.sample(g, spread) for _ in range(300)]
        for params in draws:  # every draw is a point of the space
            assert all(dists[k].low <= v <= dists[k].high and (v - dists[k].low) % dists[k].step == 0
                       for k, v in params.items())
        return torch.tensor([(count_params(adapter, space.subnet(p)) - low) / (full - low) for p in draws])

    uniform, sized = relative_sizes(None), relative_sizes(0.2)
    # the sized draws reach both ends of the range, and spread far more evenly over it
    assert sized.min() < 0.05 and sized.max() > 0.95
    assert sized.std() > 1.5 * uniform.std()
    for lo in (0.0, 0.25, 0.5, 0.75):
        assert ((sized >= lo) & (sized < lo + 0.25)).float().mean() > 0.1


@pytest.mark.parametrize("tied", [True, False])
def test_ragged_extractions_of_every_decoder_reload_tied_or_not(tmp_path, decoder_family, tied):
    config = TINY_CONFIGS[decoder_family]()
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    space = SearchSpace("medium", get_adapter(model))
    g = torch.Generator().manual_seed(2)
    subnet = next(s for s in (space.subnet(space.sample(g)) for _ in range(50))
                  if len({len(h) for h in s.heads if h is not None} | {len(u) for u in s.units if u}) > 1
                  and s.kept_blocks)
    small = extract(model, subnet)
    assert hasattr(small.config, "slimformer_layer_shapes")
    path = save_model(small, tiny_tokenizer(), tmp_path / "m")
    ids = random_ids(2, 10)
    assert_close_scaled(outputs(load_model(str(path)).model, ids), outputs(small, ids))


def test_a_head_count_the_config_class_refuses_is_saved_as_layer_shapes(tmp_path):
    """Gemma 3 checks hidden % heads: 3 heads of a 32-wide model cannot be written as a stock config."""
    from transformers import Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    subnet = SearchSpace("small", get_adapter(model)).subnet({"blocks": 2, "heads": 3, "units": 40})
    small = extract(model, subnet)
    assert small.config.slimformer_layer_shapes[0]["heads"] == 3
    assert small.config.num_attention_heads == 4  # the shape blocks are cut from, one the class accepts
    path = save_model(small, tiny_tokenizer(), tmp_path / "g3")
    ids = random_ids(2, 10)
    assert_close_scaled(outputs(load_model(str(path)).model, ids), outputs(small, ids))
