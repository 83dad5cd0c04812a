"""`slimformer auto`: targets, the cross-method search on a problem with a known front, and an end-to-end run that `run` reproduces."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from optuna.distributions import CategoricalDistribution, IntDistribution
from safetensors.torch import load_file

from conftest import VOCAB, tiny_model, tiny_tokenizer
from slimformer.auto import AutoConfig, AutoSpace, Target, auto, choose, search
from slimformer.errors import SlimformerError
from slimformer.methods import AWQConfig, DistillConfig, GPTQConfig, RTNConfig, SLEBConfig, WandaConfig, WidthConfig
from slimformer.models import load_model, save_model
from slimformer.models.adapters import get_adapter
from slimformer.recipes import Calibration, Measure, load_recipe, run_recipe


def test_targets_parse_and_bad_ones_fail_in_one_line():
    assert Target.parse("size=0.25") == Target("size", 0.25)
    assert Target.parse("speed=2x") == Target("speed", 2.0) == Target.parse(" Speed = 2 ")
    assert Target.parse("ppl=+10%") == Target("ppl", pytest.approx(0.1)) == Target.parse("ppl=10%")
    for bad, words in [("size", "cannot read"), ("width=0.5", "cannot read"), ("size=big", "cannot read"),
                       ("size=1.5", "between 0 and 1"), ("speed=0.5", "above 1"), ("ppl=0.1", "percentage"),
                       ("ppl=-5%", "non-negative")]:
        with pytest.raises(SlimformerError, match=words) as e:
            Target.parse(bad)
        assert "\n" not in str(e.value)


def test_targets_choose_the_right_point_and_name_the_closest_when_none_fits():
    points = [{"params": {"bits": 0}, "ppl": 1.0, "size": 1.0, "speed": 1.0},
              {"params": {"bits": 8}, "ppl": 1.004, "size": 0.3, "speed": 1.6},
              {"params": {"bits": 4}, "ppl": 1.3, "size": 0.2, "speed": 1.7},
              {"params": {"bits": 4, "blocks": 3}, "ppl": 2.0, "size": 0.18, "speed": 2.1}]
    assert choose(points, Target("size", 0.25))["params"] == {"bits": 4}  # the lowest ppl among the small enough
    assert choose(points, Target("ppl", 0.1))["params"] == {"bits": 8}  # the smallest within 10%
    assert choose(points, Target("speed", 2.0))["params"] == {"bits": 4, "blocks": 3}
    with pytest.raises(SlimformerError, match=r"no candidate meets size ≤ 0.1.*closest is ppl ×2.000, size 0.180"):
        choose(points, Target("size", 0.1))


def _synthetic(params: dict) -> dict:
    """A known trade-off: bits and blocks shrink and speed up, and each costs quality; the quantizer only changes quality."""
    bits, blocks, q = params["bits"], params["blocks"], params["quantizer"]
    keep = 1 - blocks / 10
    size = keep * (bits or 32) / 32
    speed = 1 / (0.3 + 0.7 * size) / (1.0 if q != "slow" else 1.5)
    loss = {0: 0.0, 8: 0.005, 4: 0.3}[bits] * {"good": 0.5, "plain": 1.0, "slow": 0.5}[q] + 0.08 * blocks ** 1.5
    return {"ppl": 1 + loss, "size": size, "speed": speed}


def test_search_finds_the_known_front_and_the_best_point_under_each_target():
    space = {"bits": CategoricalDistribution([0, 8, 4]), "blocks": IntDistribution(0, 3),
             "quantizer": CategoricalDistribution(["good", "plain", "slow"])}
    grid = [dict(zip(space, values)) for values in itertools.product([0, 8, 4], range(4), ["good", "plain", "slow"])]
    truth = [{"params": p, **_synthetic(p)} for p in grid]
    for target in (Target("size", 0.25), Target("speed", 2.0), Target("ppl", 0.1)):
        found = search(space, _synthetic, target, trials=60, seed=0, progress=False)
        assert found["chosen"]["params"] == choose(truth, target)["params"]
    # the found front: every point of it is on the true front, and it covers the true front's distinct values
    true_front = {json.dumps(p["params"], sort_keys=True) for p in truth if not any(
        o["ppl"] <= p["ppl"] and o["size"] <= p["size"] and o["speed"] >= p["speed"] and o != p and
        (o["ppl"], o["size"], o["speed"]) != (p["ppl"], p["size"], p["speed"]) for o in truth)}
    found_front = {json.dumps(found["points"][i]["params"], sort_keys=True) for i in found["front"]}
    assert found_front <= true_front and len(found_front) >= 0.8 * len(true_front)


def test_space_builds_the_recipe_of_each_family_and_offers_only_groups_that_divide():
    space = AutoSpace().distributions(get_adapter(tiny_model("llama")))  # widths 32 and 48
    assert set(space["group"].choices) == {-1}  # 128, 64, 32: none divides 48
    assert space["blocks"].high == 0  # 20% of 3 blocks
    assert space["width"].choices == (1.0, 0.9, 0.8)
    steps = AutoSpace().steps({"blocks": 2, "width": 0.9, "sparsity": "2:4", "recovery": True, "bits": 4, "group": 64,
                               "quantizer": "awq", "head": 8}, recovery_tokens=1000)
    assert [type(s) for s in steps] == [SLEBConfig, WidthConfig, WandaConfig, DistillConfig, AWQConfig]
    assert steps[0].criterion == "influence" and steps[2].pattern == "2:4" and steps[3].tokens == 1000
    assert steps[1] == WidthConfig(keep=0.9, heads=False, align=128)
    assert steps[4].group_size == 64 and steps[4].head and steps[4].head_bits == 8
    assert AutoSpace().steps({"width": 0.8, "recovery": True}, 10) == (
        WidthConfig(keep=0.8, heads=False, align=128), DistillConfig(tokens=10, seqlen=512))
    assert AutoSpace().steps({"bits": 8, "group": 64, "quantizer": "gptq", "recovery": True}, 1000) == (
        GPTQConfig(bits=8, group_size=None),)  # no recovery without removal; 8 bits per channel
    assert AutoSpace().steps({"sparsity": "0.5", "bits": 0, "quantizer": "rtn"}, 10) == (WandaConfig(sparsity=0.5),)
    assert AutoSpace().steps({"bits": 4, "group": -1, "quantizer": "rtn"}, 10) == (RTNConfig(bits=4, group_size=-1),)


def _tiny_config(text, target: Target, **space) -> AutoConfig:
    source = f"text:{text}"
    return AutoConfig(target=target, space=AutoSpace(recovery=(False,), **space), trials=8, budget_s=None,
                      search_calibration=Calibration(source, 2, 16), score_windows=2, score_seqlen=16,
                      calibration=Calibration(source, 4, 16), speed_repeats=1,
                      measure=Measure(ppl_windows=2, ppl_source=source, ppl_seqlen=16, prefill_tokens=16, new_tokens=4,
                                      repeats=1))


@pytest.fixture
def wide_tiny(tmp_path):
    """A tiny Llama whose widths (64, 128) take group sizes 32 and 64, with a long calibration text."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=5, num_attention_heads=4,
                                                         num_key_value_heads=2, max_position_embeddings=64))
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 11 + i // 7) % VOCAB}" for i in range(3000)))
    return path, text


