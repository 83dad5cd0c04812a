"""Perplexity against a slow, obviously correct reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_ids, tiny_model
from slimformer import SlimformerError
from slimformer.evaluation import perplexity
from slimformer.evaluation.perplexity import window_nll


def reference_ppl(model, ids, seqlen, windows):
    nlls = []
    with torch.no_grad():
        for w in range(windows):
            chunk = ids[:, w * seqlen : (w + 1) * seqlen]
            logits = model(input_ids=chunk).logits[0]
            nlls.append(F.cross_entropy(logits[:-1], chunk[0, 1:], reduction="sum").item())
    return math.exp(sum(nlls) / (windows * (seqlen - 1)))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_perplexity_matches_reference(family):
    model = tiny_model(family)
    ids = random_ids(1, 16 * 5 + 7)  # 5 windows and a dropped tail
    result = perplexity(model, ids, seqlen=16, progress=False)
    assert result.windows == 5 and result.predicted_tokens == 5 * 15
    assert result.perplexity == pytest.approx(reference_ppl(model, ids, 16, 5), rel=1e-5)
    batched = perplexity(model, ids, seqlen=16, batch_size=2, progress=False)
    assert batched.perplexity == pytest.approx(result.perplexity, rel=1e-5)
    first2 = perplexity(model, ids, seqlen=16, windows=2, progress=False)
    assert first2.windows == 2
    assert first2.perplexity == pytest.approx(reference_ppl(model, ids, 16, 2), rel=1e-5)
    assert math.exp(sum(result.window_nll[:2]) / 2) == pytest.approx(first2.perplexity, rel=1e-6)


def test_window_nll_equals_cross_entropy():
    logits = torch.randn(300, 50)
    ids = torch.randint(0, 50, (300,))
    assert window_nll(logits, ids, chunk=64) == pytest.approx(F.cross_entropy(logits[:-1], ids[1:]).item(), rel=1e-5)


def test_bad_window_settings():
    model = tiny_model("llama")  # 64 positions
    with pytest.raises(SlimformerError, match="seqlen 128 is larger than the model allows \\(64 positions\\)"):
        perplexity(model, random_ids(1, 300), seqlen=128, progress=False)
    with pytest.raises(SlimformerError, match="fewer than one window"):
        perplexity(model, random_ids(1, 10), seqlen=16, progress=False)
