"""Data sources and the calibration sampler."""

import json
import random

import pytest
import torch

from slimformer import SlimformerError
from slimformer.data import calibration_samples, data_dir, load_text, sample_windows
from slimformer.data import sources
from conftest import tiny_tokenizer


def test_wikitext2_rows_match_the_hub_builder():
    rows = sources.wikitext2_rows("test")
    assert len(rows) == 4358  # the HF wikitext-2-raw-v1 test row count
    assert rows[:3] == ["", " = Robert Boulter = \n", ""]
    assert len(sources.wikitext2_rows("valid")) == 3760


def test_wikitext2_text_is_rows_joined_by_blank_lines():
    text = load_text("wikitext2:test")
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n")
    assert load_text("wikitext2") == text
    assert load_text("wikitext2:validation") == load_text("wikitext2:valid") != text


def test_unknown_split_and_source_are_clear_errors():
    with pytest.raises(SlimformerError, match="unknown wikitext2 split 'train'"):
        load_text("wikitext2:train")
    with pytest.raises(SlimformerError, match="unknown data source 'c5'"):
        load_text("c5")


def test_missing_data_directory_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(SlimformerError, match="nowhere.*SLIMFORMER_DATA"):
        load_text("wikitext2")
    monkeypatch.delenv("SLIMFORMER_DATA")
    monkeypatch.setattr(sources, "_default_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(SlimformerError, match=r"no data directory: looked in .*a, .*b; set SLIMFORMER_DATA"):
        data_dir(required=True)


def test_data_directory_without_wikitext(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    with pytest.raises(SlimformerError, match="WikiText-2 not found at .*wiki.test.raw; set SLIMFORMER_DATA"):
        load_text("wikitext2")


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("w1 w2 w3")
    assert load_text(str(txt)) == load_text(f"text:{txt}") == "w1 w2 w3"
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "w1", "body": "x"}) + "\n\n" + json.dumps({"text": "w2", "body": "y"}) + "\n")
    assert load_text(str(jl)) == "w1\n\nw2"
    assert load_text(f"jsonl:{jl}:body") == "x\n\ny"


def test_bad_files_name_file_and_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(SlimformerError, match=r"bad.jsonl:2: has no text field 'text'"):
        load_text(str(jl))
    with pytest.raises(SlimformerError, match="data file not found"):
        load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SlimformerError, match="is empty"):
        load_text(str(empty))


def test_sample_windows_follow_wandas_sampler():
    ids = torch.arange(1000)[None]
    got = sample_windows(ids, 5, 64, seed=3)
    random.seed(3)  # Wanda: random.seed(seed); i = random.randint(0, L - seqlen - 1)
    starts = [random.randint(0, 1000 - 64 - 1) for _ in range(5)]
    assert torch.equal(got, torch.stack([torch.arange(s, s + 64) for s in starts]))
    assert torch.equal(sample_windows(ids, 5, 64, seed=3), got)
    assert not torch.equal(sample_windows(ids, 5, 64, seed=4), got)


def test_sampler_rejects_impossible_requests():
    ids = torch.arange(100)[None]
    with pytest.raises(SlimformerError, match="at least 1"):
        sample_windows(ids, 0, 10)
    with pytest.raises(SlimformerError, match="100 tokens, too few for windows of 100"):
        sample_windows(ids, 2, 100)


def test_calibration_samples_from_a_file(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(" ".join(f"w{i % 128}" for i in range(500)))
    samples = calibration_samples(tiny_tokenizer(), str(path), n=4, seqlen=32, seed=0)
    assert samples.shape == (4, 32) and samples.dtype == torch.long
