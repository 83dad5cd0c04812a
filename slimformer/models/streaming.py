"""Models larger than memory: a weightless skeleton whose blocks are read from the safetensors shards one at a time and written out as they finish.

A :class:`Stream` is built on a checkpoint folder (one ``model.safetensors`` or shards with
``model.safetensors.index.json``). The model is created on the meta device (accelerate's
``init_empty_weights``), only the parts outside the blocks (embeddings, final norm, head) are
read; a block's weights are read from the memory-mapped shards when the block runner needs it
(:meth:`Stream.load`) and dropped again (:meth:`Stream.release`). A finished block is written
to its own output shard at once (:meth:`Stream.write`), so the resident memory is one block,
the calibration activations and what the method keeps. Checkpoints that store a block's tensors
otherwise than the model holds them (MoE experts, stacked by transformers as it loads) are read
and written through transformers' own conversion, one block at a time (:class:`Conversion`).

Everything is written into a work folder beside the output (``.NAME.streaming``), which also
holds the progress of the block runner (the next block, the hidden states entering it, what
the method recorded about the finished blocks). When the calibration activations do not fit
the memory budget either, they go to disk too (:class:`DiskStates`, ``Stream.spill``): one file
per batch, read when that batch runs. A run that stops resumes there when it is
started again with the same job; :meth:`Stream.commit` writes the rest (blocks never run,
embeddings, head, config, tokenizer, the index as ``save_pretrained`` writes it) and renames
the folder into place, so an unfinished run never leaves a model at the output path. A run
killed at any point (``SIGKILL`` included) resumes: every file appears by a rename, the block
shards stay in the work folder until the progress file is gone, and temporaries a kill left
are removed on resume.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME as INDEX  # the index save_pretrained writes

from slimformer.errors import SlimformerError
from slimformer.files import atomic_path, link_or_copy, remove_temporaries, write_text
from slimformer.models.adapters import Adapter, get_adapter
from slimformer.models.quant_storage import checkpoint_tensors, config_with_quantization
from slimformer.models.quantized import quantized_modules

log = logging.getLogger(__name__)



def name_shards(folder: Path, files: list[str], keep: bool = False) -> None:
    """Rename weight files in ``folder`` to ``model.safetensors`` (one) or ``model-K-of-N.safetensors`` with an index.

    The index is ``model.safetensors.index.json`` as ``save_pretrained`` writes it; files are
    read for their tensor names only (headers). With ``keep`` the files stay where they are and
    the new names are hard links to them, so a run killed part way can name them again.
    """
    def name(file: str, new: str) -> None:
        link_or_copy(folder / file, folder / new) if keep else os.replace(folder / file, folder / new)

    if len(files) == 1:
        name(files[0], "model.safetensors")
        return
    weight_map, size = {}, 0
    for k, file in enumerate(files):
        new = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        name(file, new)
        with safe_open(folder / new, "pt") as f:
            weight_map.update({key: new for key in f.keys()})
        size += (folder / new).stat().st_size
    write_text(folder / INDEX, json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map},
                                          indent=2, sort_keys=True))


class Checkpoint:
    """The tensors of a safetensors checkpoint folder, read one at a time from the memory-mapped files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {k: self.folder / v for k, v in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise SlimformerError(f"no safetensors weights in {self.folder}")
            self.file_of = {}
            for file in files:
                with safe_open(file, "pt") as f:
                    self.file_of.update({k: file for k in f.keys()})
        self._open: dict[Path, Any] = {}

    def _handle(self, key: str):
        file = self.file_of[key]
        if file not in self._open:
            self._open[file] = safe_open(file, "pt")
        return self._open[file]

    def close(self) -> None:
        """Unmap the files: pages read stay out of this process's resident memory once a block is read."""
        self._open.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def meta(self, key: str) -> torch.Tensor:
        """A tensor of ``key``'s shape on the meta device, from the file's header (nothing is read)."""
        return torch.empty(self._handle(key).get_slice(key).get_shape(), device="meta")

    def bits(self, key: str) -> int:
        """Bits per element ``key`` is stored with, from the file's header."""
        dtype = self._handle(key).get_slice(key).get_dtype()
        return {"F64": 64, "I64": 64, "F32": 32, "I32": 32, "F16": 16, "BF16": 16, "I16": 16}.get(dtype, 8)

    def read(self, key: str) -> torch.Tensor:
        """One tensor, copied out of the mapped file."""
        if key not in self.file_of:
            raise SlimformerError(f"checkpoint {self.folder} has no tensor '{key}'")
        return self._handle(key).get_tensor(key)


class Conversion:
    """transformers' renamings and merges between a checkpoint's tensor names and the model's, one block at a time.

    Some checkpoints store tensors the model holds otherwise: MoE checkpoints keep each expert's
    matrices apart (Mixtral's under other names too) and transformers stacks them into one
    tensor per projection as it loads, and splits them again as it saves. The same transforms
    (``get_model_conversion_mapping``) applied to one block's tensors give that block's
    parameters, and reverted (``revert_weight_conversion``), the tensors ``save_pretrained``
    writes.
    """

    def __init__(self, model: nn.Module):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model) or []
        self.model = model
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def to_model(self, keys: Iterable[str], read, cast=lambda t: t, release=lambda: None) -> dict[str, torch.Tensor]:
        """The model's tensors made of the checkpoint tensors ``keys`` (all one block stores), passed through ``cast``.

        One target at a time: its sources are read (``read(key)``, then ``release()``, which may
        unmap the pages read), joined, let go, then cast, so beyond what is already cast the
        memory is one target's sources and their join.
        """
        import copy

        from transformers.core_model_loading import WeightRenaming, apply_converters, apply_renamings, dot_natural_key

        by_pattern = {k: c for c in self.converters for k in c.source_patterns}
        targets: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        for key in sorted(keys, key=dot_natural_key):
            renamed, pattern = apply_converters(apply_renamings(key, self.renamings), self.converters)
            if pattern is None:
                targets.setdefault(renamed, (WeightRenaming(key, renamed), []))[1].append((key, key))
            else:  # each target gets its own converter, which collects its sources
                targets.setdefault(renamed, (copy.deepcopy(by_pattern[pattern]), []))[1].append((key, pattern))
        out = {}
        while targets:
            name, (transform, sources) = targets.popitem()
            for key, pattern in sources:
                transform.add_tensor(name, key, pattern, read(key))
            release()
            made = transform.convert(name, model=self.model, config=self.model.config)
            del transform  # it holds the sources
            for target, value in made.items():
                out[target] = cast(value[0] if isinstance(value, list) else value)
            del made
        return out

    def to_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for the model's ``tensors`` (one block's)."""
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)


class DiskStates:
    """Hidden states of the calibration batches on disk, one safetensors file per batch, read one batch at a time.

    A list of tensors to the block runner (``append``, ``len``, indexing, iteration), whose
    memory is one batch instead of all of them. An ``owned`` folder is removed when the object
    is garbage-collected (the runner drops a block's inputs once its outputs exist); a
    checkpoint's folder is not owned.
    """

    def __init__(self, folder: str | Path, owned: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._count = len(list(self.folder.glob("*.safetensors")))
        if owned:
            weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def _file(self, j: int) -> Path:
        return self.folder / f"{j:06d}.safetensors"

    def append(self, tensor: torch.Tensor) -> None:
        """Write the next batch's hidden states."""
        save_file({"hidden": tensor.contiguous()}, self._file(self._count))
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, j: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(self._count))]
        if not -self._count <= j < self._count:
            raise IndexError(j)
        return load_file(self._file(j % self._count))["hidden"]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[j] for j in range(self._count))

    def link_into(self, folder: Path) -> None:
        """Put the batch files into ``folder`` as hard links (copies where links are not possible)."""
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(self._count):
            link_or_copy(self._file(j), folder / self._file(j).name)

    @property
    def nbytes(self) -> int:
        """Bytes of the states on disk (headers included)."""
        return sum(self._file(j).stat().st_size for j in range(self._count))


