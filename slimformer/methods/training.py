"""The one training loop of recovery: windows of a training text, held-out scoring, early stopping, sparse masks, LoRA and quantized bases.

Every recovery method (plain fine-tuning, distillation, LoRA) differs only in the loss of a
batch; this module owns everything around it:

- windows cut from a training text (not the evaluation text), seeded and shuffled, with a
  held-out slice that is never trained on, and a refusal of budgets that would loop over a few
  windows (memorising them, as a long fine-tune on four calibration windows does);
- AdamW with linear warm-up and cosine decay, a held-out loss every ``eval_every`` steps, the
  best step kept and training stopped after ``patience`` evaluations without improvement;
- weights that are exactly zero (pruning, N:M) stay zero: their gradients are masked and the
  mask is applied again after every step, or, with LoRA, the merged update is masked;
- LoRA through ``peft`` on the family's block projections, merged into a plain model at the end;
- a quantized model trains over its dequantized weights, which go back onto their own grid
  (scale and zero point) at the end.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from slimformer.data import cut_windows
from slimformer.errors import SlimformerError
from slimformer.methods.base import select_linears
from slimformer.models.adapters import Adapter, next_token_nll, weight_matrix
from slimformer.models.quantized import dequantize_model, install, quantized_modules
from slimformer.models.quantizer import QuantizedWeight, quantize


SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainingFields:
    """Fields of every recovery method: the training text and budget, the optimiser, held-out scoring, LoRA.

    ``data`` is a named source (see ``slimformer.data.SOURCES_HELP``) that should not be the
    evaluation text; ``tokens`` the training budget (``steps``, when given, overrides it). A budget
    that needs more than ``max_epochs`` passes over the training windows is refused. ``heldout``
    windows are set aside and scored every ``eval_every`` steps; training stops after
    ``patience`` scores without improvement (0: never) and the best step is kept. The learning rate
    warms up linearly over the ``warmup`` fraction of the steps, then follows ``schedule``
    (``cosine`` decay to zero, or ``constant``). ``lora_rank``
    > 0 trains LoRA adapters (``peft``) on ``lora_targets`` (projection roles such as ``q``,
    ``down``; empty: all of them) instead of every weight. ``masked_merge`` keeps a sparse
    model's zeros when the adapters are merged. ``checkpointing`` recomputes block activations
    in the backward pass (less memory, about a third more compute). A quantized model trains over
    its dequantized weights; ``regrid`` puts each weight back on its own grid at the end, and
    ``regrid: false`` leaves the trained float weights for a later step to quantize afresh (GPTQ
    or AWQ on the trained weights), which keeps more of the gain where int4 rounding would undo it.
    """

    data: str = "wikitext2:valid+alpaca"
    tokens: int = 200_000
    steps: int | None = None
    seqlen: int = 512
    batch_size: int = 4
    lr: float = 5e-5
    warmup: float = 0.05
    schedule: str = "cosine"
    weight_decay: float = 0.0
    heldout: int = 16
    eval_every: int = 10
    patience: int = 3
    max_epochs: float = 1.0
    checkpointing: bool = False
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ()
    masked_merge: bool = True
    regrid: bool = True
    seed: int = 0
    device: str = "cpu"

    def check_training(self) -> None:
        """Refuse values no training run can use."""
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("tokens", "seqlen", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise SlimformerError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.seqlen < 2:
            raise SlimformerError(f"seqlen must be at least 2, not {self.seqlen}")
        if self.steps is not None and self.steps < 1:
            raise SlimformerError(f"steps must be at least 1, not {self.steps}")
        if self.lr <= 0:
            raise SlimformerError(f"learning rate must be positive, not {self.lr}")
        if self.schedule not in SCHEDULES:
            raise SlimformerError(f"unknown schedule '{self.schedule}'; choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise SlimformerError(f"warmup is a fraction of the steps in [0, 1), not {self.warmup}")
        if self.heldout < 0 or self.patience < 0 or self.lora_rank < 0:
            raise SlimformerError("heldout, patience and lora_rank cannot be negative")
        if self.max_epochs <= 0:
            raise SlimformerError(f"max_epochs must be positive, not {self.max_epochs}")
        if not 0 <= self.lora_dropout < 1:
            raise SlimformerError(f"lora_dropout must be in [0, 1), not {self.lora_dropout}")

    def planned_steps(self) -> int:
        """Optimiser steps of the budget."""
        return self.steps or math.ceil(self.tokens / (self.batch_size * self.seqlen))


def split_windows(ids: torch.Tensor, config: TrainingFields, what: str = "the training text") -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows of ``config.seqlen`` cut from token ids ``(1, L)``, shuffled with ``config.seed``.

    The held-out windows are the last ``config.heldout`` of the shuffle and never trained on.
    Refuses a budget that needs more than ``config.max_epochs`` passes over the training windows.
    Token ids ``(R, L)`` with aligned rows (ids and labels) give windows ``(n, R, seqlen)``.
    """
    rows = ids.reshape(-1, ids.shape[-1])
    windows = torch.stack([cut_windows(row[None], config.seqlen) for row in rows], 1)
    windows = windows[:, 0] if ids.dim() == 1 or ids.shape[0] == 1 else windows
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(config.seed))
    windows = windows[order]
    if windows.shape[0] < config.heldout + config.batch_size:
        raise SlimformerError(f"{what} gives {windows.shape[0]} windows of {config.seqlen} tokens, fewer than "
                              f"{config.heldout} held-out windows plus one batch of {config.batch_size}")
    train, heldout = windows[: windows.shape[0] - config.heldout], windows[windows.shape[0] - config.heldout :]
    needed = config.planned_steps() * config.batch_size
    if needed > config.max_epochs * train.shape[0]:
        raise SlimformerError(
            f"a budget of {needed * config.seqlen:,} tokens is {needed / train.shape[0]:.1f} passes over the "
            f"{train.shape[0] * config.seqlen:,} training tokens of {what} ({train.shape[0]} windows of "
            f"{config.seqlen}); training that long on so little text memorises it: give a larger text, fewer "
            f"tokens, or max_epochs ≥ {math.ceil(needed / train.shape[0])}")
    return train, heldout


