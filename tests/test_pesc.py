"""PESC: upcycling is exact, the balancing loss is the Switch loss and moves the router, experts are grouped right, and the model loads again."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import assert_close_scaled, random_ids, tiny_model, tiny_tokenizer
from slimformer import load_model, save_model
from slimformer.cli import main
from slimformer.data import IGNORE, InstructionExample, tokenize_instructions
from slimformer.errors import SlimformerError
from slimformer.methods import InstructConfig, UpcycleConfig, apply
from slimformer.models import get_adapter
from slimformer.models.moe import export_remote_code, pesc_layers, upcycle
from slimformer.models.pesc_modeling import PescExperts, balancing_loss

GATED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


def _trained(model, seed: int = 1):
    """``model`` with random adapter ``up`` weights, so the experts change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mlp in pesc_layers(model).values():
            mlp.experts.up.copy_(torch.randn(mlp.experts.up.shape, generator=g) * 0.5)
    return model


@pytest.mark.parametrize("family", GATED)
def test_upcycled_model_computes_the_dense_function(family):
    dense = tiny_model(family)
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = dense(ids).logits
        model = upcycle(dense, experts=4, top_k=2, adapter_dim=8)
        got = model(ids).logits
    assert type(model).__name__ == "PescForCausalLM" and len(pesc_layers(model)) == 3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    prompt = ids[:1, :4]  # generation with the KV cache goes the same way
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False),
                       dense.generate(prompt, max_new_tokens=6, do_sample=False))


def test_only_chosen_blocks_are_upcycled_and_counts_follow():
    model = upcycle(tiny_model("llama"), experts=4, top_k=1, adapter_dim=8, layers=[1])
    assert list(pesc_layers(model)) == ["model.layers.1.mlp"]
    counts = model.parameter_counts()
    per_expert = 2 * 8 * 32  # down (8 × 32) + up (32 × 8)
    assert counts["total"] - counts["activated"] == (4 - 1) * per_expert


def test_experts_grouped_by_expert_equal_a_per_token_loop():
    torch.manual_seed(0)
    experts = PescExperts(hidden=16, experts=5, width=4, act="silu")
    torch.nn.init.normal_(experts.down)
    torch.nn.init.normal_(experts.up)
    f = torch.randn(37, 16)
    chosen = torch.stack([torch.randperm(5)[:2] for _ in range(37)])
    chosen[:10] = torch.tensor([3, 1])  # an expert that many tokens share, and expert 4 on few
    gates = torch.rand(37, 2).softmax(-1)
    slow = torch.zeros_like(f)
    for t in range(37):
        for j in range(2):
            e = chosen[t, j]
            slow[t] += gates[t, j] * (experts.up[e] @ torch.nn.functional.silu(experts.down[e] @ f[t]))
    assert_close_scaled(experts(f, chosen, gates), slow)


def test_balancing_loss_is_the_switch_loss_and_one_when_uniform():
    torch.manual_seed(0)
    logits = torch.randn(50, 4)
    chosen = logits.topk(2, -1).indices
    share = torch.tensor([(chosen == i).sum().item() for i in range(4)]) / chosen.numel()
    direct = 4 * sum(share[i] * logits.softmax(-1)[:, i].mean() for i in range(4))
    torch.testing.assert_close(balancing_loss(logits, chosen), direct)
    uniform = torch.zeros(8, 4)
    uniform_choice = torch.arange(16).reshape(8, 2) % 4  # every expert chosen equally often
    assert balancing_loss(uniform, uniform_choice).item() == pytest.approx(1.0)
    assert balancing_loss(logits, chosen).item() > 1.0  # any imbalance costs more


def test_balancing_loss_gives_the_router_a_gradient_towards_balance():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    router = torch.zeros(4, 8, requires_grad=True)
    with torch.no_grad():
        router[0] += x.mean(0) * 4  # expert 0 wins most tokens
    logits = x @ router.t()
    chosen = logits.topk(2, -1).indices
    balancing_loss(logits, chosen).backward()
    assert router.grad.abs().sum() > 0
    with torch.no_grad():  # one step down the gradient gives expert 0 less probability
        after = (x @ (router - 0.5 * router.grad).t()).softmax(-1)[:, 0].mean()
    assert after < logits.softmax(-1)[:, 0].mean()
    # The reference's version softmaxes only the chosen logits and averages them: constant 1/k, no gradient.
    router.grad = None
    logits = x @ router.t()
    reference = logits.topk(2, -1).values.softmax(-1).mean()
    reference.backward()
    assert reference.item() == pytest.approx(0.5) and router.grad.abs().max() < 1e-7


