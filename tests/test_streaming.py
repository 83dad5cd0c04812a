"""Streaming from disk: the same weights as in memory for every method, resume after an interruption, sharded input and output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import MOE_FAMILIES, calibration_text, random_ids, tiny_model, tiny_moe, tiny_tokenizer
from slimformer import get_adapter
from slimformer.cli import main
from slimformer.errors import SlimformerError
from slimformer.methods import (AWQConfig, ExpertMergeConfig, ExpertPruneConfig, GPTQConfig, MagnitudeConfig,
                                RTNConfig, SLEBConfig, SparseGPTConfig, WandaConfig, apply)
from slimformer.methods.memory import check_budget, estimate_peak, parse_size
from slimformer.models.loading import load_model, load_streamed, save_model
from slimformer.models.streaming import INDEX, DiskStates, Stream, stream_of

METHODS = {
    "magnitude": MagnitudeConfig(sparsity=0.5),
    "wanda": WandaConfig(sparsity=0.5),
    "wanda-compressed": WandaConfig(sparsity=0.5, propagate="compressed"),
    "sparsegpt-2:4": SparseGPTConfig(pattern="2:4"),
    "sparsegpt-int4": SparseGPTConfig(sparsity=0.5, bits=4, group_size=16),
    "rtn": RTNConfig(bits=4, group_size=16),
    "gptq": GPTQConfig(bits=4, group_size=16),
    "gptq-head-embedding": GPTQConfig(bits=4, group_size=16, head=True, embedding=True),
    "awq": AWQConfig(bits=4, group_size=16),
    "sleb": SLEBConfig(blocks=1, protect=()),
    "influence": SLEBConfig(blocks=1, criterion="influence"),
}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def in_memory(source: Path, config, samples, out: Path):
    loaded = load_model(str(source))
    result = apply(loaded.adapter, config, samples)
    save_model(loaded.model, loaded.tokenizer, out)
    return result


def streamed(source: Path, config, samples, out: Path, spill: bool = False, **kwargs):
    loaded = load_streamed(str(source), out, job={"method": config.method}, **kwargs)
    stream_of(loaded.adapter).spill = spill
    result = apply(loaded.adapter, config, samples)
    stream_of(loaded.adapter).commit(loaded.tokenizer)
    return result


@pytest.fixture
def source(tmp_path) -> Path:
    return save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "src")


@pytest.mark.parametrize("name", list(METHODS))
def test_streamed_run_writes_the_in_memory_weights(source, tmp_path, name):
    samples = random_ids(4, 16)
    expected = in_memory(source, METHODS[name], samples, tmp_path / "mem")
    result = streamed(source, METHODS[name], samples, tmp_path / "str")
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert result.summary == expected.summary and result.layers == expected.layers
    assert (tmp_path / "str" / INDEX).exists() and not list(tmp_path.glob(".*streaming"))
    ids = random_ids(1, 12)
    a, b = load_model(str(tmp_path / "mem")).model, load_model(str(tmp_path / "str")).model
    assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "gemma3", "opt", "qwen2"])
@pytest.mark.parametrize("name", ["wanda", "gptq", "sleb"])
def test_streaming_other_families(tmp_path, family, name):
    src = save_model(tiny_model(family), tiny_tokenizer(), tmp_path / "src")
    samples = random_ids(3, 16)
    in_memory(src, METHODS[name], samples, tmp_path / "mem")
    streamed(src, METHODS[name], samples, tmp_path / "str")
    assert_same_weights(tmp_path / "mem", tmp_path / "str")


@pytest.mark.parametrize("name", ["wanda", "wanda-compressed", "gptq", "awq", "sleb", "influence"])
def test_activations_on_disk_give_the_same_weights(source, tmp_path, name, monkeypatch):
    samples = random_ids(4, 16)
    expected = in_memory(source, METHODS[name], samples, tmp_path / "mem")
    appended, append = [], DiskStates.append
    monkeypatch.setattr(DiskStates, "append", lambda self, t: (appended.append(t.shape), append(self, t)))
    result = streamed(source, METHODS[name], samples, tmp_path / "str", spill=True)
    assert appended and all(shape[0] == 1 for shape in appended)  # every hidden state went to disk, batch by batch
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert result.summary == expected.summary
    assert not list(tmp_path.glob(".*streaming"))


def test_disk_states_behave_as_a_list_and_remove_their_folder(tmp_path):
    states = DiskStates(tmp_path / "s")
    batches = [torch.randn(1, 3, 4) for _ in range(3)]
    for b in batches:
        states.append(b)
    assert len(states) == 3 and torch.equal(states[1], batches[1]) and torch.equal(states[-1], batches[2])
    assert all(torch.equal(a, b) for a, b in zip(states, batches)) and len(states[1:]) == 2
    assert states.nbytes > 3 * 12 * 4
    with pytest.raises(IndexError):
        states[3]
    states.link_into(tmp_path / "copy")
    assert len(DiskStates(tmp_path / "copy", owned=False)) == 3
    del states
    assert not (tmp_path / "s").exists() and (tmp_path / "copy").exists()


def test_sharded_checkpoint_round_trips(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3 and (tmp_path / "src" / INDEX).exists()
    loaded = load_streamed(str(tmp_path / "src"), tmp_path / "copy")
    assert all(p.is_meta for p in loaded.adapter.blocks[0].parameters())
    stream_of(loaded.adapter).commit(loaded.tokenizer)
    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or "lm_head.weight" in
                tensors(tmp_path / "copy")}
    copy = tensors(tmp_path / "copy")
    assert copy.keys() == original.keys()
    assert all(torch.equal(copy[k], original[k]) for k in copy)
    ids = random_ids(1, 10)
    assert torch.equal(load_model(str(tmp_path / "copy")).model(ids).logits, model(ids).logits)


def test_resume_after_interruption_gives_the_same_model(source, tmp_path, monkeypatch):
    config, samples = GPTQConfig(bits=4, group_size=16), random_ids(4, 16)
    in_memory(source, config, samples, tmp_path / "mem")
    write, calls = Stream.write, []

    def interrupted(self, index, block):
        if index == 2:
            raise KeyboardInterrupt
        calls.append(index)
        write(self, index, block)

    monkeypatch.setattr(Stream, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        streamed(source, config, samples, tmp_path / "str")
    assert not (tmp_path / "str").exists() and (tmp_path / ".str.streaming" / "progress.json").exists()
    monkeypatch.setattr(Stream, "write", write)
    loads, load = [], Stream.load

    def counted(self, block):
        loads.append(next(i for i, b in enumerate(self.adapter.blocks) if b is block))
        load(self, block)

    monkeypatch.setattr(Stream, "load", counted)
    result = streamed(source, config, samples, tmp_path / "str")
    assert calls == [0, 1] and loads == [2]  # the finished blocks were not run again
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert result.summary["quantized_params"] > 0 and len(result.layers) == 21


def test_a_resumed_awq_run_reports_every_blocks_alphas(source, tmp_path, monkeypatch):
    config, samples = AWQConfig(bits=4, group_size=16), random_ids(4, 16)
    whole = in_memory(source, config, samples, tmp_path / "mem").summary["alphas"]
    write = Stream.write
    monkeypatch.setattr(Stream, "write", lambda self, i, b: (_ for _ in ()).throw(KeyboardInterrupt) if i == 2
                        else write(self, i, b))
    with pytest.raises(KeyboardInterrupt):
        streamed(source, config, samples, tmp_path / "str")
    monkeypatch.setattr(Stream, "write", write)
    resumed = streamed(source, config, samples, tmp_path / "str").summary["alphas"]
    assert len(whole) == 3 * 3 and resumed == whole  # three scaled pairs in each of three blocks
    assert_same_weights(tmp_path / "mem", tmp_path / "str")


def test_resume_with_activations_on_disk(source, tmp_path, monkeypatch):
    config, samples = WandaConfig(sparsity=0.5), random_ids(4, 16)
    in_memory(source, config, samples, tmp_path / "mem")
    write = Stream.write
    monkeypatch.setattr(Stream, "write", lambda self, i, b: (_ for _ in ()).throw(KeyboardInterrupt) if i == 2
                        else write(self, i, b))
    with pytest.raises(KeyboardInterrupt):
        streamed(source, config, samples, tmp_path / "str", spill=True)
    work = tmp_path / ".str.streaming"
    assert [p.name for p in work.glob("hidden-*")] == ["hidden-00002"]  # the previous checkpoint was removed
    monkeypatch.setattr(Stream, "write", write)
    streamed(source, config, samples, tmp_path / "str", spill=True)
    assert_same_weights(tmp_path / "mem", tmp_path / "str")


def test_a_different_job_does_not_resume(source, tmp_path, monkeypatch):
    monkeypatch.setattr(Stream, "write", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        streamed(source, WandaConfig(sparsity=0.5), random_ids(2, 16), tmp_path / "str")
    monkeypatch.undo()
    streamed(source, WandaConfig(sparsity=0.3), random_ids(2, 16), tmp_path / "str")
    in_memory(source, WandaConfig(sparsity=0.3), random_ids(2, 16), tmp_path / "mem")
    assert_same_weights(tmp_path / "mem", tmp_path / "str")


EXPERT_METHODS = {"expert-prune": ExpertPruneConfig(keep=3), "expert-prune-output": ExpertPruneConfig(keep=3, criterion="output"),
                  "expert-merge": ExpertMergeConfig(keep=3)}


@pytest.mark.parametrize("name", [*EXPERT_METHODS, "wanda", "gptq"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_checkpoints_stream_through_transformers_conversion(tmp_path, family, name):
    """MoE checkpoints store each expert's matrices apart and the model stacks them: the same weights streamed."""
    source = save_model(tiny_moe(family), tiny_tokenizer(), tmp_path / "src")
    config, samples = {**EXPERT_METHODS, **METHODS}[name], random_ids(4, 16)
    expected = in_memory(source, config, samples, tmp_path / "mem")
    loaded = load_streamed(str(source), tmp_path / "str", job={"method": config.method})
    assert stream_of(loaded.adapter).conversion is not None
    result = apply(loaded.adapter, config, samples)
    stream_of(loaded.adapter).commit(loaded.tokenizer)
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert result.summary == expected.summary and result.layers == expected.layers
    assert json.loads((tmp_path / "str" / "config.json").read_text()) == \
        json.loads((tmp_path / "mem" / "config.json").read_text())


