"""The layer-by-layer block runner that every calibration-based method and block score uses.

It captures everything each block is called with (positional args and keyword args such as
``position_embeddings`` or a per-layer sliding-window mask) in one cheap pass where every
block is replaced by a recorder, then runs one block at a time over the calibration samples.
Activations live on the CPU between blocks; only the block being run is moved to ``device``.

Memory: the accelerator holds one block plus one batch of activations; the host holds the
inputs of the current block for all samples and the outputs being made. In float32 activations,
with ``n`` samples of ``s`` tokens, hidden size ``h``, intermediate size ``i`` and batch ``b``:

    peak ≈ W_block + 2·n·s·h·4 + b·s·(6h + 4i)·4 + M_method  (+ whatever else the process holds)

(``3·n·s·h·4`` in the sequential mode, which also keeps the attention's outputs.)

(``M_method``: a Wanda norm vector; GPTQ/SparseGPT the float32 ``w × w`` Hessian of the input
being compressed, in which its inverse factor is made, and of the one before it; each goes as soon
as the last projection it feeds is compressed). For a 70B Llama block (h 8192, i 28672) and 16 × 2048
samples in the sequential mode that is 3.19 GiB of float32 weights + 3.00 GiB of hidden states +
1.25 GiB for one sample in flight: 7.4 GiB, measured at 8.15 GiB for the whole process, whose
interpreter and libraries take 0.47 GiB (``benchmarks/scale.py --shape 70b-block``). With a
streamed model (:mod:`slimformer.models.streaming`) ``W_block`` is the only weight term: the
other blocks stay on disk; otherwise ``transformers`` memory-maps them from safetensors.
A streamed run whose budget the hidden states do not fit keeps them on disk as well (one file per
batch, :class:`~slimformer.models.streaming.DiskStates`): the ``2·n·s·h·4`` term becomes
``2·b·s·h·4``, one batch read and one written, at the cost of writing and reading ``n·s·h·4``
bytes per block. After each block the memory the C allocator keeps free goes back to the system
(:func:`slimformer.machine.release_freed_memory`), and a streamed run maps every allocation of
4 MiB or more on its own (:func:`slimformer.machine.map_large_allocations`): without the first,
GPTQ on 13B shapes grew from 3.42 GiB after 4 blocks to 5.47 GiB after 40; without the second,
the allocator's heap still grew by a block's fragments each block, and the peak with it. With both
the 40 blocks peaked at 3.43 GiB, the largest RSS per block flat from block 1 to block 39.

A method plugs in as a :class:`BlockVisitor`: ``targets`` names the modules whose inputs it
wants, ``observe`` receives those inputs batch by batch (through forward pre-hooks that are
always removed), and ``compress`` changes one module once every sample went through it.

Three ways to feed a block's outputs to the next (``propagate``):

- ``"compressed"`` (Wanda's and SparseGPT's reference code): one pass observes every target
  with the dense block, the targets are compressed, a second pass computes the outputs.
- ``"sequential"``: later modules observe the outputs of compressed earlier ones (the "true
  sequential" order of the GPTQ/SparseGPT code), in one of two ways with the same result.
  *Paused* (when the samples' paused activations fit a quarter of the available memory and the
  model is not streamed under a budget): each sample's forward runs in a coroutine that pauses
  before each target until every sample has reached it; the target is compressed, the samples
  resume, and the one pass yields the compressed outputs (one forward per block), holding about
  ``n·s·(4h + 2i)·4`` bytes of paused activations. *Passes* (otherwise): each pass runs every sample up to the next
  module to compress (q/k/v and gate/up, fed the same tensor, together) and stops there; the
  module is compressed and the next pass starts; a last pass gives the compressed outputs.
  Early passes stop early, and once the attention's targets are compressed its output is kept
  per sample and replayed: a Llama block runs its attention three times and its projections 18
  times (two forwards: twice and 14), about 1.4× the ``"compressed"`` mode's cost and 2.7× the
  paused mode's (measured with Wanda on SmolLM2 blocks at 2048 tokens). Only one batch's activations
  are alive at a time: memory grows with the sample count only by the block's inputs, outputs
  and the kept attention outputs (``n·s·h·4`` bytes more).
- ``"dense"``: one pass; the outputs of the dense block feed the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psutil
import torch
from greenlet import GreenletExit, greenlet
from torch import nn
from tqdm.auto import tqdm

from slimformer.errors import SlimformerError
from slimformer.machine import map_large_allocations, release_freed_memory
from slimformer.models.adapters import Adapter
from slimformer.models.streaming import is_loaded, stream_of


class _StopForward(Exception):
    """Raised by the last recorder to skip the final norm and head during capture."""


class BlockVisitor(Protocol):
    """What a calibration method tells the runner; see the module docstring."""

    def targets(self, index: int, block: nn.Module) -> dict[str, nn.Module]:
        """Modules of block ``index`` whose inputs to observe, by name."""
        ...

    def observe(self, name: str, module: nn.Module, inputs: torch.Tensor, batch: int) -> None:
        """Inputs of a target module for calibration batch ``batch`` (on the run device)."""
        ...

    def compress(self, name: str, module: nn.Module) -> None:
        """Change one target after every sample's inputs to it were observed."""
        ...


