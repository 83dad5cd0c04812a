"""The bundled real models: SmolLM2-135M (GGUF, Llama) and MiniLM-L6 (BERT), on a few short windows."""

import json
import math

import pytest
import torch

from conftest import DEEP_REL, assert_close_scaled, assert_ppl_close
from slimformer import load_model
from slimformer.calibration import BlockRunner
from slimformer.data import load_text, sample_windows, tokenize
from slimformer.evaluation import perplexity
from slimformer.models import loading

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_gguf_is_converted_once_and_cached_as_plain_safetensors(smollm, monkeypatch):
    cached = loading.gguf_checkpoint(loading.resolve_alias("smollm2-135m"))
    assert smollm.source == str(cached)
    config = json.loads((cached / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (cached / "model.safetensors").is_file()
    monkeypatch.setattr(loading, "AutoModelForCausalLM", None)  # a second conversion would crash
    assert loading.gguf_checkpoint(loading.resolve_alias("smollm2-135m")) == cached


def test_smollm_shape(smollm):
    assert smollm.adapter.family.name == "llama"
    assert smollm.adapter.shape() == {"layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536}


def test_smollm_perplexity_on_short_windows(smollm):
    ids = tokenize(smollm.tokenizer, load_text("wikitext2:test"))
    assert ids.shape[-1] > 300_000
    result = perplexity(smollm.model, ids, seqlen=256, windows=3, progress=False)
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(smollm.model(input_ids=ids[:, w * 256 : (w + 1) * 256]).logits[0, :-1],
                                                 ids[0, w * 256 + 1 : (w + 1) * 256]).item() for w in range(3)]
    # NLL as a float64 mean of float32 window losses: only the 30 blocks' rounding differs between the two ways
    assert_ppl_close(result.perplexity, math.exp(sum(nll) / len(nll)), nll_atol=DEEP_REL)
    assert 5 < result.perplexity < 60  # a trained model, not a random one (vocabulary 49,152)


def test_smollm_blocks_replay_the_forward(smollm):
    samples = sample_windows(tokenize(smollm.tokenizer, load_text("wikitext2:valid")), 2, 64, seed=0)
    adapter = smollm.adapter
    hidden = torch.cat(BlockRunner(adapter, samples, progress=False).run())
    with torch.no_grad():
        expected = smollm.model(input_ids=samples).logits
        assert_close_scaled(adapter.head(adapter.final_norm(hidden)), expected, rel=DEEP_REL)


def test_minilm_loads_as_a_bert_encoder():
    loaded = load_model("minilm-l6")
    assert loaded.adapter.family.name == "bert" and len(loaded.adapter.blocks) == 6
    ids = loaded.tokenizer(["a small test sentence", "another one"], padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).last_hidden_state
    hidden = torch.cat(BlockRunner(loaded.adapter, ids, progress=False).run())
    assert_close_scaled(hidden, expected)


_PEAK = ("import atexit, runpy, sys\n"
         "atexit.register(lambda: print('VmHWM', next(l.split()[1] for l in open('/proc/self/status') "
         "if l.startswith('VmHWM')), file=sys.stderr))\n"
         "sys.argv = ['slimformer', *sys.argv[1:]]\n"
         "runpy.run_module('slimformer.cli', run_name='__main__')\n")


def _cli_peak_kib(tmp_path, *args) -> int:
    import os
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _PEAK, *args], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    return int(next(line.split()[1] for line in run.stderr.splitlines() if line.startswith("VmHWM")))


def test_smollm_wanda_streamed_under_max_memory_peaks_lower_and_writes_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    common = ["prune", "smollm2-135m", "--method", "wanda", "--nsamples", "2", "--seqlen", "256", "--threads", "2"]
    dense_peak = _cli_peak_kib(tmp_path, *common, "--out", "mem")
    streamed_peak = _cli_peak_kib(tmp_path, *common, "--max-memory", "1GiB", "--out", "str")
    assert streamed_peak < 0.8 * dense_peak, (streamed_peak, dense_peak)
    mem, streamed = load_file(tmp_path / "mem" / "model.safetensors"), {}
    for file in (tmp_path / "str").glob("*.safetensors"):
        streamed.update(load_file(file))
    assert mem.keys() == streamed.keys()
    assert all(torch.equal(mem[k], streamed[k]) for k in mem)
    print(f"peak RSS: in memory {dense_peak / 2**20:.2f} GiB, streamed {streamed_peak / 2**20:.2f} GiB")