def test_the_estimate_counts_the_conversion_and_the_new_expert_tensors(tmp_path):
    source = save_model(tiny_moe("mixtral"), tiny_tokenizer(), tmp_path / "src")
    loaded = load_streamed(str(source), tmp_path / "out")
    stream, block = stream_of(loaded.adapter), loaded.adapter.blocks[0]
    gate_up = block.mlp.experts.gate_up_proj  # 6 experts' w1 and w3 stored apart, float32
    assert stream.convert_bytes == 2 * gate_up.numel() * 4
    plain = estimate_peak(loaded.adapter, WandaConfig(sparsity=0.5), 4, 16)
    pruned = estimate_peak(loaded.adapter, ExpertPruneConfig(keep=3), 4, 16)
    assert pruned["method"] - 2 * 4 * 16 * 32 * 4 - 3 * 64 * 32 * 4 == gate_up.numel() // 2 * 4
    for terms in (plain, pruned):  # the read comes before the pass, the method and the write
        assert terms["convert"] == max(0, stream.convert_bytes - terms["pass"] - terms["method"] - terms["write"])
    stream.abandon()


def test_a_resumed_expert_merge_reports_and_writes_what_an_uninterrupted_one_does(tmp_path, monkeypatch):
    source = save_model(tiny_moe("mixtral"), tiny_tokenizer(), tmp_path / "src")
    config, samples = ExpertMergeConfig(keep=3), random_ids(4, 16)
    expected = in_memory(source, config, samples, tmp_path / "mem")
    write = Stream.write

    def interrupted(self, index, block):
        if index == 1:
            raise KeyboardInterrupt
        write(self, index, block)

    monkeypatch.setattr(Stream, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        streamed(source, config, samples, tmp_path / "str")
    monkeypatch.setattr(Stream, "write", write)
    result = streamed(source, config, samples, tmp_path / "str")
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert result.summary == expected.summary and result.layers == expected.layers


def test_cli_experts_streams_a_moe_model(tmp_path, capsys):
    source = save_model(tiny_moe("qwen3_moe"), tiny_tokenizer(), tmp_path / "src")
    text = calibration_text(tmp_path)
    common = ["experts", str(source), "--keep", "4", "--calib", str(text), "--nsamples", "4", "--seqlen", "16"]
    assert main([*common, "--out", str(tmp_path / "mem")]) == 0
    assert main([*common, "--max-memory", "16GiB", "--out", str(tmp_path / "str")]) == 0
    assert "streamed within --max-memory" in capsys.readouterr().out
    assert_same_weights(tmp_path / "mem", tmp_path / "str")
    assert load_model(str(tmp_path / "str")).model.config.num_experts == 4


def test_a_checkpoint_missing_a_block_tensor_is_refused_before_any_work(source, tmp_path, capsys):
    weights = load_file(source / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    text = calibration_text(tmp_path)
    capsys.readouterr()
    code = main(["prune", str(source), "--method", "wanda", "--calib", str(text), "--nsamples", "2", "--seqlen", "16",
                 "--max-memory", "2GiB", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "model.layers.1.mlp.up_proj.weight" in err and "run without --max-memory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]


def test_memory_estimate_and_sizes(source, tmp_path):
    loaded = load_streamed(str(source), tmp_path / "out")
    small = estimate_peak(loaded.adapter, WandaConfig(), 2, 16)
    big = estimate_peak(loaded.adapter, GPTQConfig(bits=4), 64, 2048)
    assert big["activations"] == 3 * 64 * 2048 * 32 * 4 and big["total"] > small["total"]
    assert small["block"] == sum(p.numel() for p in tiny_model("llama").model.layers[0].parameters()) * 4
    with pytest.raises(SlimformerError, match="whole model in memory"):
        from slimformer.methods import FinetuneConfig

        estimate_peak(loaded.adapter, FinetuneConfig(steps=1), 2, 16)
    stream = stream_of(loaded.adapter)
    stream.spill = True
    spilled = estimate_peak(loaded.adapter, GPTQConfig(bits=4), 64, 2048)
    assert spilled["activations"] == 3 * 1 * 2048 * 32 * 4 and spilled["total"] < big["total"]
    # auto: the hidden states go to disk only when they do not fit
    # the process term is the RSS at the call: budgets keep a margin of half the 50 MB difference
    between = (big["total"] + spilled["total"]) // 2
    check_budget(loaded.adapter, GPTQConfig(bits=4), 64, 2048, big["total"] + (big["total"] - between))
    assert not stream.spill
    check_budget(loaded.adapter, GPTQConfig(bits=4), 64, 2048, between)
    assert stream.spill
    with pytest.raises(SlimformerError, match="activations on disk"):
        check_budget(loaded.adapter, GPTQConfig(bits=4), 64, 2048, spilled["total"] // 2)
    with pytest.raises(SlimformerError, match="more than --max-memory"):
        check_budget(loaded.adapter, GPTQConfig(bits=4), 64, 2048, between, activations="memory")
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("1.5GB") == 1_500_000_000 and parse_size("512MiB") == 2**29
    for bad in ("lots", "-1GiB", "4 parsecs"):
        with pytest.raises(SlimformerError, match="memory size"):
            parse_size(bad)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "slimformer.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})


def test_cli_max_memory_refuses_a_budget_too_small_and_leaves_nothing(source, tmp_path):
    text = calibration_text(tmp_path)
    common = [str(source), "--calib", str(text), "--nsamples", "4", "--seqlen", "16"]
    run = cli("quantize", *common, "--method", "gptq", "--group-size", "16", "--max-memory", "10MiB",
              "--out", "q", cwd=tmp_path)
    assert run.returncode != 0 and "more than --max-memory" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    run = cli("prune", *common, "--method", "wanda", "--max-memory", "many", "--out", "p", cwd=tmp_path)
    assert run.returncode != 0 and "memory size" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "src"]
    run = cli("prune", *common, "--method", "wanda", "--max-memory", "2GiB", "--activations", "disk", "--out", "p",
              "--sparse-out", "ps", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "streamed within --max-memory" in run.stdout and "activations on disk" in run.stdout
    for out in ("p", "ps"):
        assert load_model(str(tmp_path / out)).model.model.layers[0].mlp.up_proj.weight.eq(0).float().mean() == 0.5


# Runs the CLI and kills the process with SIGKILL (no cleanup of any kind runs) at one point of a
# streamed run: in the middle of the Nth atomic write of a file (the temporary half written), or
# right after the output shards are named.
KILLED_CLI = """
import os, signal, sys
from contextlib import contextmanager
import slimformer.models.streaming as streaming

where, count, writes = sys.argv[1], int(sys.argv[2]), []
if where == "name_shards":
    name_shards = streaming.name_shards

    def killed_after(*args, **kwargs):
        name_shards(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    streaming.name_shards = killed_after
else:
    atomic_path = streaming.atomic_path

    @contextmanager
    def killed_within(path):
        with atomic_path(path) as tmp:
            yield tmp
            writes.append(os.path.basename(path) == where)
            if sum(writes) == count:
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)

    streaming.atomic_path = killed_within
from slimformer.cli import main
sys.exit(main(sys.argv[3:]))
"""


# Streamed runs inside the test process get a budget far above what the tiny models need: the
# estimate starts from this process's resident memory, which depends on the tests run before.
@pytest.fixture(scope="module")
def wanda_runs(tmp_path_factory):
    """A tiny Llama, calibration text, and the CLI's Wanda run on it in memory and streamed uninterrupted."""
    folder = tmp_path_factory.mktemp("killed")
    source = save_model(tiny_model("llama"), tiny_tokenizer(), folder / "src")
    text = calibration_text(folder)
    args = ["prune", str(source), "--method", "wanda", "--calib", str(text), "--nsamples", "4", "--seqlen", "16"]
    for out, extra in (("mem", []), ("str", ["--max-memory", "16GiB"])):
        assert main([*args, *extra, "--out", str(folder / out)]) == 0
    return folder, [*args, "--max-memory", "16GiB"]


@pytest.mark.parametrize("where,count,resumed_at", [("block-00002.safetensors", 1, 2), ("progress.json", 3, 1),
                                                    ("outer.safetensors", 1, 3), ("name_shards", 1, 3)])
def test_a_killed_cli_run_resumes_to_the_same_model(wanda_runs, tmp_path, caplog, where, count, resumed_at):
    """SIGKILL mid-model, mid-write or mid-commit (the tiny model has 3 blocks); the same command again resumes
    where the last checkpoint is and gives the uninterrupted model, with no temporaries left over.
    """
    folder, args = wanda_runs
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILLED_CLI, where, str(count), *args, "--out", str(out)],
                            capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    assert killed.returncode == -9, killed.stderr
    assert not out.exists() and (tmp_path / ".out.streaming" / "progress.json").exists()
    with caplog.at_level("INFO", logger="slimformer"):
        assert main([*args, "--out", str(out)]) == 0
    assert f"resuming at block {resumed_at} " in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (folder / "str").iterdir())
    assert_same_weights(folder / "mem", out)
    assert not (tmp_path / ".out.streaming").exists()


def test_streamed_sparse_out_is_a_sharded_bitmask_copy_of_the_output(source, tmp_path):
    """--sparse-out with --max-memory converts the streamed output shard by shard; it loads with the same weights."""
    from slimformer.recipes import run_streamed

    text = calibration_text(tmp_path)
    recipe = {"model": str(source), "steps": [{"method": "sparsegpt", "pattern": "2:4"}],
              "calibration": {"source": str(text), "nsamples": 4, "seqlen": 16}, "measure": {"ppl_windows": 0}}
    summary = run_streamed(recipe, tmp_path / "dense", max_memory=2**34, sparse_out=tmp_path / "sparse",
                           progress=False)
    sparse = tmp_path / "sparse"
    assert summary["sparse_out"] == str(sparse) and (sparse / INDEX).exists()
    config = json.loads((sparse / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert config["format"] == "sparse-bitmask" and config["sparsity_structure"] == "2:4"
    assert config["global_sparsity"] == pytest.approx(0.5)
    dense, reread = load_model(str(tmp_path / "dense")).model, load_model(str(sparse)).model
    assert dense.state_dict().keys() == reread.state_dict().keys()
    assert all(torch.equal(t, reread.state_dict()[k]) for k, t in dense.state_dict().items())
    assert sum(f.stat().st_size for f in sparse.glob("*.safetensors")) < \
        sum(f.stat().st_size for f in (tmp_path / "dense").glob("*.safetensors"))
    with pytest.raises(SlimformerError, match="quantized output has no sparse-bitmask form"):
        run_streamed({**recipe, "steps": [{"method": "gptq", "bits": 4, "group_size": 16}]}, tmp_path / "q",
                     max_memory=2**34, sparse_out=tmp_path / "qs", progress=False)
    assert not (tmp_path / "q").exists() and not (tmp_path / "qs").exists()


def test_the_hessian_estimate_counts_each_input_once_and_the_one_before_in_sequence():
    from slimformer.methods.memory import _hessian_bytes, _input_groups

    adapter = get_adapter(tiny_model("llama"))
    h, i = adapter.model.config.hidden_size, adapter.model.config.intermediate_size
    groups = _input_groups(adapter, adapter.blocks[0])
    assert groups == [(h, 3), (h, 1), (h, 2), (i, 1)]  # q/k/v, o, gate/up, down, in forward order
    H, I = h * h * 4, i * i * 4
    # sequentially: down's Hessian (factored in place) and gate/up's, or q/k/v's with a factor copy
    assert _hessian_bytes(groups, sequential=True) == max(I + H, 2 * H + H, 2 * H)
    assert _hessian_bytes(groups, sequential=False) == 3 * H + I + H  # all gathered first, one copy shared


SMOLLM_METHODS = {  # group 64: SmolLM2's widths (576, 1536) are not multiples of 128
    "magnitude": MagnitudeConfig(sparsity=0.5),
    "wanda": WandaConfig(sparsity=0.5),
    "sparsegpt-2:4": SparseGPTConfig(pattern="2:4"),
    "rtn": RTNConfig(bits=4, group_size=64),
    "gptq": GPTQConfig(bits=4, group_size=64),
    "awq": AWQConfig(bits=4, group_size=64),
    "sleb": SLEBConfig(blocks=1),
    "influence": SLEBConfig(blocks=1, criterion="influence"),
}


@pytest.fixture(scope="module")
def smollm_blocks(tmp_path_factory) -> Path:
    """SmolLM2-135M's real weights and tokenizer, cut to its first 8 of 30 blocks.

    The streamed path differs from the in-memory one per block, so 22 more blocks would repeat the
    same check at four times the cost; the whole model is checked with Wanda in test_integration.py.
    """
    from slimformer.models.surgery import remove_blocks

    loaded = load_model("smollm2-135m")
    remove_blocks(loaded.adapter, range(8, len(loaded.adapter.blocks)))
    folder = save_model(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp("smollm") / "src")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.parametrize("name", list(SMOLLM_METHODS))
def test_smollm_streamed_writes_the_in_memory_weights(smollm_blocks, tmp_path, name):
    from transformers import AutoTokenizer

    from slimformer.data import load_text, sample_windows, tokenize

    tokenizer = AutoTokenizer.from_pretrained(smollm_blocks)
    samples = sample_windows(tokenize(tokenizer, load_text("wikitext2:valid")), 2, 64, seed=0)
    try:
        expected = in_memory(smollm_blocks, SMOLLM_METHODS[name], samples, tmp_path / "mem")
        result = streamed(smollm_blocks, SMOLLM_METHODS[name], samples, tmp_path / "str")
        assert_same_weights(tmp_path / "mem", tmp_path / "str")
        assert result.summary == expected.summary
    finally:  # two float32 copies of the model per method
        shutil.rmtree(tmp_path / "mem", ignore_errors=True)
        shutil.rmtree(tmp_path / "str", ignore_errors=True)
