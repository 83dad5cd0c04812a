"""Recovery after compression: plain fine-tuning, knowledge distillation from the original model, and LoRA, on one training loop.

Three method names share one function and differ in their defaults:

- ``finetune``: cross-entropy on the next token, every weight trained;
- ``distill``: logit distillation (forward KL at a temperature; reverse KL or Jensen-Shannon as
  options) from a teacher, optionally with hidden-state distillation of mapped blocks and a
  cross-entropy term, every weight trained;
- ``lora``: LoRA adapters (``peft``) trained with cross-entropy, or with distillation when
  ``kd_weight`` is set (``kd+lora``), merged into a plain model of the same shape at the end.

The teacher's outputs are computed once per training window before training starts and cached
(in memory, or in files under ``cache``): the top-k logits at the temperature and their
log-sum-exp, and the outputs of the teacher blocks that the student's blocks map to. A block
maps by where it came from: after block removal the student's block ``i`` was the original
block ``config.slimformer_block_origin[i]``, so a 24-block student learns from the right 24 of
the teacher's 30. A distillation step thus costs one teacher forward per window (a third of a
training step) plus the loss, and the cache costs ``(8k + 4)`` bytes per token for the logits
and ``2 · hidden · blocks`` bytes per token for hidden states (bfloat16).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from slimformer.errors import SlimformerError
from slimformer.methods.base import MethodResult, config_dict, register
from slimformer.methods.distill_math import (HIDDEN_LOSSES, KD_LOSSES, chunked_head_loss, hidden_loss,
                                             kd_divergence, teacher_topk)
from slimformer.methods.training import TrainingFields, split_windows, training_session
from slimformer.models.adapters import Adapter, weight_shape


@dataclass(frozen=True)
class RecoveryConfig(TrainingFields):
    """The training objective of every recovery method (see the module docstring); plus :class:`TrainingFields`.

    The loss is ``ce_weight · CE + kd_weight · KD + hidden_weight · hidden``. ``teacher`` is a
    model spec (alias, folder, GGUF, hub id); in a recipe, none means the model before the
    recipe. KD uses the teacher's ``top_k`` logits at ``temperature`` with divergence ``loss``
    (kl, reverse_kl, js); hidden-state KD compares ``hidden_blocks`` evenly spaced student blocks
    (the last among them) with their teacher blocks by ``hidden_loss`` (mse, cosine). ``cache``
    names a folder for the teacher cache (default: memory).
    """

    method: ClassVar[str] = "recover"
    # 2e-4, not 5e-5: on SmolLM2-135M after SLEB 6/30, 6 steps of CE reach perplexity 36.1 at 2e-4
    # against 45.0 at 5e-5, KD 39.0 against 46.4 (benchmarks/results/recovery_smollm2.md)
    lr: float = 2e-4
    teacher: str | None = None
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    hidden_weight: float = 0.0
    loss: str = "kl"
    temperature: float = 1.0
    top_k: int = 64
    hidden_loss: str = "mse"
    hidden_blocks: int = 4
    cache: str | None = None

    def __post_init__(self):
        self.check_training()
        if min(self.ce_weight, self.kd_weight, self.hidden_weight) < 0 or \
                not (self.ce_weight or self.kd_weight or self.hidden_weight):
            raise SlimformerError("ce_weight, kd_weight and hidden_weight are non-negative and not all zero")
        if self.loss not in KD_LOSSES:
            raise SlimformerError(f"unknown KD loss '{self.loss}'; choose one of {', '.join(KD_LOSSES)}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise SlimformerError(f"unknown hidden-state loss '{self.hidden_loss}'; "
                                  f"choose one of {', '.join(HIDDEN_LOSSES)}")
        if self.temperature <= 0 or self.top_k < 1 or self.hidden_blocks < 1:
            raise SlimformerError("temperature must be positive; top_k and hidden_blocks at least 1")

    @property
    def needs_teacher(self) -> bool:
        """Whether the loss reads a teacher's outputs."""
        return bool(self.kd_weight or self.hidden_weight)

    @property
    def train_source(self) -> str:
        """The text a recipe tokenises and hands to this method (instead of calibration windows)."""
        return self.data


@dataclass(frozen=True)
class FinetuneConfig(RecoveryConfig):
    """Plain fine-tuning: next-token cross-entropy on a training text, every weight trained, pruned weights kept at zero.

    YAML: ``{method: finetune, tokens: 200000, data: "wikitext2:valid+alpaca"}``
    """

    method: ClassVar[str] = "finetune"


