"""Expert pruning and merging: routing renormalises, the most used or least missed experts stay, groups merge by frequency, and stock transformers reloads the result."""

import copy

import pytest
import torch

from conftest import MOE_FAMILIES, random_ids, tiny_model, tiny_moe
from slimformer.errors import SlimformerError
from slimformer.methods import ExpertMergeConfig, ExpertPruneConfig, apply
from slimformer.methods.experts import greedy_output_removal, similarity_groups
from slimformer.models import get_adapter
from slimformer.models.moe import keep_experts, merge_experts, moe_modules, router_weight, upcycle


def test_kept_experts_route_as_before_for_tokens_that_only_used_them():
    model = tiny_moe("mixtral")
    block = moe_modules(model)["model.layers.0.mlp"]
    x = torch.randn(1, 200, 32)
    with torch.no_grad():
        before = block(x)[0]
        chosen = (x[0] @ router_weight(block).t()).topk(2, -1).indices
        keep_experts(block, [0, 2, 3, 5])
        after = block(x)[0]
    only_kept = ~torch.isin(chosen, torch.tensor([1, 4])).any(-1)
    assert 20 < only_kept.sum() < 200  # some tokens lost an expert, some did not
    torch.testing.assert_close(after[only_kept], before[only_kept], rtol=1e-5, atol=1e-6)  # Mixtral renormalises top-k
    assert not torch.allclose(after[~only_kept], before[~only_kept])


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("config", [ExpertPruneConfig(keep=3), ExpertPruneConfig(ratio=0.5, criterion="output"),
                                    ExpertMergeConfig(keep=3)], ids=["frequency", "output", "merge"])
def test_fewer_experts_reload_with_stock_transformers(family, config, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_moe(family)
    result = apply(get_adapter(model), config, random_ids(4, 16))
    assert result.summary["experts_before"] == 6 and result.summary["experts_after"] == 3
    assert result.summary["params_after"] < result.summary["params_before"]
    assert all(router_weight(m).shape[0] == 3 for m in moe_modules(model).values())
    ids = random_ids(2, 12, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(again) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=0, atol=0)


def test_frequency_pruning_keeps_the_experts_the_model_routes_to_most():
    model = tiny_moe("qwen3_moe")
    samples = random_ids(4, 16)
    counts = {}

    def count(name):
        def hook(module, args, out):
            counts[name] = counts.get(name, 0) + torch.bincount(out[2].reshape(-1), minlength=6)
        return hook

    handles = [m.gate.register_forward_hook(count(n)) for n, m in moe_modules(model).items()]
    with torch.no_grad():
        model(samples)
    for h in handles:
        h.remove()
    result = apply(get_adapter(model), ExpertPruneConfig(keep=2, propagate="dense"), samples)
    for name, c in counts.items():
        top = sorted(sorted(range(6), key=lambda e: (-int(c[e]), e))[:2])
        assert result.layers[name]["kept"] == top


def test_greedy_output_removal_takes_the_least_missed_expert_first():
    block = moe_modules(tiny_moe("olmoe"))["model.layers.1.mlp"]
    x = torch.randn(64, 32)
    with torch.no_grad():
        reference = block(x[None])[0]
        errors = []
        for e in range(6):
            trial = copy.deepcopy(block)
            keep_experts(trial, [i for i in range(6) if i != e])
            errors.append(float((trial(x[None])[0] - reference).pow(2).sum()))
        kept, steps = greedy_output_removal(block, x, keep=5)
    assert [i for i in range(6) if i not in kept] == [min(range(6), key=errors.__getitem__)]
    assert steps[0] == pytest.approx(min(errors) / float(reference.pow(2).sum()), rel=1e-5)


def test_similar_experts_join_the_most_used_centres_and_average_by_frequency():
    torch.manual_seed(0)
    base = torch.randn(2, 10, 4)
    outputs = torch.stack([base[0], base[1], base[0] + 0.01 * torch.randn(10, 4), base[1] + 0.01 * torch.randn(10, 4)])
    frequency = torch.tensor([0.4, 0.3, 0.2, 0.1])
    assert similarity_groups(outputs, frequency, keep=2) == [[0, 2], [1, 3]]
    block = moe_modules(tiny_moe("mixtral"))["model.layers.0.mlp"]
    keep_experts(block, [0, 1, 2, 3])
    before = {n: p.detach().clone() for n, p in block.named_parameters()}
    merge_experts(block, [[0, 2], [1, 3]], frequency)
    expected = (0.4 * before["experts.down_proj"][0] + 0.2 * before["experts.down_proj"][2]) / 0.6
    torch.testing.assert_close(block.experts.down_proj[0], expected)
    assert torch.equal(block.gate.weight, before["gate.weight"][[0, 1]])  # the centres' router rows


def test_pesc_experts_prune_and_reload(tmp_path):
    from slimformer import load_model, save_model
    from conftest import tiny_tokenizer

    model = upcycle(tiny_model("llama"), experts=4, top_k=2, adapter_dim=8)
    with torch.no_grad():
        for m in moe_modules(model).values():
            m.experts.up.normal_()
    adapter = get_adapter(model)
    apply(adapter, ExpertMergeConfig(keep=2), random_ids(4, 16))
    assert model.config.num_experts == 2 and model.parameter_counts()["total"] == model.parameter_counts()["activated"]
    ids = random_ids(2, 12, seed=1)
    with torch.no_grad():
        expected = model(ids).logits
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load_model(str(path)).model(ids).logits, expected)


@pytest.mark.parametrize("config, message", [
    (dict(keep=2, ratio=0.5), "give the experts to keep per block (keep) or the fraction to remove (ratio), not both"),
    (dict(ratio=1.5), "ratio must be in (0, 1), not 1.5"),
    (dict(keep=1), "cannot keep 1 experts: every token is routed to 2"),
])
def test_bad_expert_counts_are_refused(config, message):
    with pytest.raises(SlimformerError) as e:
        apply(get_adapter(tiny_moe("mixtral")), ExpertPruneConfig(**config), random_ids(2, 8))
    assert message in str(e.value)


def test_a_dense_model_is_refused():
    with pytest.raises(SlimformerError, match="expert-prune needs a mixture-of-experts model; llama has no MoE blocks"):
        apply(get_adapter(tiny_model("llama")), ExpertPruneConfig(keep=2), random_ids(2, 8))


def test_experts_command_prunes_a_saved_moe_and_refuses_a_dense_one(saved_tiny, tmp_path, capsys):
    from conftest import tiny_tokenizer
    from slimformer import load_model, save_model
    from slimformer.cli import main

    dense, text = saved_tiny
    moe = save_model(tiny_moe("qwen2_moe"), tiny_tokenizer(), tmp_path / "moe")
    common = ["--calib", f"text:{text}", "--nsamples", "4", "--seqlen", "16"]
    assert main(["experts", str(moe), "--method", "merge", "--keep", "4", *common, "--out", str(tmp_path / "o")]) == 0
    assert "6 → 4 experts in 2 MoE blocks" in capsys.readouterr().out
    assert load_model(str(tmp_path / "o")).model.config.num_experts == 4
    assert "Routing per expert" in (tmp_path / "o" / "report.html").read_text()
    assert main(["experts", str(dense), "--keep", "2", *common, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a mixture-of-experts model; llama has no MoE blocks" in err[0]
    assert not (tmp_path / "d").exists()