PRUNED_SHARE = 0.5  # zeros in a quantized weight that mark it pruned rather than rounded (see _zero_masks)


def _zero_masks(adapter: Adapter, quantized: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Where every block projection that has zeros has them (the pattern pruning left).

    A float weight has exact zeros only where pruning put them. A quantized one (named in
    ``quantized``, already dequantized) also has them wherever rounding landed on the zero point:
    about 15% of SmolLM2's weights at int4 g64. Those are not a pattern to keep, so a quantized
    weight counts as pruned only when at least half of it is zero, as 50% and every N:M with
    N ≥ M/2 leave it.
    """
    masks = {}
    for name, module in select_linears(adapter).items():
        zeros = weight_matrix(module) == 0
        if zeros.any() and (name not in quantized or zeros.float().mean() >= PRUNED_SHARE):
            masks[name] = zeros
    return masks


def _grids(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Each quantized module's grid (its codes, scales, zero points, scheme) by name."""
    return {name: module.quantized_weight() for name, module in quantized_modules(model).items()}


def _regrid(model: nn.Module, grids: dict[str, QuantizedWeight]) -> None:
    """Put every trained float weight back on its module's own grid and swap the quantized module back in."""
    weights = {}
    for name, grid in grids.items():
        w = model.get_submodule(name).weight.detach()
        rows, cols = w.shape
        groups = grid.scale.shape[1]
        codes = quantize(w.reshape(rows * groups, cols // groups), grid.scale.reshape(-1).float(),
                         grid.zero.reshape(-1).float(), grid.scheme)
        weights[name] = QuantizedWeight(codes.reshape(rows, cols).to(torch.int8), grid.scale, grid.zero, grid.scheme)
    install(model, weights)


def _lora_names(adapter: Adapter, targets: tuple[str, ...]) -> list[str]:
    """Fully-qualified names of the block projections whose role is in ``targets`` (all roles when empty)."""
    roles = {**adapter.family.attention, **adapter.family.mlp}
    unknown = [t for t in targets if t not in roles]
    if unknown:
        raise SlimformerError(f"unknown projection role(s) {unknown} for {adapter.family.name}; "
                              f"choose from {', '.join(roles)}")
    paths = [roles[t] for t in (targets or roles)]
    return [n for n in select_linears(adapter) if any(n.endswith("." + p) for p in paths)]


def _attach_lora(adapter: Adapter, config: TrainingFields, extra: list[str] = ()):
    """Wrap the model with ``peft`` LoRA adapters on the family's projections and the Linears ``extra``; every other weight is frozen. Returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=_lora_names(adapter, config.lora_targets) + list(extra), bias="none")
    return get_peft_model(adapter.model, lora)


def _merge_lora(peft_model, masks: dict[str, torch.Tensor] | None) -> dict[str, int]:
    """Add every adapter's update ``B·A·α/r`` to its base weight (only where ``masks`` keeps weights) and remove the adapters."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    merged, masked = 0, 0
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        with torch.no_grad():
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            zeros = (masks or {}).get(name.removeprefix(prefix))
            if zeros is not None:
                delta = delta.masked_fill(_param_mask(base, zeros), 0)
                masked += int(zeros.sum())
            base.weight.data += delta.to(base.weight.dtype)
        merged += 1
    peft_model.unload()
    return {"merged_modules": merged, "masked_weights": masked}


def _param_mask(module: nn.Module, zeros: torch.Tensor) -> torch.Tensor:
    """A (out, in) mask laid out as the module stores its weight (GPT-2's Conv1D stores (in, out))."""
    return zeros.t() if isinstance(module, Conv1D) else zeros


class Trainer:
    """One training run of an adapted model: its trainable parameters, optimiser, held-out scoring and history."""

    def __init__(self, adapter: Adapter, config: TrainingFields, heldout: torch.Tensor, progress: bool = True,
                 after_step: Callable[[], None] | None = None):
        self.adapter, self.config, self.heldout, self.progress = adapter, config, heldout, progress
        self.after_step = after_step or (lambda: None)
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def heldout_loss(self) -> float | None:
        """Mean next-token loss (nats) on the held-out windows (on their labelled tokens, for ``(n, 2, T)`` ids and labels); None without any."""
        if not self.heldout.shape[0]:
            return None
        model = self.adapter.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for window in self.heldout.split(self.config.batch_size):
            window = window.to(self.config.device)
            ids, labels = (window[:, 0], window[:, 1]) if window.dim() == 3 else (window, window)
            hidden = self.adapter.base(input_ids=ids, use_cache=False).last_hidden_state
            total += float(next_token_nll(self.adapter, hidden, labels).sum())
            count += int((labels[:, 1:] >= 0).sum())
        model.train(was_training)
        return total / count

    def run(self, batches: list[torch.Tensor], step_loss: Callable[[int, torch.Tensor], torch.Tensor],
            desc: str = "train") -> dict[str, Any]:
        """Train on ``batches`` in order; ``step_loss(i, batch)`` is batch ``i``'s loss. Keeps the best held-out step.

        A batch is ``(B, T)`` token ids, or ``(B, 2, T)`` ids and labels for a loss on labelled tokens only.

        Returns the figures of the run: steps, tokens, training tokens/s (evaluation excluded),
        the held-out loss before and at the best step, and the history of both losses. The best
        step may be step 0: then the model is left as it came.
        """
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        c, model = self.config, self.adapter.model
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(list(named.values()), lr=c.lr, weight_decay=c.weight_decay)
        warmup = int(c.warmup * len(batches))
        schedule = get_constant_schedule_with_warmup(optimizer, warmup) if c.schedule == "constant" else \
            get_cosine_schedule_with_warmup(optimizer, warmup, len(batches))
        best = first = self.heldout_loss()
        keep = first is not None
        best_step, waited, stopped_early = 0, 0, False
        best_state = {n: p.detach().clone() for n, p in named.items()} if keep else None
        self.history.append({"step": 0, "tokens": 0, "heldout": first})
        tokens, train_s, losses, step = 0, 0.0, [], 0
        model.train()
        bar = tqdm(total=len(batches), desc=desc, unit="step", disable=not self.progress)
        try:
            for step, batch in enumerate(batches, 1):
                start = time.perf_counter()
                loss = step_loss(step - 1, batch.to(c.device))
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                self.after_step()
                train_s += time.perf_counter() - start
                tokens += batch.shape[0] * batch.shape[-1]  # a batch of (ids, labels) pairs counts its ids
                losses.append(loss.item())
                bar.update(1)
                if step % c.eval_every and step != len(batches):
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                    continue
                held = self.heldout_loss()
                self.history.append({"step": step, "tokens": tokens, "loss": sum(losses) / len(losses), "heldout": held})
                losses = []
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.3f}", heldout=f"{held:.3f}" if keep else "-")
                if keep and held < best:
                    best, best_step, waited = held, step, 0
                    best_state = {n: p.detach().clone() for n, p in named.items()}
                elif keep:
                    waited += 1
                    if c.patience and waited >= c.patience:
                        stopped_early = True
                        break
        finally:
            bar.close()
            model.eval()
        if best_state is not None:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(best_state[n])
        return {"steps": step, "planned_steps": len(batches), "tokens": tokens, "train_seconds": train_s,
                "tokens_per_s": tokens / train_s if train_s else None, "heldout_before": first,
                "heldout_best": best, "best_step": best_step, "stopped_early": stopped_early,
                "history": self.history}


def training_session(adapter: Adapter, config: TrainingFields, heldout: torch.Tensor, progress: bool = True,
                     train_in_full: Callable[[str], bool] | None = None, lora_extra: list[str] = ()):
    """A :class:`Trainer` over the model made ready for ``config``: LoRA or full training, masks, quantized bases.

    With LoRA, the Linears named in ``lora_extra`` get adapters too (a MoE block's shared expert),
    and the parameters whose names ``train_in_full`` accepts (experts and routers) are trained in
    full beside the adapters.

    Returns ``(trainer, finish)``; ``finish()`` merges LoRA (masked where weights are pruned),
    puts quantized weights back on their grids (with ``regrid``), and returns what that did with
    the held-out loss before and after it.
    """
    model = adapter.model.to(config.device)
    grids = _grids(model)
    if grids:
        dequantize_model(model)
    masks = _zero_masks(adapter, set(grids))
    modules = select_linears(adapter)
    handles, peft_model, after_step = [], None, None
    if config.lora_rank:
        peft_model = _attach_lora(adapter, config, lora_extra)
        for name, p in model.named_parameters():
            if train_in_full is not None and train_in_full(name):
                p.requires_grad_(True)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        handles = [modules[n].weight.register_hook(lambda g, z=_param_mask(modules[n], zeros): g.masked_fill(z, 0))
                   for n, zeros in masks.items()]

        def after_step() -> None:  # AdamW moves a weight whose gradient is zero only by weight decay
            with torch.no_grad():
                for n, zeros in masks.items():
                    weight_matrix(modules[n]).masked_fill_(zeros, 0)

    if config.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(adapter, config, heldout, progress, after_step)

    def finish() -> dict[str, Any]:
        out: dict[str, Any] = {"masked_pattern_weights": sum(int(z.sum()) for z in masks.values())}
        if config.checkpointing:
            model.gradient_checkpointing_disable()
        for handle in handles:
            handle.remove()
        if peft_model is not None:
            out["heldout_unmerged"] = trainer.heldout_loss()
            out.update(_merge_lora(peft_model, masks if config.masked_merge else None))
            out["heldout_merged"] = trainer.heldout_loss()
        for p in model.parameters():
            p.requires_grad_(True)
        if grids:
            out["heldout_float"] = trainer.heldout_loss()
            if config.regrid:
                _regrid(model, grids)
                out["heldout_requantized"] = trainer.heldout_loss()
        model.to("cpu").eval()
        return out

    return trainer, finish
