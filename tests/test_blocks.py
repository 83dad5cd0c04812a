"""Block elimination: SLEB against brute force, block influence, and the shallower model it leaves."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from conftest import DECODERS, TINY_CONFIGS, TINY_REL, random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, get_adapter, save_model
from slimformer.cli import main
from slimformer.methods import apply
from slimformer.methods.blocks import SLEBConfig
from slimformer.models.surgery import remove_blocks


def four_block_model(family="llama"):
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    config.num_hidden_layers = 4
    if getattr(config, "layer_types", None):
        config.layer_types = ["sliding_attention", "full_attention"] * 2
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights make the blocks matter, so the losses are well apart
        for p in model.model.layers.parameters():
            if p.ndim == 2:
                p.mul_(8)
    return model


def loss_of(model, samples):
    with torch.no_grad():
        logits = model(input_ids=samples).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), samples[:, 1:].flatten()).item()


def brute_force_sleb(model, samples, k, candidates):
    """Greedy SLEB by rebuilding the model without each candidate and running it in full."""
    removed, current = [], list(range(len(get_adapter(model).blocks)))
    for _ in range(k):
        losses = {}
        for c in candidates:
            if c in removed:
                continue
            trial = copy.deepcopy(model)
            remove_blocks(get_adapter(trial), [current.index(r) for r in removed + [c]])
            losses[c] = loss_of(trial, samples)
        removed.append(min(losses, key=losses.get))
    return removed


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_sleb_greedy_equals_brute_force(family):
    samples = random_ids(3, 16)
    model = four_block_model(family)
    expected = brute_force_sleb(model, samples, 2, [1, 2])
    result = apply(get_adapter(model), SLEBConfig(blocks=2, protect=(0, -1)), samples)
    assert result.summary["removed"] == expected
    # Without protection every block is a candidate.
    model = four_block_model(family)
    free = brute_force_sleb(model, samples, 3, [0, 1, 2, 3])
    assert apply(get_adapter(model), SLEBConfig(blocks=3, protect=()), samples).summary["removed"] == free


def test_round_scores_are_the_losses_of_the_smaller_models():
    samples = random_ids(2, 16)
    model = four_block_model()
    dense = copy.deepcopy(model)
    result = apply(get_adapter(model), SLEBConfig(blocks=1, protect=()), samples)
    for c, loss in result.summary["rounds"][0].items():
        trial = copy.deepcopy(dense)
        remove_blocks(get_adapter(trial), [int(c)])
        assert loss == pytest.approx(loss_of(trial, samples), rel=TINY_REL)
    assert result.summary["dense_loss"] == pytest.approx(loss_of(dense, samples), rel=TINY_REL)


def deep_model(blocks=8):
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = blocks
    return AutoModelForCausalLM.from_config(config).eval()


def test_path_cache_gives_the_same_rounds_with_fewer_block_calls():
    samples = random_ids(2, 16)
    state_gib = samples.numel() * deep_model().config.hidden_size * 4 / 2**30
    runs = {}
    for name, cache in {"off": 0.0, "small": 5 * state_gib, "full": 1.0}.items():
        model = deep_model()
        runs[name] = apply(get_adapter(model), SLEBConfig(blocks=4, protect=(), cache_gib=cache), samples).summary
        assert len(get_adapter(model).blocks) == 4
    assert runs["small"]["rounds"] == runs["off"]["rounds"]  # bit for bit, not approximately
    assert runs["full"]["rounds"] == runs["off"]["rounds"]
    assert runs["full"]["removed"] == runs["off"]["removed"]
    calls = {name: r["block_calls"] for name, r in runs.items()}
    assert calls["full"] < calls["small"] < calls["off"], calls


def test_oneshot_takes_the_best_first_round_scores():
    samples = random_ids(2, 16)
    result = apply(get_adapter(four_block_model()), SLEBConfig(blocks=2, criterion="oneshot", protect=()), samples)
    scores = {int(c): v for c, v in result.summary["rounds"][0].items()}
    assert result.summary["removed"] == sorted(scores, key=scores.get)[:2]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_block_influence_is_one_minus_cosine(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    samples = random_ids(2, 16)
    captured = []
    hooks = [b.register_forward_hook(lambda m, a, out: captured.append((a[0], out))) for b in adapter.blocks]
    with torch.no_grad():
        model(input_ids=samples)
    for h in hooks:
        h.remove()
    expected = {i: 1 - F.cosine_similarity(a, b, dim=-1).mean().item() for i, (a, b) in enumerate(captured)}
    result = apply(adapter, SLEBConfig(blocks=1, criterion="influence", protect=()), samples)
    scores = {int(k): v for k, v in result.summary["rounds"][0].items()}
    assert scores == pytest.approx(expected, rel=TINY_REL, abs=TINY_REL)  # 1 − cos is near 0 for some blocks
    assert result.summary["removed"] == [min(expected, key=expected.get)]
    assert len(adapter.blocks) == adapter.num_layers == 2


@pytest.mark.parametrize("family", DECODERS)
def test_shallower_model_reloads_with_the_same_logits_and_generation(family, tmp_path):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layer_types = getattr(model.config, "layer_types", None)
    remove_blocks(adapter, [1])
    assert len(adapter.blocks) == adapter.num_layers == 2
    if layer_types:
        assert model.config.layer_types == [layer_types[0], layer_types[2]]
        assert "_sliding_window_pattern" not in model.config.to_dict()  # no periodic pattern contradicting it
    idx = [getattr(m, "layer_idx") for b in adapter.blocks for m in b.modules() if hasattr(m, "layer_idx")]
    assert set(idx) <= {0, 1} and (not idx or idx[-1] == 1)
    path = save_model(model, tiny_tokenizer(), tmp_path / "m")
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    assert stock.config.num_hidden_layers == 2 and len(get_adapter(stock).blocks) == 2
    assert getattr(stock.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    ids = random_ids(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits)
        prompt = ids[:1, :6]
        ours = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        theirs = stock.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    # Cached generation equals a fresh forward at every step (the KV cache addresses the right layers).
    with torch.no_grad():
        for t in range(prompt.shape[1], ours.shape[1]):
            assert model(input_ids=ours[:, :t]).logits[0, -1].argmax().item() == ours[0, t].item()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SLEBConfig(), "exactly one of blocks"),
        (lambda: SLEBConfig(blocks=2, ratio=0.2), "exactly one of blocks"),
        (lambda: SLEBConfig(ratio=1.0), "ratio must be in \\(0, 1\\)"),
        (lambda: SLEBConfig(ratio=0.0), "ratio must be in \\(0, 1\\)"),
        (lambda: SLEBConfig(blocks=0), "at least 1"),
        (lambda: SLEBConfig(blocks=1, criterion="vibes"), "criterion must be one of"),
        (lambda: SLEBConfig(blocks=1, cache_gib=-1), "cache_gib must be at least 0"),
    ],
)
def test_bad_configs(make, message):
    with pytest.raises(SlimformerError, match=message):
        make()


def test_impossible_counts_fail_before_any_work():
    model = tiny_model("llama")  # 3 blocks
    adapter = get_adapter(model)
    with pytest.raises(SlimformerError, match="cannot remove 3 of 3 blocks"):
        apply(adapter, SLEBConfig(blocks=3), random_ids(1, 8))
    with pytest.raises(SlimformerError, match="cannot remove 2 blocks: only 1 of 3 are not protected"):
        apply(adapter, SLEBConfig(blocks=2), random_ids(1, 8))
    with pytest.raises(SlimformerError, match="cannot remove 5 of 3"):
        apply(adapter, SLEBConfig(blocks=5), random_ids(1, 8))
    with pytest.raises(SlimformerError, match="use criterion 'influence' for encoders"):
        apply(get_adapter(tiny_model("bert")), SLEBConfig(blocks=1), random_ids(1, 8))
    assert len(adapter.blocks) == 3


@pytest.fixture
def saved_four(tmp_path):
    path = save_model(four_block_model(), tiny_tokenizer(), tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 13) % 128}" for i in range(300)))
    return path, text


def test_cli_remove_blocks(saved_four, tmp_path, capsys):
    path, text = saved_four
    out = tmp_path / "out"
    assert main(["remove-blocks", str(path), "--method", "sleb", "--blocks", "2", "--calib", str(text),
                 "--nsamples", "2", "--seqlen", "16", "--out", str(out)]) == 0
    report = json.loads((out / "steps" / "01-sleb" / "slimformer.json").read_text())
    removed = report["result"]["summary"]["removed"]
    assert len(removed) == 2 and 0 not in removed and 3 not in removed
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    printed = capsys.readouterr().out
    assert "removed" in printed and f"report: {out / 'report.html'}" in printed
    html = json.loads((out / "report.json").read_text())["steps"][0]["block_scores"]
    assert len(html["rounds"]) == 2 and (out / "report.html").stat().st_size > 10_000  # the scores' plot


@pytest.mark.parametrize("extra, message", [(["--blocks", "4"], "cannot remove 4 of 4"),
                                            (["--ratio", "1.5"], "ratio must be in (0, 1)"),
                                            (["--blocks", "9"], "cannot remove 9 of 4")])
def test_cli_remove_blocks_bad_input_writes_nothing(saved_four, tmp_path, capsys, extra, message):
    path, text = saved_four
    out = tmp_path / "out"
    assert main(["remove-blocks", str(path), "--calib", str(text), "--nsamples", "1", "--seqlen", "16",
                 "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
