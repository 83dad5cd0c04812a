"""Recipes: YAML round trip and errors, a recipe equals its methods in a row, interrupted runs resume."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import slimformer.recipes as recipes
from conftest import tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model
from slimformer.cli import main
from slimformer.methods import (AWQConfig, DistillConfig, ExpertMergeConfig, ExpertPruneConfig, FinetuneConfig, GPTQConfig, InstructConfig, LoRAConfig,
                                MagnitudeConfig, RTNConfig, SLEBConfig, SparseGPTConfig, UpcycleConfig, WandaConfig, WidthConfig,
                                apply)
from slimformer.models import LoadedModel
from slimformer.recipes import STEPS, EvalConfig, Recipe, load_recipe, parse_recipe, run_recipe

EXAMPLES = {
    "magnitude": MagnitudeConfig(sparsity=0.3, pattern="2:4", targets=("q_proj",), rounds=2, finetune_steps=3),
    "wanda": WandaConfig(sparsity=0.4, ignore=("re:.*k_proj",), propagate="dense", batch_size=2),
    "sparsegpt": SparseGPTConfig(sparsity=0.5, blocksize=64, percdamp=0.02),
    "sleb": SLEBConfig(ratio=0.25, criterion="oneshot", protect=(0,), cache_gib=0.1),
    "finetune": FinetuneConfig(steps=7, lr=3e-4, seqlen=64, data="text:t.txt"),
    "distill": DistillConfig(tokens=5000, teacher="t", loss="js", top_k=8, hidden_weight=0.5, lora_targets=("q",)),
    "lora": LoRAConfig(lora_rank=4, kd_weight=1.0, ce_weight=0.0, masked_merge=False, cache="/tmp/c"),
    "rtn": RTNConfig(bits=8, mse=True, head=True, embedding=True),
    "gptq": GPTQConfig(bits=4, group_size=16, act_order=True, ignore=("re:.*down_proj",), percdamp=0.05),
    "awq": AWQConfig(bits=4, group_size=-1, symmetric=False, then="gptq", grid=10, clip=False),
    "pesc": UpcycleConfig(experts=4, top_k=1, adapter_dim=16, layers=(0, 2), aux_loss=0.02, z_loss=0.001),
    "instruct": InstructConfig(data="self-instruct", tokens=5000, lora_rank=8, aux_loss=0.0, schedule="cosine"),
    "expert-prune": ExpertPruneConfig(keep=4, criterion="output", max_tokens=512, propagate="dense"),
    "expert-merge": ExpertMergeConfig(ratio=0.25),
    "width": WidthConfig(keep=0.7, heads=False, align=16, importance_batches=2),
    "eval": EvalConfig(ppl="wikitext2:valid", windows=3, tasks=("piqa", "boolq"), limit=5),
}


def test_every_step_type_has_an_example():
    assert set(EXAMPLES) == set(STEPS)


@pytest.mark.parametrize("method", sorted(EXAMPLES))
def test_yaml_round_trip(method):
    recipe = Recipe(steps=(EXAMPLES[method],), model="some/model", seed=3,
                    calibration=recipes.Calibration("text:x.txt", 4, 16), measure=recipes.Measure(ppl_windows=0))
    assert parse_recipe(recipe.to_yaml()) == recipe
    assert load_recipe(recipe.to_dict()) == recipe


@pytest.mark.parametrize("text, message", [
    ("steps:\n  - {method: wanda, sparsity: 0.5}\n  - {method: wandaa}\n", "<recipe>:3: unknown method 'wandaa'; did you mean 'wanda'?"),
    ("steps:\n  - method: wanda\n    sparsty: 0.5\n", "<recipe>:3: unknown field 'sparsty' for wanda; did you mean 'sparsity'?"),
    ("stpes:\n  - {method: wanda}\n", "<recipe>:1: unknown recipe key 'stpes'; did you mean 'steps'?"),
    ("steps:\n  - {method: wanda, sparsity: 1.5}\n", "<recipe>:2: sparsity must be in [0, 1)"),
    ("calibration: {nsample: 4}\nsteps:\n  - {method: wanda}\n", "<recipe>:1: unknown field 'nsample'"),
    ("steps: []\n", "non-empty list of steps"),
    ("steps:\n  - {sparsity: 0.5}\n", "<recipe>:2: step 1 needs a 'method'"),
    ("steps: [\n", "not valid YAML"),
])
def test_invalid_recipes_name_the_line(text, message):
    with pytest.raises(SlimformerError) as e:
        parse_recipe(text)
    assert message in str(e.value)


def tiny_recipe(tmp_path, steps):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 128}" for i in range(600)))
    return Recipe(steps=tuple(steps), model="unused", seed=1, calibration=recipes.Calibration(f"text:{text}", 4, 16),
                  measure=recipes.Measure(ppl_windows=0, speed=False, prefill_tokens=16, repeats=1))


def loaded_tiny():
    model = tiny_model("llama")
    return LoadedModel(model, tiny_tokenizer(), get_adapter(model), "tiny")


def test_recipe_equals_its_methods_one_after_another(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "load_text", lambda s: open(s.removeprefix("text:")).read()
                        if s.startswith("text:") else " ".join(f"w{i % 128}" for i in range(300)))
    steps = [SLEBConfig(blocks=1, protect=()), WandaConfig(sparsity=0.5)]
    recipe = tiny_recipe(tmp_path, steps)
    import slimformer

    compressed, report = slimformer.compress(loaded_tiny(), recipe, progress=False)
    manual = loaded_tiny()
    samples = recipes._Context(recipe, manual, False).samples
    for step in steps:
        apply(manual.adapter, step, samples)
    for (name, a), (_, b) in zip(compressed.model.state_dict().items(), manual.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert len(report["steps"]) == 2 and report["steps"][1]["after"]["nonzero_params"] < report["before"]["nonzero_params"]


@pytest.fixture
def saved_recipe(saved_tiny, tmp_path):
    path, text = saved_tiny
    recovery = DistillConfig(steps=3, lr=1e-3, data=f"text:{text}", seqlen=16, batch_size=2, heldout=2, eval_every=2,
                             hidden_weight=0.5, ce_weight=0.5)  # the teacher: the recipe's model
    recipe = Recipe(steps=(MagnitudeConfig(sparsity=0.3), WandaConfig(sparsity=0.5), recovery),
                    model=str(path), seed=0, calibration=recipes.Calibration(f"text:{text}", 4, 16),
                    measure=recipes.Measure(ppl_windows=0, speed=True, prefill_tokens=24, new_tokens=4, repeats=1))
    return recipe


def weights(folder):
    return load_file(next(folder.glob("*.safetensors")))


def test_interrupted_run_resumes_after_the_last_finished_step(saved_recipe, tmp_path, monkeypatch):
    clean = run_recipe(saved_recipe, tmp_path / "clean", progress=False)
    assert (tmp_path / "clean" / "report.html").exists() and not recipes.work_folder(tmp_path / "clean").exists()
    calls = []
    real = recipes._run_step

    def flaky(ctx, index, step):
        calls.append(index)
        if index == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt  # Ctrl-C in the middle of step 2
        return real(ctx, index, step)

    monkeypatch.setattr(recipes, "_run_step", flaky)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(saved_recipe, out, progress=False)
    assert not out.exists()  # never half-written
    assert json.loads((recipes.work_folder(out) / "state.json").read_text())["done"] == 1
    run_recipe(saved_recipe, out, progress=False)
    assert calls == [0, 1, 1, 2]  # step 1 was not redone
    a, b = weights(tmp_path / "clean"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((out / "run.json").read_text())
    assert [s["result"]["method"] for s in summary["steps"]] == ["magnitude", "wanda", "distill"]
    assert summary["steps"][2]["result"]["config"]["teacher"] == saved_recipe.model
    assert summary["steps"][1]["after"]["nonzero_params"] < summary["before"]["nonzero_params"]
    exact = lambda s: {r["metric"]: r.get("after") for r in s["before_after"]  # noqa: E731
                       if r["key"] in ("params", "nonzero_params", "sparsity")}
    assert exact(summary) == exact(clean) and len(exact(clean)) == 3
    # Stock transformers loads the result.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


def test_existing_output_and_invalid_recipe_fail_before_any_work(saved_recipe, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(SlimformerError, match="exists"):
        run_recipe(saved_recipe, out, progress=False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - {method: sleb, ratio: 2}\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "bad.yaml:2: ratio must be in (0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "never").exists() and not recipes.work_folder(tmp_path / "never").exists()


def test_cli_run_prints_the_report_figures(saved_recipe, tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(dataclasses.replace(saved_recipe, steps=saved_recipe.steps[:2]).to_yaml())
    assert main(["run", str(recipe_file), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    rows = {r["metric"]: r for r in report["before_after"]}
    assert "parameters (non-zero)" in rows and "decode tokens/s" in rows
    for row in rows.values():
        assert row["metric"] in printed
    assert f"{rows['parameters (non-zero)']['after'] / 1e6:.1f} M" in printed
    assert str(tmp_path / "o" / "report.html") in printed.replace("\n", "")
    assert load_model(str(tmp_path / "o")).model is not None


def test_bundled_recipes_parse_and_yaml_floats_are_numbers():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert files and all(load_recipe(f).steps for f in files)
    assert parse_recipe("steps:\n  - {method: finetune, lr: 1e-4}\n").steps[0].lr == 1e-4
    with pytest.raises(SlimformerError, match="<recipe>:2: lr must be a number, not 'fast'"):
        parse_recipe("steps:\n  - {method: finetune, lr: fast}\n")


def test_sleb_then_wanda_2_4_then_gptq_int4_runs_saves_and_reloads(saved_tiny, tmp_path):
    """The chain of the quantization protocol: fewer blocks, a 2:4 pattern, int4 codes; stock loading keeps all three."""
    from slimformer.models.quantized import quantized_modules

    path, text = saved_tiny
    recipe = Recipe(steps=(SLEBConfig(blocks=1, protect=()), WandaConfig(pattern="2:4"),
                           GPTQConfig(bits=4, group_size=16)),
                    model=str(path), seed=0, calibration=recipes.Calibration(f"text:{text}", 4, 16),
                    measure=recipes.Measure(ppl_windows=0, speed=True, prefill_tokens=24, new_tokens=4, repeats=1,
                                            generations=2, generation_tokens=5))
    summary = run_recipe(recipe, tmp_path / "out", progress=False)
    assert [set(g) for g in summary["generations"]] == [{"prompt", "original", "compressed"}] * 2
    assert "Greedy generations side by side" in (tmp_path / "out" / "report.html").read_text()
    model = load_model(str(tmp_path / "out")).model
    assert model.config.num_hidden_layers == 2 and len(quantized_modules(model)) == 14
    for name, module in quantized_modules(model).items():
        W = module.dequantized()
        assert ((W.view(W.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name
    sizes = [s["after"]["size_bytes"] for s in summary["steps"]]
    assert set(sizes[2]) == {"quantized"} and sizes[2]["quantized"] < sizes[1]["dense"]


def test_a_quantized_model_trained_in_float_is_quantized_afresh(saved_tiny, tmp_path):
    """The recipe the recovery benchmark recommends for int4: GPTQ, fine-tuning with ``regrid: false``, GPTQ again."""
    from slimformer.models.quantized import quantized_modules

    path, text = saved_tiny
    recipe = parse_recipe(f"""
model: {path}
calibration: {{source: "text:{text}", nsamples: 4, seqlen: 16}}
measure: {{ppl_windows: 0, speed: false}}
steps:
  - {{method: gptq, bits: 4, group_size: 16}}
  - {{method: finetune, steps: 2, seqlen: 16, batch_size: 2, heldout: 2, eval_every: 1, data: "text:{text}", regrid: false}}
  - {{method: gptq, bits: 4, group_size: 16}}
""")
    summary = run_recipe(recipe, tmp_path / "out", progress=False)
    trained = summary["steps"][1]["result"]["summary"]
    assert "heldout_float" in trained and "heldout_requantized" not in trained
    assert set(summary["steps"][1]["after"]["size_bytes"]) == {"dense"}  # float between the two quantizations
    assert len(quantized_modules(load_model(str(tmp_path / "out")).model)) == 3 * 7  # every projection of 3 blocks