def save_states(hidden: Iterable[torch.Tensor], folder: Path) -> None:
    """Write per-batch hidden states (a list or :class:`DiskStates`) into ``folder``, one file per batch."""
    if isinstance(hidden, DiskStates):
        hidden.link_into(folder)
        return
    states = DiskStates(folder, owned=False)
    for h in hidden:
        states.append(h)


def states_bytes(hidden: Iterable[torch.Tensor]) -> int:
    """Bytes held by per-batch hidden states, in memory or on disk."""
    if isinstance(hidden, DiskStates):
        return hidden.nbytes
    return sum(t.numel() * t.element_size() for t in hidden)


def _assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` of ``module`` (on the meta device or not)."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _tensors_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s parameters and buffers by name: what a checkpoint stores of it."""
    return [*module.named_parameters(), *module.named_buffers()]


def is_loaded(module: nn.Module) -> bool:
    """Whether ``module``'s weights are in memory (not on the meta device)."""
    return not any(t.is_meta for t in [*module.parameters(), *module.buffers()])


class Stream:
    """A model whose blocks live on disk; see the module docstring.

    ``dtype`` is what the blocks compute in (the source is cast on reading), ``out_dtype`` what
    the output shards store (default: ``dtype``, so a streamed run writes the very bytes an
    in-memory run saves). ``job`` identifies the work (method, samples, source): a work folder
    left by another job is discarded, one left by the same job is resumed.
    """

    def __init__(self, source: str | Path, model: nn.Module, out: str | Path, *, dtype: torch.dtype,
                 out_dtype: torch.dtype | None = None, job: dict | None = None, overwrite: bool = False,
                 resume: bool = True):
        self.source = Checkpoint(source)
        self.model, self.adapter = model, get_adapter(model)
        self.dtype, self.out_dtype = dtype, out_dtype or dtype
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise SlimformerError(f"output '{self.out}' exists; choose another path or allow overwriting")
        self.work = self.out.parent / f".{self.out.name}.streaming"
        self.job = json.loads(json.dumps(job or {}, default=str))
        prefix = self.adapter.block_prefix
        self.source_of = {id(b): f"{prefix}.{i}." for i, b in enumerate(self.adapter.blocks)}
        self.written: dict[int, tuple[int, str]] = {}  # id(block) -> (index written at, file)
        self.spill = False  # calibration activations on disk (DiskStates) instead of in memory
        self.conversion: Conversion | None = None  # set when the checkpoint names block tensors otherwise
        self.convert_bytes = 0  # the most a block's read holds beyond the block itself, through the conversion
        self._spilled = itertools.count()
        self._check_names()
        self._start(resume)
        self._load_outer()
        model.adapter_stream = self  # how the block runner finds it

    def _check_names(self) -> None:
        """Find each block's tensors in the checkpoint, through transformers' conversion where names differ.

        Refuses, before any work, a checkpoint that stores a block tensor neither under the model's
        own name nor under one :class:`Conversion` maps to it with the model's shape.
        """
        unnamed = [block for block in self.adapter.blocks
                   if any(self.source_of[id(block)] + name not in self.source for name, _ in _tensors_of(block))]
        if not unnamed:
            return
        self.conversion = Conversion(self.model)
        self.keys_of = {src: [k for k in self.source.file_of if k.startswith(src)] for src in self.source_of.values()}
        for block in unnamed:
            src = self.source_of[id(block)]
            try:
                found = self.conversion.to_model(self.keys_of[src], self.source.meta)
            except Exception:  # a transform that does not fit this checkpoint
                found = {}
            bits = max(self.source.bits(k) for k in self.keys_of[src]) if found else 0
            # reading a converted tensor holds its sources and their join, both as stored
            self.convert_bytes = max(self.convert_bytes, max((2 * t.numel() * bits // 8 for t in found.values()), default=0))
            for name, tensor in _tensors_of(block):
                if src + name not in found or found[src + name].shape != tensor.shape:
                    raise SlimformerError(f"streaming cannot find '{src + name}' in {self.source.folder}, under that "
                                          f"name or one transformers converts to it: run without --max-memory")
        self.source.close()

    # -- progress --------------------------------------------------------------------------------
    def _start(self, resume: bool) -> None:
        progress = self.work / "progress.json"
        if resume and progress.exists():
            state = json.loads(progress.read_text())
            if state.get("job") == self.job:
                self.progress = state
                remove_temporaries(self.work)
                log.info("resuming at block %d from %s", state.get("next", 0), self.work)
                return
            log.warning("discarding %s: it was left by a different job", self.work)
        shutil.rmtree(self.work, ignore_errors=True)
        (self.work / "blocks").mkdir(parents=True)
        self.progress = {"job": self.job, "next": 0, "records": {}, "files": {}}
        self._save_progress()

    def _save_progress(self) -> None:
        with atomic_path(self.work / "progress.json") as tmp:
            tmp.write_text(json.dumps(self.progress))

    def new_states(self) -> list | DiskStates:
        """An empty store for per-batch hidden states: a list, or files in the work folder when :attr:`spill` is set."""
        if not self.spill:
            return []
        return DiskStates(self.work / "activations" / f"{next(self._spilled):06d}")

    def resume_point(self) -> tuple[int, list | DiskStates, dict[int, Any]] | None:
        """``(next block, hidden states entering it, records of the finished blocks)`` of an interrupted run, or None."""
        k = self.progress["next"]
        if not k:
            return None
        states = DiskStates(self.work / self.progress["hidden"], owned=False)
        hidden = states if self.spill else list(states)
        for j, block in enumerate(self.adapter.blocks[:k]):
            self.written[id(block)] = (j, self.progress["files"][str(j)])
        return k, hidden, {int(i): r for i, r in self.progress["records"].items()}

    def checkpoint(self, next_index: int, hidden: list | DiskStates, record: Any = None) -> None:
        """After block ``next_index - 1`` was written: keep the hidden states entering the next block and its record.

        The states go to a new folder (hard links for states already on disk); the progress
        file then names it, and only then is the previous one removed, so a kill at any point
        leaves a consistent checkpoint.
        """
        name = f"hidden-{next_index:05d}"
        shutil.rmtree(self.work / name, ignore_errors=True)
        save_states(hidden, self.work / name)
        previous = self.progress.get("hidden")
        self.progress.update(next=next_index, hidden=name)
        self.progress["records"][str(next_index - 1)] = record
        self._save_progress()
        if previous and previous != name:
            shutil.rmtree(self.work / previous, ignore_errors=True)

    # -- weights ---------------------------------------------------------------------------------
    def _load_outer(self) -> None:
        """Read what is outside the blocks, except an untied head: calibration never needs it (see :meth:`load_head`)."""
        prefix = self.adapter.block_prefix + "."
        head = self.model.get_output_embeddings()
        head_names = {f"{n}.weight" for n, m in self.model.named_modules() if m is head}
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if name.startswith(prefix) or not tensor.is_meta or name in head_names:
                continue
            if name not in self.source:
                raise SlimformerError(f"streaming needs the checkpoint's tensor names to match the model's: "
                                      f"{self.source.folder} has no '{name}'")
            _assign(self.model, name, self.source.read(name).to(self.dtype))
        self.source.close()
        self.model.tie_weights()
        if not tied:
            for name in head_names:
                if name not in self.source:
                    raise SlimformerError(f"streaming needs the checkpoint's tensor names to match the model's: "
                                          f"{self.source.folder} has no '{name}'")

    def load_module(self, module: nn.Module) -> None:
        """Read the parameters of a module outside the blocks (the head, an embedding) that are not in memory."""
        if module is None or is_loaded(module):
            return
        name = next(n for n, m in self.model.named_modules() if m is module)
        for key, p in module.named_parameters():
            if p.is_meta:
                _assign(module, key, self.source.read(f"{name}.{key}").to(self.dtype))
        self.source.close()

    def load_head(self) -> None:
        """Read the output head (block scoring by loss and head quantization need it)."""
        self.load_module(self.model.get_output_embeddings())

    def releasable_bytes(self) -> int:
        """Bytes :meth:`release_embeddings` frees once the block inputs are recorded."""
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if (head is not None and head.weight is embed.weight) or not is_loaded(embed):
            return 0
        return sum(p.numel() * p.element_size() for p in embed.parameters())

    def release_embeddings(self) -> None:
        """Drop the input embedding once the block inputs are recorded (it is read again to be written).

        Kept when the head shares it: the tie must hold in memory for the checkpoint to store it once.
        """
        embed, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        if head is not None and head.weight is embed.weight:
            return
        for key, p in embed.named_parameters():
            _assign(embed, key, torch.empty_like(p, device="meta"))

    def load(self, block: nn.Module) -> None:
        """Read ``block``'s weights from the source checkpoint (where it started, before any block was removed)."""
        if is_loaded(block):
            return
        src = self.source_of[id(block)]
        if self.conversion is None:
            for name, _ in _tensors_of(block):
                _assign(block, name, self.source.read(src + name).to(self.dtype))
        else:
            found = self.conversion.to_model(self.keys_of[src], self.source.read, lambda t: t.to(self.dtype),
                                             self.source.close)
            for name, _ in _tensors_of(block):
                _assign(block, name, found.pop(src + name))
            del found
        self.source.close()

    def release(self, block: nn.Module) -> None:
        """Drop ``block``'s weights from memory."""
        block.to("meta")

    def write(self, index: int, block: nn.Module) -> None:
        """Write block ``index`` (as it is now: pruned, quantized…) to its own output shard."""
        prefix = f"{self.adapter.block_prefix}.{index}."
        file = f"blocks/block-{index:05d}.safetensors"
        tensors = checkpoint_tensors(block, prefix, self.out_dtype)
        if self.conversion is not None and not quantized_modules(block):
            # as in memory: save_pretrained converts back, the quantized checkpoint writer stores the model's tensors
            tensors = {k: t.contiguous() for k, t in self.conversion.to_checkpoint(tensors).items()}
        with atomic_path(self.work / file) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        self.written[id(block)] = (index, file)
        self.progress["files"][str(index)] = file

    def peak_block_bytes(self) -> int:
        """Bytes of the largest block once read in the compute dtype."""
        scale = torch.finfo(self.dtype).bits / 8
        sizes = []
        for block in self.adapter.blocks:
            numel = sum(p.numel() for p in [*block.parameters(), *block.buffers()])
            sizes.append(numel * scale)
        return int(max(sizes, default=0))

    # -- the output ------------------------------------------------------------------------------
    def commit(self, tokenizer=None) -> Path:
        """Write what is not written yet, the config, tokenizer and index, and move the model to the output path."""
        blocks = self.adapter.blocks
        files = []
        for j, block in enumerate(blocks):
            done = self.written.get(id(block))
            if done is None or done[0] != j:
                was_loaded = is_loaded(block)
                self.load(block)
                self.write(j, block)
                if not was_loaded:
                    self.release(block)
            files.append(self.written[id(block)][1])
        prefix = self.adapter.block_prefix + "."
        # a head or embedding still on disk is unchanged: copied straight into the output dtype
        on_disk = [n for n, t in self.model.state_dict(keep_vars=True).items() if t.is_meta and not n.startswith(prefix)]
        outer = checkpoint_tensors(self.model, "", self.out_dtype, skip=(prefix, *on_disk))
        outer.update({name: self.source.read(name).to(self.out_dtype) for name in on_disk})
        self.source.close()
        with atomic_path(self.work / "blocks" / "outer.safetensors") as tmp:
            save_file(outer, tmp, metadata={"format": "pt"})
        # linked, not moved: until progress.json goes, a killed commit resumes from blocks/
        name_shards(self.work, [*files, "blocks/outer.safetensors"], keep=True)
        self._write_config()
        if tokenizer is not None:
            tokenizer.save_pretrained(self.work)
        leftovers = ["progress.json", "blocks", "activations", self.progress.get("hidden") or "hidden"]
        for leftover in leftovers:
            path = self.work / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.work, self.out)
        del self.model.adapter_stream
        return self.out

    def _write_config(self) -> None:
        self.model.config.dtype = self.out_dtype
        quantized = bool(quantized_modules(self.model))
        (config_with_quantization(self.model) if quantized else self.model.config).save_pretrained(self.work)
        generation = getattr(self.model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(self.work)

    def abandon(self) -> None:
        """Forget the stream on the model; the work folder stays for a resumed run."""
        self.model.__dict__.pop("adapter_stream", None)


def stream_of(adapter: Adapter) -> Stream | None:
    """The stream backing ``adapter``'s model, or None for a model in memory."""
    return adapter.model.__dict__.get("adapter_stream")


def ensure_loaded(adapter: Adapter, module: nn.Module | None) -> None:
    """Make sure ``module`` (the head, an embedding) is in memory: a streamed model reads it on first use."""
    stream = stream_of(adapter)
    if stream is not None and module is not None:
        stream.load_module(module)