def test_save_load_round_trip_and_remote_code(tmp_path):
    model = _trained(upcycle(tiny_model("qwen2"), experts=4, top_k=2, adapter_dim=8, z_loss=0.001))
    ids = random_ids(2, 12)
    with torch.no_grad():
        expected = model(ids).logits
    path = save_model(model, tiny_tokenizer(), tmp_path / "pesc")
    loaded = load_model(str(path))
    assert type(loaded.model).__name__ == "PescForCausalLM" and loaded.adapter.family.name == "qwen2"
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, expected)
    export_remote_code(path)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "slimformer_pesc" and "AutoModelForCausalLM" in config["auto_map"]
    # stock transformers, without slimformer imported, loads it through the exported modeling file
    code = (f"import sys, torch; from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()\n"
            f"assert 'slimformer' not in sys.modules, 'slimformer was imported'\n"
            f"ids = torch.tensor({ids.tolist()})\n"
            f"print(type(m).__name__, repr(m(ids).logits.flatten().tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[0] == "PescForCausalLM"
    assert_close_scaled(torch.tensor(eval(out[1])).reshape(expected.shape), expected)  # another process: its own threads


@pytest.mark.parametrize("kwargs, message", [
    (dict(experts=2, top_k=3), "top_k must be between 1 and the number of experts (2), not 3"),
    (dict(adapter_dim=0), "adapter width must be at least 1, not 0"),
    (dict(layers=[5]), "layers must be block indices in [0, 3)"),
])
def test_bad_upcycling_settings_are_refused(kwargs, message):
    with pytest.raises(SlimformerError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        upcycle(tiny_model("llama"), **kwargs)


def test_a_family_without_gated_ffn_is_refused():
    with pytest.raises(SlimformerError, match="PESC upcycles gated FFNs"):
        upcycle(tiny_model("gpt2"))


def _examples(n: int, seed: int = 0) -> list[InstructionExample]:
    """Random instructions of words w1..w59, each answered by one fixed sentence: a pattern LoRA learns in a few steps."""
    g = torch.Generator().manual_seed(seed)
    return [InstructionExample(" ".join(f"w{w}" for w in torch.randint(1, 60, (6,), generator=g).tolist()), "",
                               "w70 w71 w72 w73 w74 w75") for _ in range(n)]


def test_instruction_labels_cover_the_response_only():
    tok = tiny_tokenizer()
    example = InstructionExample("w5 w6", "w7", "w70 w71 w72")
    ids, labels = tokenize_instructions(tok, [example, example])
    assert ids.shape == labels.shape
    half = ids.shape[0] // 2
    scored = ids[:half][labels[:half] != IGNORE].tolist()
    assert scored[:3] == [70, 71, 72] and labels[:half][ids[:half] == 5].tolist() == [IGNORE]
    assert torch.equal(ids[:half], ids[half:])  # packed one after another


def test_instruct_trains_experts_in_full_and_lora_merged():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, UpcycleConfig(experts=4, top_k=2, adapter_dim=8), random_ids(4, 32))
    assert type(adapter.model).__name__ == "PescForCausalLM"
    samples = tokenize_instructions(tiny_tokenizer(), _examples(400))
    result = apply(adapter, InstructConfig(tokens=6000, seqlen=32, batch_size=4, heldout=8, eval_every=10,
                                           lr=1e-2, patience=0), samples)
    s = result.summary
    assert s["heldout_after"] < s["heldout_before"] - 0.5
    assert s["merged_modules"] == 3 * 7  # q, k, v, o, gate, up, down in each block, merged back
    assert not any("lora" in n for n, _ in adapter.model.named_parameters())
    assert all(m.experts.up.abs().max() > 0 for m in pesc_layers(adapter.model).values())  # trained in full
    assert s["balancing_loss_first"] >= 1.0 - 1e-6
    assert set(s["routing_entropy"]) == set(pesc_layers(adapter.model))


def _entropy(chosen: torch.Tensor, n: int) -> float:
    p = torch.bincount(chosen.reshape(-1), minlength=n).double() / chosen.numel()
    return float(-(p[p > 0] * p[p > 0].log()).sum())


def test_whitened_router_spreads_tokens_that_an_outlier_channel_sends_to_one_expert():
    from slimformer.methods.pesc import whitened_router

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 64, generator=g, dtype=torch.float64)
    x[:, 3] = 40 + 4 * x[:, 3]  # an LLM-like outlier channel: large, nearly constant, always positive
    mean, std = x.mean(0), x.std(0)
    random = torch.randn(8, 64, generator=g, dtype=torch.float64) * 0.02
    w = whitened_router(mean, std, 8, 0.02, torch.Generator().manual_seed(1))
    assert _entropy((x @ random.T).topk(2, -1).indices, 8) < 0.8 * torch.log(torch.tensor(8.0))
    assert _entropy((x @ w.T).topk(2, -1).indices, 8) > 0.97 * torch.log(torch.tensor(8.0))
    assert (w @ mean).abs().max() < 1e-9 * (w.norm() * mean.norm())  # no expert gets a constant head start
    spread = (x @ w.T).std(0)  # every expert's logits spread like an N(0, 0.02²) router's would
    target = 0.02 * x.pow(2).sum(1).mean().sqrt()
    torch.testing.assert_close(spread, torch.full_like(spread, float(target)), rtol=0.1, atol=0)


