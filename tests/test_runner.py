"""The block runner: replaying blocks one at a time reproduces the full forward, for every family."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_REL, assert_close_scaled, random_ids, tiny_model, tiny_tokenizer
from slimformer import get_adapter
from slimformer.calibration import PROPAGATE, BlockRunner, capture, observing


def full_forward_last_block(model, adapter, samples):
    """The last block's output in an ordinary full forward, caught by a forward hook."""
    outs = []
    handle = adapter.blocks[-1].register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model(input_ids=samples)
    handle.remove()
    return outs[0]


def test_replay_reproduces_full_forward(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    samples = random_ids(4, 24)  # longer than the sliding window of 8
    expected = full_forward_last_block(model, adapter, samples)
    hidden = BlockRunner(adapter, samples, batch_size=2, progress=False).run()
    assert_close_scaled(torch.cat(hidden), expected)


def test_replay_through_head_gives_the_logits():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    samples = random_ids(2, 16)
    hidden = torch.cat(BlockRunner(adapter, samples, progress=False).run())
    with torch.no_grad():
        logits = adapter.head(adapter.final_norm(hidden))
        assert_close_scaled(logits, model(input_ids=samples).logits)


def test_capture_records_per_block_masks_and_restores_forward():
    model = tiny_model("gemma2")  # sliding and full layers get different masks
    adapter = get_adapter(model)
    hidden, calls = capture(adapter, [random_ids(1, 24)])
    assert len(hidden) == 1 and len(calls) == 3 and all(len(c) == 1 for c in calls)
    assert all("forward" not in block.__dict__ for block in adapter.blocks)
    assert hidden[0].shape == (1, 24, 32)
    assert "position_embeddings" in calls[0][0].kwargs


class Recorder:
    """A visitor that records what it observes and zeroes the MLP down-projection of every block."""

    def __init__(self, adapter, fail_at=None):
        self.adapter, self.fail_at, self.seen = adapter, fail_at, []

    def targets(self, index, block):
        return {f"{index}.{role}": m for role, m in self.adapter.linears(block).items() if role in ("q", "qkv", "down")}

    def observe(self, name, module, inputs, batch):
        self.seen.append((name, tuple(inputs.shape)))

    def compress(self, name, module):
        if name == self.fail_at:
            raise RuntimeError("method failed")
        if name.endswith("down"):
            module.weight.data.zero_()


def test_visitor_observes_target_inputs_and_compressed_outputs_propagate():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    samples = random_ids(4, 16)
    visitor = Recorder(adapter)
    hidden = BlockRunner(adapter, samples, batch_size=2, progress=False).run(visitor)
    # 3 blocks × 2 targets × 2 batches, each with the target's input width.
    assert len(visitor.seen) == 12
    assert ("0.q", (2, 16, 32)) in visitor.seen and ("2.down", (2, 16, 48)) in visitor.seen
    # Compressed outputs fed forward: the result equals a full forward of the compressed model.
    assert_close_scaled(torch.cat(hidden), full_forward_last_block(model, adapter, samples))


def test_dense_propagation_feeds_uncompressed_outputs():
    samples = random_ids(2, 16)
    dense = torch.cat(BlockRunner(get_adapter(tiny_model("llama")), samples, progress=False).run())
    model = tiny_model("llama")
    adapter = get_adapter(model)
    hidden = torch.cat(BlockRunner(adapter, samples, progress=False).run(Recorder(adapter), propagate="dense"))
    # Every block was compressed, yet each saw (and passed on) the dense model's activations.
    assert all(not adapter.linears(b)["down"].weight.any() for b in adapter.blocks)
    assert_close_scaled(hidden, dense)
    compressed = torch.cat(BlockRunner(adapter, samples, progress=False).run())
    assert not torch.allclose(compressed, dense)


@pytest.mark.parametrize("propagate", ["compressed", "sequential", "dense"])
def test_hooks_are_removed_when_a_method_fails(propagate):
    model = tiny_model("llama")
    adapter = get_adapter(model)
    with pytest.raises(RuntimeError, match="method failed"):
        BlockRunner(adapter, random_ids(3, 8), progress=False).run(Recorder(adapter, fail_at="1.down"), propagate=propagate)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert torch.is_grad_enabled()  # paused samples were unwound without leaving grad mode off


class ScaleBySeen(Recorder):
    """Scales each target by 1 / (1 + mean |input|): the result depends on what the target observed."""

    def __init__(self, adapter):
        super().__init__(adapter)
        self.stats, self.sums = {}, {}

    def observe(self, name, module, inputs, batch):
        total, count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (total + inputs.abs().sum().item(), count + inputs.numel())
        self.stats[name] = self.sums[name][0] / self.sums[name][1]

    def compress(self, name, module):
        module.weight.data /= 1 + self.stats[name]


def sequential_reference(adapter, samples):
    """One module at a time: observe it over all samples with everything before it compressed."""
    visitor = ScaleBySeen(adapter)
    runner = BlockRunner(adapter, samples, progress=False)
    hidden = runner.hidden
    for i, block in enumerate(adapter.blocks):
        for name, module in visitor.targets(i, block).items():
            handle = module.register_forward_pre_hook(lambda m, a, _n=name: visitor.observe(_n, m, a[0], 0))
            runner.forward_block(i, hidden)
            handle.remove()
            visitor.compress(name, module)
        hidden = runner.forward_block(i, hidden)
    return torch.cat(hidden)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3", "bert"])
def test_sequential_mode_compresses_each_module_after_all_samples_reach_it(family):
    samples = random_ids(3, 12)
    expected_model = tiny_model(family)
    expected = sequential_reference(get_adapter(expected_model), samples)
    model = tiny_model(family)
    adapter = get_adapter(model)
    # Batches of 2 and 1: each batch runs with its own recorded arguments.
    hidden = BlockRunner(adapter, samples, batch_size=2, progress=False).run(ScaleBySeen(adapter), propagate="sequential")
    assert_close_scaled(torch.cat(hidden), expected)
    for a, b in zip(model.parameters(), expected_model.parameters()):
        assert_close_scaled(a, b)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "bert"])
