"""Width pruning as a step: cuts to the parameter budget, keeps the important units, aligns widths, and loads again."""

import pytest
import torch

from conftest import random_ids, tiny_model, tiny_tokenizer
from slimformer import load_model, save_model
from slimformer.errors import SlimformerError
from slimformer.methods import RTNConfig, WidthConfig, apply
from slimformer.models import get_adapter
from slimformer.models.surgery import block_shape
from slimformer.search.importance import lm_loss, mask_gradient_importance
from slimformer.search.space import SearchSpace, count_params
from slimformer.search.structural import importance_prune


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "opt"])
def test_width_cuts_to_the_budget_and_reloads(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    total = count_params(adapter)
    result = apply(adapter, WidthConfig(keep=0.8), random_ids(4, 16))
    s = result.summary
    assert s["params_before"] == total and s["params_after"] == sum(p.numel() for p in model.parameters())
    assert 0.7 < s["kept"] <= 0.8  # the bisection lands just under the budget, one head or unit at a time
    assert s["heads_kept"] < 1 or s["units_kept"] < 1
    ids = random_ids(2, 12, seed=3)
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tiny_tokenizer(), tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "m")).model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_width_keeps_the_units_that_move_the_loss():
    samples = random_ids(8, 16)
    model = tiny_model("llama")
    adapter = get_adapter(model)
    planted = [3, 7, 11, 20, 30, 41]  # units whose outputs are 30× larger: they matter most to the loss
    with torch.no_grad():
        for block in adapter.blocks:
            adapter.linears(block)["down"].weight[:, planted] *= 30
    importance = mask_gradient_importance(adapter, list(samples.split(1)), lm_loss, progress=False)
    best = importance_prune(SearchSpace("large", adapter, importance), 0.75, heads=False)
    apply(adapter, WidthConfig(keep=0.75, heads=False), samples)
    kept = [block_shape(adapter, b)["intermediate"] for b in adapter.blocks]
    assert kept == [len(u) for u in best.units] and max(kept) < 48  # the step cuts to the same sub-network
    assert all(set(planted) <= set(u) for u in best.units)
    for block in adapter.blocks:  # the planted columns of down_proj survived the cut
        assert int((adapter.linears(block)["down"].weight.norm(dim=0) > 1.0).sum()) == len(planted)


def test_aligned_unit_counts_leave_heads_and_fit_a_quantizer_group():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    heads = [block_shape(adapter, b)["heads"] for b in adapter.blocks]
    s = apply(adapter, WidthConfig(keep=0.7, heads=False, align=16), random_ids(4, 16)).summary
    shapes = [block_shape(adapter, b) for b in adapter.blocks]
    assert [x["heads"] for x in shapes] == heads and s["heads_kept"] == 1
    assert all(x["intermediate"] % 16 == 0 and 16 <= x["intermediate"] < 48 for x in shapes)
    apply(adapter, RTNConfig(bits=4, group_size=16), None)  # every down_proj input width is a multiple of the group


def test_width_refuses_bad_input():
    with pytest.raises(SlimformerError, match=r"keep is the fraction of the parameters kept and must be in \(0, 1\]"):
        WidthConfig(keep=0)
    with pytest.raises(SlimformerError, match="bert is an encoder"):
        apply(get_adapter(tiny_model("bert")), WidthConfig(), random_ids(2, 8))
    with pytest.raises(SlimformerError, match="width ranks heads and units on calibration samples"):
        apply(get_adapter(tiny_model("llama")), WidthConfig(), None)


def test_recipe_with_a_width_step_writes_a_model_that_loads(saved_tiny, tmp_path):
    from slimformer.recipes import Calibration, Measure, Recipe, run_recipe

    path, text = saved_tiny
    recipe = Recipe(steps=(WidthConfig(keep=0.7, heads=False, align=16), RTNConfig(bits=4, group_size=16)),
                    model=str(path), calibration=Calibration(f"text:{text}", 4, 16),
                    measure=Measure(ppl_windows=0, speed=False))
    summary = run_recipe(recipe, tmp_path / "out", progress=False)
    assert [s["result"]["method"] for s in summary["steps"]] == ["width", "rtn"]
    loaded = load_model(str(tmp_path / "out"))
    widths = [block_shape(loaded.adapter, b)["intermediate"] for b in loaded.adapter.blocks]
    assert all(w % 16 == 0 and w < 48 for w in widths)
    assert (tmp_path / "out" / "report.html").exists()
