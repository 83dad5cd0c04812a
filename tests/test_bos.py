"""BOS handling: every window starts with the BOS its tokenizer adds (or, the papers' protocol, only the text does)."""

import json

import pytest
import torch

from conftest import BOS, assert_ppl_close, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, load_model, save_model
from slimformer.cli import main
from slimformer.data import sample_windows, tokenize
from slimformer.evaluation import perplexity
from slimformer.evaluation.zeroshot import score_requests
from slimformer.models import added_bos, window_bos

TEXT = " ".join(f"w{(i * 7) % 120 + 1}" for i in range(300))


def test_added_bos_is_found_from_what_the_tokenizer_encodes():
    assert added_bos(tiny_tokenizer(bos=True)) == BOS
    assert added_bos(tiny_tokenizer()) is None
    assert tokenize(tiny_tokenizer(bos=True), "w1 w2")[0].tolist() == [BOS, 1, 2]


@pytest.mark.parametrize(("family", "auto"), [("gemma", BOS), ("gemma3", BOS), ("llama", None), ("opt", None),
                                               ("qwen2", BOS)])
def test_each_family_has_a_default_and_both_modes_can_be_asked_for(family, auto):
    adapter = get_adapter(tiny_model(family))
    tok = tiny_tokenizer(bos=True)
    assert window_bos(tok, adapter) == auto  # Gemma-style: every window; Llama-style: the papers' protocol
    assert window_bos(tok, adapter, "every") == BOS and window_bos(tok, adapter, "once") is None
    assert window_bos(tiny_tokenizer(), adapter, "every") is None  # nothing to add where the tokenizer adds none
    with pytest.raises(SlimformerError, match="unknown BOS mode 'first'"):
        window_bos(tok, adapter, "first")


def test_calibration_windows_start_with_the_bos():
    ids = tokenize(tiny_tokenizer(bos=True), TEXT)
    every = sample_windows(ids, 8, 16, seed=0, bos=BOS)
    assert every.shape == (8, 16) and (every[:, 0] == BOS).all() and (every[:, 1:] != BOS).all()
    once = sample_windows(ids, 8, 16, seed=0)  # the papers' slicing: the text's one BOS, at offset 0 only
    assert (once[:, 0] != BOS).all()
    # the same seeded offsets into the text: window k of "every" is BOS + the first 15 tokens of window k of
    # the same draw over the text without its BOS
    text = ids[:, 1:]
    assert torch.equal(every[:, 1:], sample_windows(text, 8, 15, seed=0))


def test_perplexity_of_a_gemma_style_model_gives_every_window_its_bos(tmp_path):
    model, tok = tiny_model("gemma"), tiny_tokenizer(bos=True)
    path = save_model(model, tok, tmp_path / "gemma")
    (tmp_path / "t.txt").write_text(TEXT)
    out = tmp_path / "e.json"
    for mode in ("auto", "once"):
        assert main(["eval", str(path), "--ppl", str(tmp_path / "t.txt"), "--seqlen", "16", "--bos", mode,
                     "--out", str(out)]) == 0
        result = json.loads(out.read_text())["perplexity"][str(tmp_path / "t.txt")]
        ids = tokenize(tok, TEXT)
        expected = perplexity(model, ids, seqlen=16, bos=BOS if mode == "auto" else None, progress=False)
        assert result["windows"] == expected.windows == (300 // 15 if mode == "auto" else 301 // 16)
        assert_ppl_close(result["perplexity"], expected.perplexity)
    assert load_model(str(path)).window_bos() == BOS


def test_zero_shot_requests_cut_on_the_left_keep_their_bos():
    model, tok = tiny_model("gemma"), tiny_tokenizer(bos=True)  # 64 positions
    ctx = tok.encode(" ".join(f"w{i % 100 + 1}" for i in range(90)))  # BOS + 90 words: cut on the left
    cont = tok.encode("w5 w6", add_special_tokens=False)
    [(got, _)] = score_requests(model, tok, [(ctx, cont)], progress=False)
    fed = [BOS] + (ctx + cont)[-64:]  # the BOS, then the last 64 tokens (the last one only predicted)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([fed[:-1]])).logits[0].double(), -1)
    expected = sum(logp[p - 1, fed[p]].item() for p in range(len(fed) - 2, len(fed)))
    assert got == pytest.approx(expected, abs=1e-4)


def test_recipe_rejects_an_unknown_bos_mode():
    from slimformer.recipes import parse_recipe

    with pytest.raises(SlimformerError, match="<recipe>:2: bos must be one of auto, every, once, not 'first'"):
        parse_recipe("model: m\nbos: first\nsteps:\n  - {method: magnitude}\n")
    assert parse_recipe("model: m\nbos: every\nsteps:\n  - {method: magnitude}\n").bos == "every"