@dataclass(frozen=True)
class DistillConfig(RecoveryConfig):
    """Knowledge distillation from the model before compression (Hinton et al., 2015), every weight trained.

    YAML: ``{method: distill, tokens: 200000, temperature: 1.0, top_k: 64, hidden_weight: 0.0}``
    """

    method: ClassVar[str] = "distill"
    ce_weight: float = 0.0
    kd_weight: float = 1.0


@dataclass(frozen=True)
class LoRAConfig(RecoveryConfig):
    """LoRA (Hu et al., 2021) through ``peft``: low-rank adapters on the block projections, merged at the end.

    Cross-entropy by default; ``kd_weight: 1, ce_weight: 0`` distils into the adapters instead.
    YAML: ``{method: lora, lora_rank: 16, lr: 2e-4, tokens: 200000}``
    """

    method: ClassVar[str] = "lora"
    lora_rank: int = 16


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, folder: Path | None, name: str) -> torch.Tensor:
    """A zero tensor in memory, or mapped onto a file in ``folder``."""
    if folder is None:
        return torch.zeros(shape, dtype=dtype)
    path = folder / f"{name}.bin"
    path.unlink(missing_ok=True)
    return torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=dtype).view(shape)


def hidden_pairs(student: Adapter, teacher: Adapter, count: int) -> list[tuple[int, int]]:
    """(student block, teacher block) pairs for hidden-state KD: ``count`` evenly spaced student blocks, the last included.

    Each student block maps to the teacher block it came from (see ``Adapter.block_origin``).
    """
    n = len(student.blocks)
    chosen = sorted({max(0, round((j + 1) * n / min(count, n)) - 1) for j in range(min(count, n))})
    where = {origin: i for i, origin in enumerate(teacher.block_origin())}
    origin = student.block_origin()
    missing = [origin[s] for s in chosen if origin[s] not in where]
    if missing:
        raise SlimformerError(f"the teacher has no block for the student's original block(s) {missing}; "
                              "hidden-state distillation needs a teacher that kept them")
    return [(s, where[origin[s]]) for s in chosen]


class BlockOutputs:
    """Forward hooks that keep the outputs of chosen blocks (the hidden states they pass on)."""

    def __init__(self, adapter: Adapter, indices: list[int]):
        self.outputs: dict[int, torch.Tensor] = {}
        self._handles = [adapter.blocks[i].register_forward_hook(self._keep(i)) for i in indices]

    def _keep(self, index: int):
        def hook(module, args, out):
            self.outputs[index] = out[0] if isinstance(out, tuple) else out
        return hook

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self._handles:
            handle.remove()


class TeacherCache:
    """The teacher's top-k logits (with their log-sum-exp) and mapped block outputs for each training window."""

    def __init__(self, teacher: Adapter, windows: torch.Tensor, config: RecoveryConfig, pairs: list[tuple[int, int]],
                 folder: Path | None = None, progress: bool = True):
        n, t = windows.shape
        k = min(config.top_k, weight_shape(teacher.head)[0])
        hidden = teacher.config.hidden_size
        self.values = _buffer((n, t - 1, k), torch.float32, folder, "values")
        self.index = _buffer((n, t - 1, k), torch.int32, folder, "index")
        self.lse = _buffer((n, t - 1), torch.float32, folder, "lse")
        self.hidden = _buffer((n, len(pairs), t, hidden), torch.bfloat16, folder, "hidden") if pairs else None
        start = time.perf_counter()
        hooks = BlockOutputs(teacher, [tb for _, tb in pairs])
        try:
            with torch.no_grad():
                from tqdm.auto import tqdm

                for i in tqdm(range(n), desc="teacher", unit="window", disable=not progress):
                    window = windows[i : i + 1].to(config.device)
                    h = teacher.base(input_ids=window, use_cache=False).last_hidden_state[0, :-1]
                    for a in range(0, h.shape[0], 512):
                        v, idx, lse = teacher_topk(teacher.logits(h[a : a + 512]), k, config.temperature)
                        self.values[i, a : a + 512], self.index[i, a : a + 512], self.lse[i, a : a + 512] = v, idx, lse
                    for j, (_, tb) in enumerate(pairs):
                        self.hidden[i, j] = hooks.outputs[tb][0].to(torch.bfloat16).cpu()
        finally:
            hooks.remove()
        self.seconds = time.perf_counter() - start
        self.bytes = sum(b.numel() * b.element_size() for b in (self.values, self.index, self.lse, self.hidden)
                         if b is not None)


def _load_teacher(spec: str, device: str) -> Adapter:
    from slimformer.models import load_model

    loaded = load_model(spec)
    loaded.model.to(device).eval()
    return loaded.adapter