@dataclass
class BlockCall:
    """The arguments one block receives for one batch, besides its hidden states."""

    args: tuple
    kwargs: dict[str, Any]


def _move(obj: Any, device: torch.device | str, memo: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Move the tensors inside ``obj`` to ``device``; tensors shared between calls stay shared."""
    if isinstance(obj, torch.Tensor):
        hit = memo.get(id(obj))
        if hit is None:
            hit = memo[id(obj)] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return hit[1]
    if isinstance(obj, tuple):
        return tuple(_move(x, device, memo) for x in obj)
    if isinstance(obj, list):
        return [_move(x, device, memo) for x in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device, memo) for k, v in obj.items()}
    return obj


def _outer_to(adapter: Adapter, device: torch.device | str) -> None:
    """Move every parameter and buffer that is not inside a block (embeddings, rotary, head)."""
    in_blocks = {id(m) for block in adapter.blocks for m in block.modules()}
    for module in adapter.model.modules():
        if id(module) in in_blocks:
            continue
        for name, p in module.named_parameters(recurse=False):
            if not p.is_meta:  # a streamed model's head stays on disk until used
                p.data = p.data.to(device)
        for name, b in module.named_buffers(recurse=False):
            if not b.is_meta:
                module._buffers[name] = b.to(device)


def batches_of(samples: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split an ``(n, seqlen)`` tensor of token ids into batches."""
    if samples.ndim != 2 or samples.shape[0] == 0:
        raise SlimformerError("calibration samples must be a non-empty (n, seqlen) tensor of token ids")
    return list(samples.split(batch_size))


@torch.no_grad()
def capture(adapter: Adapter, batches: Sequence[torch.Tensor], device: str = "cpu",
            hidden: list | None = None) -> tuple[list, list]:
    """Record the inputs of every block for every batch, without running any block.

    Returns ``(hidden, calls)``: the hidden states entering block 0 (one CPU tensor per
    batch, appended to ``hidden`` when given: a store on disk) and ``calls[block][batch]``,
    each block's other arguments.
    """
    blocks = adapter.blocks
    hidden = [] if hidden is None else hidden
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            if index == 0:
                hidden.append(hidden_states.to("cpu"))
            calls[index].append(BlockCall(_move(args, "cpu", memo), _move(kwargs, "cpu", memo)))
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden_states

        return forward

    _outer_to(adapter, device)
    try:
        for i, block in enumerate(blocks):
            block.forward = recorder(i)  # an instance attribute shadows the class's forward
        for ids in batches:
            with contextlib.suppress(_StopForward):
                adapter.model(input_ids=ids.to(device), use_cache=False)
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
        _outer_to(adapter, "cpu")
    return hidden, calls


PROPAGATE = ("compressed", "sequential", "dense")


@contextlib.contextmanager
def observing(targets: dict[str, nn.Module], observe: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Call ``observe(name, module, inputs)`` before each target runs; always unhook."""
    handles = []
    try:
        for name, module in targets.items():

            def hook(mod, args, _name=name):
                observe(_name, mod, args[0])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` on ``device`` inside the block; moved back afterwards when it was elsewhere."""
    first = next(module.parameters(), None)
    home = first.device if first is not None else device
    moved = home != device
    if moved:
        module.to(device)
    try:
        yield module
    finally:
        if moved:
            module.to(home)


@contextlib.contextmanager
def scaled_inputs(scales: Sequence[tuple[nn.Module, torch.Tensor | Callable[[], torch.Tensor]]]) -> Iterator[None]:
    """Multiply the first input of each module by its scale (a tensor, or a function giving one) inside; always unhook.

    The one mask hook of the search: heads are masked at the input of the attention output
    projection, FFN units at that of the down projection. A function is called at every
    forward, so a scale computed from a leaf that requires gradients (importance masks) gets a
    fresh graph each pass.
    """
    handles = []
    try:
        for module, scale in scales:

            def hook(mod, args, scale=scale):
                factor = scale() if callable(scale) else scale
                return (args[0] * factor.to(args[0].dtype), *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class BlockRunner:
    """Runs a model one block at a time over calibration samples; see the module docstring.

    >>> runner = BlockRunner(adapter, samples)          # samples: (n, seqlen) token ids
    >>> runner.run(visitor)                             # calibrate + compress every block

    ``samples=None`` runs the visitor's ``compress`` on each block without any forward pass
    (magnitude pruning, RTN), so data-free methods stream from disk the same way.
    """

    def __init__(
        self,
        adapter: Adapter,
        samples: torch.Tensor | None,
        *,
        batch_size: int = 1,
        device: str = "cpu",
        progress: bool = True,
    ):
        self.adapter = adapter
        self.device = torch.device(device)
        self.progress = progress
        self.stream = stream_of(adapter)
        if self.stream is not None:
            map_large_allocations()  # else the heap's fragments grow the peak block after block
        self.records: dict[int, Any] = {}  # what the visitor's ``finish`` said about each block
        # paused sequential mode when its activations fit this many bytes (see the module docstring)
        self.paused_bytes = psutil.virtual_memory().available // 4
        self._batch = 0  # the batch being run: observers learn which sample an input belongs to
        if samples is None:
            self.hidden, self.calls = [], [[] for _ in adapter.blocks]
        else:
            if self.stream is not None:
                self.stream.load_module(adapter.model.get_input_embeddings())
            self.hidden, self.calls = capture(adapter, batches_of(samples, batch_size), device, self._new_states())
            if self.stream is not None:
                self.stream.release_embeddings()

    def _new_states(self) -> list:
        """Where a pass puts its per-batch outputs: a list, or files when a streamed run spills activations to disk."""
        return self.stream.new_states() if self.stream is not None else []

    @contextlib.contextmanager
    def _block(self, index: int, block: nn.Module | None = None) -> Iterator[nn.Module]:
        """Block ``index`` (or ``block``) with its weights in memory: read from disk and dropped again when streamed."""
        block = self.adapter.blocks[index] if block is None else block
        streamed = self.stream is not None and not is_loaded(block)
        if streamed:
            self.stream.load(block)
        try:
            yield block
        finally:
            if streamed:
                self.stream.release(block)
                release_freed_memory()  # SLEB and block scoring read every block again, round after round

    @torch.no_grad()
    def forward_block(
        self, index: int, hidden: Sequence[torch.Tensor], block: nn.Module | None = None, first: int = 0
    ) -> list:
        """Run block ``index`` (or a stand-in ``block``) over batches ``first, first + 1, …``; outputs on the CPU.

        The block runs on the runner's device: one that is elsewhere is moved there for the call
        and back afterwards (block scoring calls this directly, outside :meth:`run`); a streamed
        block is read from disk for the call.
        """
        memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        outs = self._new_states()
        with self._block(index, block) as block, on_device(block, self.device):
            for k, (h, call) in enumerate(zip(hidden, self.calls[index][first:])):
                self._batch = first + k
                args, kwargs = _move(call.args, self.device, memo), _move(call.kwargs, self.device, memo)
                out = block(h.to(self.device), *args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outs.append(out.to("cpu"))
        return outs

    def run(self, visitor: BlockVisitor | None = None, *, propagate: str = "compressed", desc: str = "blocks") -> list:
        """Run every block in order, letting ``visitor`` observe and compress its targets.

        ``propagate`` is ``"compressed"``, ``"sequential"`` or ``"dense"`` (see the module
        docstring). After a block's targets are compressed, the visitor's optional
        ``finish(index, block)`` returns a JSON-able record of the block (kept in
        :attr:`records`); on a streamed model the block is then written to its output shard and
        dropped, and a run interrupted later resumes after it (the visitor's ``restore(index,
        record)`` gets the records of the blocks done before). Returns the hidden states leaving
        the last block (before the final norm).
        """
        if propagate not in PROPAGATE:
            raise SlimformerError(f"propagate must be one of {', '.join(PROPAGATE)}, not '{propagate}'")
        hidden, start = self.hidden, 0
        resumed = self.stream.resume_point() if self.stream is not None else None
        if resumed is not None:
            start, hidden, self.records = resumed
            for i, record in sorted(self.records.items()):
                if visitor is not None and hasattr(visitor, "restore"):
                    visitor.restore(i, record)
        n = len(self.adapter.blocks)
        for i in tqdm(range(start, n), desc=desc, disable=not self.progress, initial=start, total=n):
            with self._block(i) as block:
                block.to(self.device)
                targets = visitor.targets(i, block) if visitor else {}
                if targets and propagate == "sequential":
                    hidden = self._forward_sequential(i, hidden, visitor, targets)
                else:
                    observe = lambda name, module, inputs: visitor.observe(name, module, inputs, self._batch)  # noqa: E731
                    with observing(targets, observe) if targets else contextlib.nullcontext():
                        outs = self.forward_block(i, hidden)
                    for name, module in targets.items():
                        visitor.compress(name, module)
                    hidden = self.forward_block(i, hidden) if targets and propagate == "compressed" else outs
                block.to("cpu")
                if visitor is not None and hasattr(visitor, "finish"):
                    self.records[i] = visitor.finish(i, block)
                if self.stream is not None:
                    self.stream.write(i, block)
                    self.stream.checkpoint(i + 1, hidden, self.records.get(i))
            if self.stream is None:  # a streamed block's memory went back as it was dropped (_block)
                release_freed_memory()  # else each block's freed memory stays with the process
        return hidden

    def _attention_of(self, block: nn.Module) -> nn.Module | None:
        """The module holding a block's attention projections (their deepest common parent), or None."""
        paths = [path.split(".") for path in self.adapter.family.attention.values()]
        prefix = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            prefix.append(parts[0])
        return block.get_submodule(".".join(prefix)) if paths and prefix else None

    @contextlib.contextmanager
    def _attention_replay(self, attention: nn.Module | None, cache: dict, ready: bool, batches: int) -> Iterator[None]:
        """Inside: once every target of the attention is compressed (``ready``), its outputs are kept on the
        first pass and replayed on the later ones, instead of computing the attention again each pass.

        ``cache["outputs"]`` holds one tensor per batch (in memory, or on disk when activations are
        spilled). An output with more than one tensor in it is never cached.
        """
        if attention is None or not ready:
            yield
            return
        if cache.get("outputs") is not None and len(cache["outputs"]) == batches:
            outputs, width = cache["outputs"], cache["width"]

            def replay(*args, **kwargs):
                out = outputs[self._batch].to(self.device)
                return (out, *[None] * (width - 1)) if width else out

            attention.forward = replay  # an instance attribute shadows the class's forward
            try:
                yield
            finally:
                attention.__dict__.pop("forward", None)
            return
        store, shape = self._new_states(), {"width": 0, "cacheable": True}

        def keep(module, args, out):
            rest = out[1:] if isinstance(out, tuple) else ()
            shape["width"] = len(out) if isinstance(out, tuple) else 0
            shape["cacheable"] &= all(r is None or not isinstance(r, torch.Tensor) for r in rest)
            store.append((out[0] if isinstance(out, tuple) else out).to("cpu"))

        handle = attention.register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
        if shape["cacheable"] and len(store) == batches:
            cache.update(outputs=store, width=shape["width"])

    def _paused_fits(self, hidden: list) -> bool:
        """Whether the paused sequential mode's activations (see the module docstring) fit :attr:`paused_bytes`."""
        if self.stream is not None or not hidden or not isinstance(hidden, list):
            return False  # a streamed run keeps to its budget's formula: bounded passes
        config = self.adapter.model.config
        h = hidden[0].shape[-1]
        inner = max(getattr(config, "intermediate_size", None) or 4 * h, h)
        tokens = sum(t.shape[0] * t.shape[1] for t in hidden)
        return tokens * (4 * h + 2 * inner) * 4 <= self.paused_bytes

    def _forward_sequential(self, index: int, hidden: list, visitor: BlockVisitor, targets: dict) -> list:
        """The sequential mode: paused samples when their activations fit, else bounded passes (module docstring)."""
        if self._paused_fits(hidden):
            return self._forward_paused(index, hidden, visitor, targets)
        return self._forward_passes(index, hidden, visitor, targets)

    @torch.no_grad()
    def _forward_paused(self, index: int, hidden: list, visitor: BlockVisitor, targets: dict) -> list:
        """One pass where each target is compressed once every sample has reached it.

        Each sample's forward runs in a greenlet (a coroutine on this thread) that pauses in the
        target's pre-hook; once all samples are paused at the same target, it is compressed and
        they resume, in sample order, so sums over samples are reproducible. Grad mode is shared
        by the greenlets: the whole pass runs under ``no_grad``.
        """
        done: set[str] = set()
        scheduler = greenlet.getcurrent()

        def pause(name, module, inputs):
            # a module called twice per forward is compressed once; a visitor that runs the module
            # itself while compressing it (from the scheduler, not a sample) is not observed
            if name not in done and greenlet.getcurrent() in batch_of:
                visitor.observe(name, module, inputs, batch_of[greenlet.getcurrent()])
                scheduler.switch(name)

        workers = [greenlet(lambda j=j: self.forward_block(index, hidden[j : j + 1], first=j)[0])
                   for j in range(len(hidden))]
        batch_of = {w: j for j, w in enumerate(workers)}
        with observing(targets, pause):
            try:
                stops = [w.switch() for w in workers]
                while not all(w.dead for w in workers):
                    paused = {stop for w, stop in zip(workers, stops) if not w.dead}
                    if len(paused) != 1 or any(w.dead for w in workers):
                        raise SlimformerError(f"block {index}: samples took different paths ({paused})")
                    name = paused.pop()
                    visitor.compress(name, targets[name])
                    done.add(name)
                    stops = [w.switch() for w in workers]
            finally:  # unwind paused samples now, inside no_grad, not later from the garbage collector
                for w in workers:
                    if not w.dead:
                        w.throw(GreenletExit)
        for name, module in targets.items():
            if name not in done:  # never called in the forward: compress with what was seen
                visitor.compress(name, module)
        return stops

    def _forward_passes(self, index: int, hidden: list, visitor: BlockVisitor, targets: dict) -> list:
        """Passes over the samples, each ending at the next target to compress; then one pass for the outputs.

        A pass runs each batch through the block until the first target not compressed yet,
        observes it and every further target fed the very same input tensor (q/k/v, gate/up),
        and stops that batch there; once every batch stopped, those targets are compressed and
        the next pass starts from the block input again. So a target observes the outputs of
        the compressed targets before it, and only one batch's activations are alive at a time
        (see the module docstring for the memory). Once the attention's own targets are all
        compressed, its output no longer changes: the first pass after that keeps it per batch
        and the later passes replay it, so a Llama block computes its attention twice rather than
        four times (the same numbers: the same computation, done once). A module called twice in
        a forward is compressed after its first call; a module never called is compressed with
        what was seen.
        """
        done: set[str] = set()
        attention = self._attention_of(self.adapter.blocks[index])
        inside = {name for name, module in targets.items()
                  if attention is not None and any(module is m for m in attention.modules())}
        cache: dict = {}
        while True:
            group: list[str] | None = None
            ready = bool(inside) and inside <= done
            with self._attention_replay(attention, cache, ready, len(hidden)):
                for j in range(len(hidden)):
                    seen: list[str] = []
                    fed: list[torch.Tensor] = []

                    def stop_at(name, module, inputs, j=j, seen=seen, fed=fed):
                        if name in done:
                            return
                        if fed and inputs is not fed[0]:
                            raise _StopForward
                        fed[:1] = [inputs]
                        visitor.observe(name, module, inputs, j)
                        seen.append(name)

                    with observing(targets, stop_at), contextlib.suppress(_StopForward):
                        self.forward_block(index, hidden[j : j + 1], first=j)
                    fed.clear()
                    if group is None:
                        group = seen
                    elif seen != group:
                        raise SlimformerError(f"block {index}: samples took different paths ({group} and {seen})")
            if not group:
                break
            for name in group:
                visitor.compress(name, targets[name])
                done.add(name)
            if done >= set(targets):  # nothing left to reach: the output pass comes next
                break
        for name, module in targets.items():
            if name not in done:  # never called in the forward: compress with what was seen
                visitor.compress(name, module)
        ready = bool(inside) and inside <= done
        with self._attention_replay(attention, cache, ready, len(hidden)):
            return self.forward_block(index, hidden)