def test_paused_and_bounded_passes_give_the_same_numbers_at_different_cost(family):
    samples = random_ids(3, 12)
    runs = {}
    for paused in (True, False):
        model = tiny_model(family)
        adapter = get_adapter(model)
        runner = BlockRunner(adapter, samples, batch_size=2, progress=False)
        runner.paused_bytes = 2**40 if paused else 0
        first_projection = next(iter(adapter.linears(adapter.blocks[0]).values()))
        calls = []
        first_projection.register_forward_pre_hook(lambda m, a: calls.append(1))
        hidden = runner.run(ScaleBySeen(adapter), propagate="sequential")
        runs[paused] = (torch.cat(hidden), [p.detach().clone() for p in model.parameters()], len(calls))
    (h1, p1, once), (h0, p0, passes) = runs[True], runs[False]
    assert torch.equal(h1, h0) and all(torch.equal(a, b) for a, b in zip(p1, p0))
    assert once == 2 and passes == 4  # paused: one forward per batch; passes: to q, to down (output replayed)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bert"])
def test_sequential_mode_replays_the_attention_once_its_targets_are_compressed(family, monkeypatch):
    samples = random_ids(3, 12)
    runs = {}
    for replay in (True, False):
        model = tiny_model(family)
        adapter = get_adapter(model)
        if not replay:
            monkeypatch.setattr(BlockRunner, "_attention_of", lambda self, block: None)
        runner = BlockRunner(adapter, samples, batch_size=2, progress=False)
        runner.paused_bytes = 0  # the bounded passes
        first_projection = next(iter(adapter.linears(adapter.blocks[0]).values()))  # q, or GPT-2's fused qkv
        calls = []
        first_projection.register_forward_pre_hook(lambda m, a: calls.append(1))
        hidden = runner.run(ScaleBySeen(adapter), propagate="sequential")
        runs[replay] = (torch.cat(hidden), [p.detach().clone() for p in model.parameters()], len(calls))
        monkeypatch.undo()
    (h1, p1, calls), (h0, p0, without) = runs[True], runs[False]
    assert torch.equal(h1, h0) and all(torch.equal(a, b) for a, b in zip(p1, p0))  # the very same numbers
    # the visitor targets q and down: block 0's attention ran in the pass to q and in the pass to down (which
    # kept its output); the output pass replayed it instead of running it a third time
    assert calls == 2 * 2 and without == 3 * 2  # 2 batches per pass (no pass runs once every target is done)


class Amplify(ScaleBySeen):
    """Multiplies each target by 10 · (1 + mean |input|): a change the next block's inputs show clearly."""

    def compress(self, name, module):
        module.weight.data *= 10 * (1 + self.stats[name])