def _batches(train: torch.Tensor, config: RecoveryConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The budget's batches in order and, for each, the positions of its windows in ``train`` (passes wrap around)."""
    steps = config.planned_steps()
    order = torch.arange(steps * config.batch_size) % train.shape[0]
    positions = list(order.split(config.batch_size))
    return [train[p] for p in positions], positions


@register(FinetuneConfig)
@register(DistillConfig)
@register(LoRAConfig)
def recover(adapter: Adapter, config: RecoveryConfig, samples: torch.Tensor | None, progress: bool = True) -> MethodResult:
    """Train the model on windows of the token ids ``samples`` ``(1, L)`` with the objective of ``config``; keep the best held-out step."""
    if samples is None or samples.numel() == 0:
        raise SlimformerError(f"{config.method} needs a training text; the one given is empty")
    if adapter.family.kind != "decoder":
        raise SlimformerError(f"{config.method} trains a causal LM; {adapter.family.name} is an encoder")
    train, heldout = split_windows(samples, config, f"'{config.data}'")
    batches, positions = _batches(train, config)
    used = torch.unique(torch.cat(positions))
    cache, pairs = None, []
    summary: dict[str, Any] = {"train_windows": int(train.shape[0]), "heldout_windows": int(heldout.shape[0])}
    tmp = None
    if config.needs_teacher:
        if config.teacher is None:
            raise SlimformerError(f"{config.method} with kd_weight or hidden_weight needs a teacher: give 'teacher' "
                                  "(a model spec), or run it in a recipe, where the teacher is the model before it")
        teacher = _load_teacher(config.teacher, config.device)
        if config.hidden_weight:
            pairs = hidden_pairs(adapter, teacher, config.hidden_blocks)
        folder = Path(config.cache) if config.cache else None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.TemporaryDirectory(dir=folder)
            folder = Path(tmp.name)
        cache = TeacherCache(teacher, train[used], config, pairs, folder, progress)
        del teacher
        slot = torch.full((train.shape[0],), -1, dtype=torch.long)
        slot[used] = torch.arange(used.numel())
        summary.update(teacher_cache_bytes=cache.bytes, teacher_cache_seconds=cache.seconds,
                       teacher_cache_bytes_per_token=cache.bytes / (used.numel() * train.shape[1]),
                       hidden_pairs=[list(p) for p in pairs])
    trainer, finish = training_session(adapter, config, heldout, progress)
    hooks = BlockOutputs(adapter, [s for s, _ in pairs])
    head_params = [p for p in adapter.head.parameters()] if adapter.head is not None else []

    def step_loss(i: int, batch: torch.Tensor) -> torch.Tensor:
        hidden = adapter.base(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        h = hidden.reshape(-1, hidden.shape[-1])
        n = h.shape[0]
        targets = batch[:, 1:].reshape(-1)
        rows = slot[positions[i]] if cache is not None else None
        if cache is not None and config.kd_weight:
            values, index, lse = (cache.values[rows].flatten(0, 1), cache.index[rows].flatten(0, 1),
                                  cache.lse[rows].flatten(0, 1))

        def chunk_loss(logits: torch.Tensor, a: int, b: int) -> torch.Tensor:
            loss = logits.new_zeros((), dtype=torch.float32)
            if config.ce_weight:
                ce = torch.nn.functional.cross_entropy(logits.float(), targets[a:b], reduction="sum")
                loss = loss + config.ce_weight * ce
            if config.kd_weight:
                kd = kd_divergence(logits, values[a:b].to(logits.device), index[a:b].to(logits.device),
                                   lse[a:b].to(logits.device), config.loss, config.temperature)
                loss = loss + config.kd_weight * kd
            return loss / n

        total = chunked_head_loss(h, adapter.logits, chunk_loss, head_params) if (config.ce_weight or config.kd_weight) \
            else h.new_zeros(())
        if pairs:
            taught = cache.hidden[rows].to(h.device)
            distance = sum(hidden_loss(hooks.outputs[s], taught[:, j].float(), config.hidden_loss)
                           for j, (s, _) in enumerate(pairs)) / len(pairs)
            total = total + config.hidden_weight * distance
        return total

    try:
        summary.update(trainer.run(batches, step_loss, desc=config.method))
    finally:
        hooks.remove()
        summary.update(finish())
        if tmp is not None:
            tmp.cleanup()
    summary["heldout_after"] = summary.get("heldout_requantized", summary.get("heldout_merged", summary["heldout_best"]))
    return MethodResult(config.method, config_dict(config), summary=summary)
