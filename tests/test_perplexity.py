"""Perplexity against a slow, obviously correct reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_REL, assert_ppl_close, random_ids, tiny_model
from slimformer import SlimformerError
from slimformer.evaluation import perplexity
from slimformer.evaluation.perplexity import cut_windows, window_nll


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
    assert_ppl_close(result.perplexity, reference_ppl(model, ids, 16, 5))
    batched = perplexity(model, ids, seqlen=16, batch_size=2, progress=False)
    assert_ppl_close(batched.perplexity, result.perplexity)
    first2 = perplexity(model, ids, seqlen=16, windows=2, progress=False)
    assert first2.windows == 2
    assert_ppl_close(first2.perplexity, reference_ppl(model, ids, 16, 2))
    assert_ppl_close(math.exp(sum(result.window_nll[:2]) / 2), first2.perplexity)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2 soft-caps its logits
def test_window_nll_equals_cross_entropy_of_the_logits(family):
    model, ids = tiny_model(family), random_ids(3, 40)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        got = window_nll(model, ids)
    expected = [F.cross_entropy(row[:-1], target[1:]).item() for row, target in zip(logits, ids)]
    assert got == pytest.approx(expected, rel=TINY_REL)


def test_windows_start_with_the_bos_when_asked():
    ids = torch.tensor([[7] + list(range(10, 30))])  # a text that starts with its BOS 7
    plain = cut_windows(ids, 5)
    assert plain.tolist() == [[7, 10, 11, 12, 13], [14, 15, 16, 17, 18], [19, 20, 21, 22, 23], [24, 25, 26, 27, 28]]
    every = cut_windows(ids, 5, bos=7)  # 20 text tokens, 4 per window: each predicted exactly once
    assert every.tolist() == [[7, 10, 11, 12, 13], [7, 14, 15, 16, 17], [7, 18, 19, 20, 21], [7, 22, 23, 24, 25],
                              [7, 26, 27, 28, 29]]
    assert cut_windows(ids, 5, 2, bos=7).shape == (2, 5)
    model = tiny_model("llama")
    result = perplexity(model, ids, seqlen=5, bos=7, progress=False)
    assert result.windows == 5 and result.predicted_tokens == 20
    assert_ppl_close(result.perplexity, math.exp(sum(window_nll(model, every)) / 5))


def test_bad_window_settings():
    model = tiny_model("llama")  # 64 positions
    with pytest.raises(SlimformerError, match="seqlen 128 is larger than the model allows \\(64 positions\\)"):
        perplexity(model, random_ids(1, 300), seqlen=128, progress=False)
    with pytest.raises(SlimformerError, match="fewer than one window"):
        perplexity(model, random_ids(1, 10), seqlen=16, progress=False)