def test_propagation_modes_see_the_inputs_they_promise():
    """All modes see the same inputs at block 0's first target; "dense" feeds block 1 the
    outputs of the uncompressed block 0, "compressed" those of the compressed one."""
    samples = random_ids(3, 12)
    seen = {}
    for mode in PROPAGATE:
        visitor = Amplify(get_adapter(tiny_model("llama")))
        BlockRunner(visitor.adapter, samples, progress=False).run(visitor, propagate=mode)
        seen[mode] = visitor.stats
    assert seen["sequential"]["0.q"] == pytest.approx(seen["compressed"]["0.q"], rel=TINY_REL)
    assert seen["dense"]["0.q"] == pytest.approx(seen["compressed"]["0.q"], rel=TINY_REL)
    # block 1 of "dense" sees what block 1 of an untouched model sees
    dense_model = tiny_model("llama")
    plain = ScaleBySeen(get_adapter(dense_model))
    with observing({"1.q": get_adapter(dense_model).blocks[1].self_attn.q_proj},
                   lambda name, module, x: plain.observe(name, module, x, 0)), torch.no_grad():
        dense_model(input_ids=samples)
    assert seen["dense"]["1.q"] == pytest.approx(plain.stats["1.q"], rel=TINY_REL)
    assert seen["compressed"]["1.q"] != pytest.approx(plain.stats["1.q"], rel=1e-3)  # ~7e-3 apart: RMSNorm hides most of it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_run_on_the_requested_device_and_go_back():
    """Block scoring calls forward_block directly: the runner moves the block to its device itself."""
    from slimformer.methods import SLEBConfig, apply

    model = tiny_model("llama")
    adapter = get_adapter(model)
    samples = random_ids(2, 16)
    runner = BlockRunner(adapter, samples, device="cuda", progress=False)
    on_cpu = runner.forward_block(0, runner.hidden)
    assert next(adapter.blocks[0].parameters()).device.type == "cpu"  # moved back
    expected = BlockRunner(get_adapter(tiny_model("llama")), samples, progress=False)
    assert_close_scaled(torch.cat(on_cpu), torch.cat(expected.forward_block(0, expected.hidden)), rel=1e-3)
    result = apply(adapter, SLEBConfig(blocks=1, protect=(0,), device="cuda"), samples)
    assert len(adapter.blocks) == 2 and result.summary["removed"]
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_block_elsewhere_is_moved_for_the_call_and_back(monkeypatch):
    """On a CPU-only machine: the move the runner makes, observed through the block's ``to``."""
    from slimformer import calibration

    block = tiny_model("llama").model.layers[0]
    moves = []
    monkeypatch.setattr(type(block), "to", lambda self, device: moves.append(str(device)) or self, raising=False)
    with calibration.on_device(block, torch.device("cuda")):
        pass
    with calibration.on_device(block, torch.device("cpu")):
        pass
    assert moves == ["cuda", "cpu"]  # there and back for another device; nothing for its own


HEAP_FRAGMENTS = """
from pathlib import Path
import torch
from slimformer.machine import release_freed_memory

def anon():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon"))
    return int(line.split()[1]) * 1024

mapped = torch.ones(24 << 20, dtype=torch.uint8)
del mapped  # a freed mapped block raises glibc's mmap threshold past 4 MiB
big, small = [], []
for _ in range(64):  # 4 MiB tensors from the heap, each followed by a 1 MiB one that stays, so the heap cannot shrink
    big.append(torch.ones(4 << 20, dtype=torch.uint8))
    small.append(torch.ones(1 << 20, dtype=torch.uint8))  # too large for the free lists the imports left
del big
kept = anon()
assert release_freed_memory()
print(kept - anon())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="glibc's allocator on Linux")
def test_freed_heap_memory_goes_back_to_the_system():
    # in a fresh process: the allocator's state there is known
    proc = subprocess.run([sys.executable, "-c", HEAP_FRAGMENTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) > 128 << 20  # of the 256 MiB freed in the middle of the heap


MAPPED_ALLOCATIONS = """
import sys
from pathlib import Path
import torch
from slimformer.machine import map_large_allocations

def anon():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon"))
    return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    assert map_large_allocations()
mapped = torch.ones(24 << 20, dtype=torch.uint8)
del mapped  # raises glibc's own threshold past 8 MiB, unless it is fixed
big, small = [], []
for _ in range(8):  # 8 MiB tensors, each followed by a 1 MiB one that stays, so a heap could not shrink
    big.append(torch.ones(8 << 20, dtype=torch.uint8))
    small.append(torch.ones(1 << 20, dtype=torch.uint8))
before = anon()
del big
print(before - anon())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="glibc's allocator on Linux")
def test_large_allocations_go_back_to_the_system_as_they_are_freed():
    freed = {}
    for mode in ("dynamic", "fixed"):  # each in a fresh process: the allocator's state there is known
        proc = subprocess.run([sys.executable, "-c", MAPPED_ALLOCATIONS, mode], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        freed[mode] = int(proc.stdout.split()[-1])
    assert freed["dynamic"] < 16 << 20  # glibc's default kept the 64 MiB in its heap
    assert freed["fixed"] > 48 << 20


def test_only_a_streamed_run_fixes_the_allocators_threshold(monkeypatch, tmp_path):
    import slimformer.calibration as calibration
    from slimformer.models.loading import load_streamed, save_model

    calls = []
    monkeypatch.setattr(calibration, "map_large_allocations", lambda: calls.append(1) or True)
    model = tiny_model("llama")
    BlockRunner(get_adapter(model), random_ids(2, 16), progress=False)
    assert calls == []
    save_model(model, tiny_tokenizer(), tmp_path / "source")
    streamed = load_streamed(str(tmp_path / "source"), tmp_path / "out")
    BlockRunner(streamed.adapter, random_ids(2, 16), progress=False)
    assert calls == [1]


def test_the_runner_releases_freed_memory_after_each_block(monkeypatch):
    import slimformer.calibration as calibration

    calls = []
    monkeypatch.setattr(calibration, "release_freed_memory", lambda: calls.append(1) or True)
    adapter = get_adapter(tiny_model("llama"))
    BlockRunner(adapter, random_ids(2, 16), progress=False).run(Recorder(adapter))
    assert len(calls) == len(adapter.blocks)