def test_data_router_start_keeps_the_dense_function_and_centres_each_router_on_its_inputs():
    dense = tiny_model("llama")
    adapter = get_adapter(dense)
    samples = random_ids(4, 32)
    with torch.no_grad():
        expected = dense(samples).logits
    result = apply(adapter, UpcycleConfig(experts=4, top_k=2, adapter_dim=8), samples)
    assert result.summary["router_init"] == "data"
    inputs = {}
    hooks = [m.router.register_forward_pre_hook(lambda mod, a, n=n: inputs.setdefault(n, a[0].reshape(-1, 32)))
             for n, m in pesc_layers(adapter.model).items()]
    with torch.no_grad():
        assert_close_scaled(adapter.model(samples).logits, expected, 1e-6)
    for h in hooks:
        h.remove()
    for name, mlp in pesc_layers(adapter.model).items():
        w, mean = mlp.router.weight.double(), inputs[name].double().mean(0)
        assert (w @ mean).abs().max() < 1e-4 * w.norm() * mean.norm()
    with pytest.raises(SlimformerError, match="router_init 'data' sets the routers from calibration samples"):
        apply(get_adapter(tiny_model("llama")), UpcycleConfig(), None)
    with pytest.raises(SlimformerError, match="router_init must be one of data, random"):
        UpcycleConfig(router_init="kmeans")


def test_instruct_refuses_plain_token_ids():
    with pytest.raises(SlimformerError, match=r"instruct needs instruction data tokenised as \(ids, labels\)"):
        apply(get_adapter(tiny_model("llama")), InstructConfig(tokens=100), random_ids(1, 400))


def test_upcycle_command_writes_a_loadable_model(saved_tiny, tmp_path, capsys):
    path, text = saved_tiny
    out = tmp_path / "pesc"
    code = main(["upcycle", str(path), "--experts", "4", "--top-k", "2", "--adapter-dim", "8", "--ppl-windows", "0",
                 "--calib", str(text), "--nsamples", "2", "--calib-seqlen", "64", "--export-remote-code", "--out", str(out)])
    assert code == 0
    assert (out / "modeling_pesc.py").is_file()
    loaded = load_model(str(out))
    assert loaded.model.config.num_experts == 4 and loaded.model.config.adapter_dim == 8
    assert "activated" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--top-k", "9"], "top_k must be between 1 and the number of experts (8), not 9"),
    (["--adapter-dim", "0"], "adapter width must be at least 1, not 0"),
])
def test_upcycle_command_bad_input_is_one_line(saved_tiny, tmp_path, capsys, args, message):
    path, _ = saved_tiny
    assert main(["upcycle", str(path), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x").exists()




def test_recipe_upcycles_tunes_resumes_and_reloads(saved_tiny, tmp_path, monkeypatch):
    import slimformer.recipes as recipes
    from slimformer.recipes import Calibration, Measure, Recipe, run_recipe

    path, _ = saved_tiny
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": e.instruction, "instances": [{"input": "", "output": e.response}]})
                              for e in _examples(120)))
    recipe = Recipe(steps=(UpcycleConfig(experts=4, top_k=2, adapter_dim=8),
                           InstructConfig(data=f"self-instruct:{data}", tokens=800, seqlen=32, batch_size=2, heldout=2,
                                          eval_every=2, lora_rank=4)),
                    model=str(path), calibration=Calibration(), measure=Measure(ppl_windows=0, speed=False))
    clean = run_recipe(recipe, tmp_path / "clean", progress=False)
    assert [s["result"]["method"] for s in clean["steps"]] == ["pesc", "instruct"]
    page = (tmp_path / "clean" / "report.html").read_text()
    assert "Routing per expert" in page and "Recovery training" in page  # the routing heat map and the loss curves
    calls, real = [], recipes._run_step

    def flaky(ctx, index, step):
        calls.append(index)
        if index == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt  # Ctrl-C during instruction tuning
        return real(ctx, index, step)

    monkeypatch.setattr(recipes, "_run_step", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out, progress=False)
    run_recipe(recipe, out, progress=False)  # resumes from the saved PESC model
    assert calls == [0, 1, 1]
    a, b = load_model(str(tmp_path / "clean")), load_model(str(out))
    assert type(b.model).__name__ == "PescForCausalLM"
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_flops_count_the_router_and_the_routed_adapters_only():
    from slimformer.evaluation.cost import flops_per_token

    dense = tiny_model("llama")
    before = flops_per_token(dense, 16)
    model = upcycle(dense, experts=4, top_k=2, adapter_dim=8)
    per_block = 2 * 4 * 32 + 2 * 2 * (2 * 8 * 32)  # router (4 × 32), then 2 adapters of down 8 × 32 and up 32 × 8
    assert flops_per_token(model, 16) == before + 3 * per_block


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_qwen2_moe_layout_is_exact_and_stock(family, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    dense = tiny_model(family)
    adapter = get_adapter(dense)
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = dense(ids).logits
    result = apply(adapter, UpcycleConfig(layout="qwen2_moe", experts=4, top_k=2, adapter_dim=8), random_ids(4, 16))
    model = adapter.model
    assert type(model) is Qwen2MoeForCausalLM and adapter.family.name == "qwen2_moe"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-6)
    idle = 3 * (4 - 2) * 3 * 8 * 32  # per block: 2 idle experts of gate, up (8 × 32) and down (32 × 8)
    assert result.summary["params"] - result.summary["activated_params"] == idle
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "m")(ids).logits, expected,
                                   rtol=0, atol=1e-6)