def test_auto_writes_the_chosen_model_its_recipe_and_report_and_run_reproduces_it(wide_tiny, tmp_path):
    path, text = wide_tiny
    record = auto(str(path), "size=0.5", tmp_path / "out", config=_tiny_config(text, Target("size", 0.5)),
                  progress=False)
    out = tmp_path / "out"
    assert {"recipe.yaml", "auto.json", "search.json", "report.html", "run.json"} <= {p.name for p in out.iterdir()}
    assert record["chosen"]["predicted"]["size"] <= 0.5 and record["chosen"]["measured"]["size"] <= 0.5
    assert len(record["trials"]) >= 2 and record["pareto"]
    assert "Pareto" in (out / "report.html").read_text()
    # the cost model is checked by a measurement at the chosen point and at most two others on the front
    checks = record["speed_checks"]
    assert checks[0]["chosen"] and checks[0]["params"] == record["chosen"]["params"] and len(checks) <= 3
    assert all(c["measured_speed"] > 0 and c["predicted_speed"] > 0 for c in checks)
    assert "the cost model against a measurement" in (out / "report.html").read_text()
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.steps and recipe.model == str(path)
    run_recipe(recipe, tmp_path / "again", progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_width_candidate_is_cut_and_scored(wide_tiny):
    from slimformer.auto import CandidateScorer

    path, text = wide_tiny
    loaded = load_model(str(path))
    scorer = CandidateScorer(loaded, str(path), _tiny_config(text, Target("size", 0.9), width_align=32), progress=False)
    steps = scorer.recipe({"width": 0.8}).steps
    assert steps == (WidthConfig(keep=0.8, heads=False, align=32),)
    narrow, dense = scorer({"width": 0.8}), scorer({"width": 1.0})
    assert dense["size"] == 1.0 and narrow["size"] < 0.9
    assert math.isfinite(narrow["ppl"]) and narrow["ppl"] != dense["ppl"]  # speed is timed: the benchmark's to judge


def test_auto_names_the_closest_candidate_when_the_target_cannot_be_met(wide_tiny, tmp_path):
    path, text = wide_tiny
    config = _tiny_config(text, Target("speed", 50.0), sparsity=("none",), quantizers=("rtn",))
    with pytest.raises(SlimformerError, match="no candidate meets decode ≥ 50× dense; the closest is"):
        auto(str(path), "speed=50", tmp_path / "out", config=config, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_auto_refuses_bad_targets_and_budgets_in_one_line(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for args, words in [(["--target", "size=2"], "between 0 and 1"), (["--target", "fast"], "cannot read the target"),
                        (["--target", "size=0.25", "--budget", "soon"], "cannot read the duration")]:
        run = subprocess.run([sys.executable, "-m", "slimformer.cli", "auto", "tiny", *args, "--out", "o"],
                             cwd=tmp_path, capture_output=True, text=True, env=env)
        assert run.returncode == 2 and words in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
