"""Speed measurements: the timed greedy loop decodes what generate decodes, and the figures are well formed."""

import statistics
import types

import pytest
import torch

from conftest import random_ids, tiny_model
from slimformer.evaluation.speed import compare_speed, greedy_decode, synchronize


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_timed_greedy_loop_decodes_like_generate(family):
    model = tiny_model(family)
    prompt = random_ids(1, 8)
    tokens, steps = greedy_decode(model, prompt, 6)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, expected[:, prompt.shape[1] :])
    assert len(steps) == 5 and all(s > 0 for s in steps)


def test_compare_speed_reports_medians_of_every_run():
    models = {"a": tiny_model("llama"), "b": tiny_model("gpt2")}
    result = compare_speed(models, random_ids(1, 32), repeats=3, prompt_tokens=8, new_tokens=5)
    for r in result.values():
        assert len(r["runs"]["prefill_s"]) == 3 and len(r["runs"]["decode_step_s"]) == 3 * 4
        assert r["prefill_s"] > 0 and r["decode_tok_s"] > 0 and r["generate_tok_s"] > 0
        assert r["decode_tok_s"] == pytest.approx(1 / statistics.median(r["runs"]["decode_step_s"]))



def test_timers_wait_for_a_cuda_device_and_not_for_a_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))

    class OnGpu:  # reports a CUDA parameter without needing a GPU
        def parameters(self):
            yield types.SimpleNamespace(device=torch.device("cuda", 0))

    synchronize(tiny_model("llama"))
    assert calls == []
    synchronize(OnGpu())
    assert calls == [torch.device("cuda", 0)]