def test_qwen2_moe_layout_tunes_its_experts_and_shared_expert():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, UpcycleConfig(layout="qwen2_moe", experts=4, top_k=2, adapter_dim=8), random_ids(4, 32))
    shared_before = adapter.model.model.layers[0].mlp.shared_expert.up_proj.weight.clone()
    samples = tokenize_instructions(tiny_tokenizer(), _examples(400))
    s = apply(adapter, InstructConfig(tokens=6000, seqlen=32, batch_size=4, heldout=8, eval_every=10, lr=1e-2,
                                      patience=0), samples).summary
    mlp = adapter.model.model.layers[0].mlp
    assert s["heldout_after"] < s["heldout_before"] - 0.5 and s["moe"] and s["aux_loss"] == 0.01
    assert mlp.experts.down_proj.abs().max() > 0  # routed experts trained in full
    assert not torch.equal(mlp.shared_expert.up_proj.weight, shared_before)  # LoRA merged into the shared expert
    assert s["merged_modules"] == 3 * (4 + 3)


def test_qwen2_moe_layout_refuses_other_blocks():
    with pytest.raises(SlimformerError, match="the Qwen2-MoE layout reproduces llama, mistral, qwen2 blocks exactly"):
        apply(get_adapter(tiny_model("gemma")), UpcycleConfig(layout="qwen2_moe"), random_ids(2, 16))


def test_instruction_loss_is_the_mean_response_token_loss(tmp_path):
    from slimformer.data.instructions import tokenize_example
    from slimformer.evaluation import instruction_loss

    data = tmp_path / "tasks.jsonl"
    examples = _examples(5)
    data.write_text("\n".join(json.dumps({"instruction": e.instruction, "instances": [{"input": "w9", "output": e.response}]})
                              for e in examples))
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = instruction_loss(model, tok, f"self-instruct:{data}", progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids, labels = tokenize_example(tok, InstructionExample(e.instruction, "w9", e.response))
            n = sum(1 for x in labels[1:] if x != IGNORE)
            total += model(torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            count += n
    assert got["examples"] == 5 and got["tokens"] == count
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)


def test_instruct_over_a_quantized_base_keeps_it_quantized_and_upcycling_it_is_refused():
    from slimformer.methods import RTNConfig
    from slimformer.models.quantized import is_quantized

    model = tiny_model("llama")
    adapter = get_adapter(model)
    apply(adapter, RTNConfig(bits=4, group_size=16), None)
    samples = tokenize_instructions(tiny_tokenizer(), _examples(400))
    s = apply(adapter, InstructConfig(tokens=6000, seqlen=32, batch_size=4, heldout=8, eval_every=10, lr=1e-2,
                                      patience=0), samples).summary
    assert is_quantized(adapter.model) and s["heldout_requantized"] < s["heldout_before"] - 0.3
    with pytest.raises(SlimformerError, match="upcycle before quantizing"):
        apply(adapter, UpcycleConfig(), random_ids(2, 16))


def test_upcycle_command_writes_a_stock_qwen2_moe(saved_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = saved_tiny
    out = tmp_path / "q"
    assert main(["upcycle", str(path), "--layout", "qwen2_moe", "--experts", "4", "--adapter-dim", "8",
                 "--ppl-windows", "0", "--router-init", "random", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, no remote code
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts == 4
