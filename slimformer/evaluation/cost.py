"""What a model costs: parameters (all and non-zero), weight bytes on disk, FLOPs per token, peak memory, speed.

``measure_costs`` gathers them for a dense model and its compressed versions in one process,
so their figures are directly comparable; the report reads its output as ``costs``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimformer.errors import SlimformerError
from slimformer.machine import peak_rss_gib
from slimformer.evaluation.speed import compare_speed, prefill_seconds
from slimformer.models.adapters import get_adapter, weight_shape
from slimformer.models.quantized import QuantizedLinear, quantized_modules
from slimformer.models.moe import expert_weights, moe_modules, router_weight, top_k_of
from slimformer.models.surgery import block_shape, head_dim

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Applied to one position per sequence (BERT's [CLS] pooler), not to every token.
_PER_SEQUENCE = ("pooler",)


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    # Tied weights may be distinct Parameter objects over the same memory: key on the memory too.
    seen, unique = set(), []
    for p in model.parameters():
        key = (p.device, p.data_ptr(), tuple(p.shape), p.dtype)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def param_counts(model: nn.Module) -> dict[str, int]:
    """``total`` parameters and the ``nonzero`` ones (pruned weights are zeros); tied weights count once.

    A quantized module's weights are int codes (buffers, not parameters): each code counts as one
    parameter, non-zero unless it equals its zero point.
    """
    params = _unique_parameters(model)
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in params)
    seen = set()
    for module in quantized_modules(model).values():
        if module.codes.data_ptr() in seen:
            continue
        seen.add(module.codes.data_ptr())
        q = module.quantized_weight()
        total += q.codes.numel()
        nonzero += int((q.codes != q.zero.repeat_interleave(q.group, 1)).sum())
    return {"total": total, "nonzero": nonzero}


def size_on_disk(path: str | Path) -> int:
    """Bytes of the weight files (safetensors, bin, pt, pth, gguf) of a saved model folder, or of one weight file."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise SlimformerError(f"no model file or folder at {path}")
    files = [f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise SlimformerError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    return sum(f.stat().st_size for f in files)


def _attention_context(config, block: int, seq_len: int) -> int:
    """Tokens a query of block ``block`` attends to: ``seq_len``, or the window of a sliding-window layer."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window:
        return seq_len
    if layer_types is not None:  # Gemma 2/3, Qwen2: per-layer; Mistral has none and slides everywhere
        sliding = block < len(layer_types) and layer_types[block] == "sliding_attention"
        return min(seq_len, window) if sliding else seq_len
    return min(seq_len, window)


def _expert_flops(block: nn.Module) -> float:
    """Per-token FLOPs of a MoE block's router and of the ``k`` experts one token is routed to."""
    router = router_weight(block)
    per_expert = sum(p[0].numel() for p in expert_weights(block))
    return 2 * router.numel() + 2 * top_k_of(block) * per_expert


def flops_per_token(model: nn.Module, seq_len: int, *, fractions: list[dict[str, float] | None] | None = None) -> float:
    """Forward FLOPs of one token with ``seq_len`` tokens of context, causal LM or encoder.

    ``2 × W`` for every Linear (or GPT-2 Conv1D) weight matrix of ``W`` elements that each
    token passes — the blocks' projections and the LM head (a bare encoder has none; BERT's
    pooler sees one token per sequence and is left out) — plus, per block, ``2 × 2 × ctx ×
    heads × head_dim`` for the attention scores ``QKᵀ`` and the weighted sum of values, with
    ``ctx = seq_len`` (the window on sliding-window layers). Blocks are read one by one, so
    a model whose blocks differ in shape is counted as it is. Biases, norms, softmax and
    activations are left out (a few per cent for small models), and zeros from pruning are
    counted: dense kernels multiply them too. For a causal LM this is the cost of the token
    at position ``seq_len`` (a decode step with that much cache); a prefill of ``seq_len``
    tokens averages about half the attention term. In a mixture-of-experts block a token pays
    for the router and for the ``k`` experts it is routed to (their stacked weights are not
    Linears), besides any Linear of the block (a shared FFN or expert).

    ``fractions`` counts a sub-network without cutting it out (the one FLOP count of the search
    and of measurement): per block, the kept fraction of each projection's outputs by role
    (``q``, ``k``, ``v``, ``qkv``, ``o``, ``gate``, ``up``, ``down``) and of its ``heads``, or
    None for a dropped block.
    """
    if seq_len < 1:
        raise SlimformerError(f"seq_len must be at least 1, not {seq_len}")
    adapter = get_adapter(model)
    roles = {id(m): (b, role) for b, block in enumerate(adapter.blocks) for role, m in adapter.linears(block).items()}
    flops = 0.0
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D, QuantizedLinear)) and not any(p in name.split(".") for p in _PER_SEQUENCE):
            share = 1.0
            if fractions is not None and id(module) in roles:
                b, role = roles[id(module)]
                share = 0.0 if fractions[b] is None else fractions[b][role]
            flops += 2 * math.prod(weight_shape(module)) * share
    flops += sum(_expert_flops(block) for block in moe_modules(model).values())
    hd = head_dim(adapter)
    for b, block in enumerate(adapter.blocks):
        if fractions is not None and fractions[b] is None:
            continue
        heads = block_shape(adapter, block)["heads"] * (1.0 if fractions is None else fractions[b]["heads"])
        flops += 2 * 2 * _attention_context(adapter.config, b, seq_len) * heads * hd
    return flops


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process in GiB (``rss_gib``), plus ``cuda_max_allocated_gib`` when CUDA is up."""
    memory = {"rss_gib": peak_rss_gib()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        memory["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return memory


def _is_causal_lm(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate and can_generate())


def compare_prefill(models: dict[str, nn.Module], ids: torch.Tensor, *, repeats: int = 5) -> dict[str, dict]:
    """Median prefill seconds of each model over ``repeats``, one warm-up each, the models taking turns."""
    for model in models.values():
        prefill_seconds(model, ids)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name].append(prefill_seconds(model, ids))
    return {name: {"prefill_s": statistics.median(r), "runs": {"prefill_s": r}} for name, r in runs.items()}


def measure_costs(
    models: dict[str, nn.Module],
    ids: torch.Tensor,
    repeats: int = 5,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
    decode: bool = True,
) -> dict:
    """Parameters, FLOPs per token and speed of each model, measured in this process, the models alternating.

    The first model is the reference (the dense one): every model gets ``prefill_speedup``
    (and ``decode_speedup``) against it. ``ids`` (shape ``(1, L)``) is the prefill input and
    ``L`` the FLOPs context; the first ``prompt_tokens`` of it prompt ``new_tokens`` of
    greedy decoding (see :func:`compare_speed` for the medians). Decoding is measured only
    when ``decode`` is set and every model is a causal LM; encoders get prefill only.
    Returns ``{"settings", "models": {name: figures}, "peak_memory"}``.
    """
    if not models:
        raise SlimformerError("measure_costs needs at least one model")
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise SlimformerError(f"ids must be one sequence of shape (1, L), not {tuple(ids.shape)}")
    if repeats < 1:
        raise SlimformerError(f"repeats must be at least 1, not {repeats}")
    ids = ids.to(next(iter(models.values())).device)
    decoding = decode and all(_is_causal_lm(m) for m in models.values())
    if decoding:
        speed = compare_speed(models, ids, repeats=repeats, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
    else:
        speed = compare_prefill(models, ids, repeats=repeats)
    figures = {}
    for name, model in models.items():
        counts = param_counts(model)
        figures[name] = {"params": counts["total"], "nonzero_params": counts["nonzero"],
                         "flops_per_token": flops_per_token(model, ids.shape[1]), **speed[name]}
    reference = next(iter(figures.values()))
    for entry in figures.values():
        entry["prefill_speedup"] = reference["prefill_s"] / entry["prefill_s"]
        if decoding:
            entry["decode_speedup"] = entry["decode_tok_s"] / reference["decode_tok_s"]
    settings = {"seq_len": ids.shape[1], "repeats": repeats, "decode": decoding}
    if decoding:
        settings.update(prompt_tokens=min(prompt_tokens, ids.shape[1]), new_tokens=new_tokens)
    return {"settings": settings, "models": figures, "peak_memory": peak_memory()}


def _layer_key(module: nn.Module) -> tuple:
    """What a linear layer's decode cost depends on: its kind, shape and weight format."""
    out_features, in_features = weight_shape(module)
    if isinstance(module, QuantizedLinear):
        return ("quantized", in_features, out_features, module.scheme.describe(), module.kernel)
    return (type(module).__name__, in_features, out_features, str(module.weight.dtype))


class DecodeCost:
    """Seconds per greedily decoded token, predicted from the model's own linear layers timed on this machine.

    A decode step is dominated by the projections and the head, each applied to one row: their
    cost per call is measured by running every layer of one kind, shape and format once in turn
    (so the weights stream from memory as in a real step, rather than sitting in cache), and
    kept by that key for any later model. What the layers do not explain (attention against the
    cache, norms, the framework's per-call work) is a cost per block, calibrated on one model whose
    decode step was measured end to end (:meth:`calibrate`). A structural or format change is
    then priced without running ``generate``: removing blocks removes their layers and overhead,
    quantization changes the layers' keys. Pruned weights stored densely cost what dense ones do.
    """

    def __init__(self, repeats: int = 5):
        self.repeats = repeats
        self.per_call: dict[tuple, float] = {}
        self.per_block = 0.0

    @staticmethod
    def layers(model: nn.Module) -> list[nn.Module]:
        """The linear layers a decode step runs: every block's projections, and the head."""
        adapter = get_adapter(model)
        found = [m for block in adapter.blocks for m in block.modules()
                 if isinstance(m, (nn.Linear, Conv1D, QuantizedLinear))]
        head = model.get_output_embeddings()
        return found + ([head] if head is not None else [])

    @torch.no_grad()
    def _measure(self, modules: list[nn.Module]) -> float:
        first = modules[0]
        in_features = weight_shape(first)[1]
        dtype = next((p.dtype for p in first.parameters() if p.is_floating_point()), torch.float32)
        x = torch.randn(1, 1, in_features, dtype=dtype)
        for m in modules:  # warm-up: kernels packed, allocator settled
            m(x)
        passes = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            for m in modules:
                m(x)
            passes.append((time.perf_counter() - start) / len(modules))
        return statistics.median(passes)

    def layer_seconds(self, model: nn.Module) -> float:
        """Seconds of one decode step spent in the linear layers (layers of an unseen kind are timed now)."""
        groups: dict[tuple, list[nn.Module]] = {}
        for m in self.layers(model):
            groups.setdefault(_layer_key(m), []).append(m)
        for key, modules in groups.items():
            if key not in self.per_call:
                self.per_call[key] = self._measure(modules)
        return sum(self.per_call[key] * len(modules) for key, modules in groups.items())

    def calibrate(self, model: nn.Module, step_seconds: float) -> None:
        """Set the per-block overhead from ``model``'s measured decode step (seconds per token)."""
        blocks = len(get_adapter(model).blocks)
        self.per_block = max(0.0, step_seconds - self.layer_seconds(model)) / blocks

    def predict(self, model: nn.Module) -> float:
        """Predicted seconds per decoded token of ``model``."""
        return self.layer_seconds(model) + self.per_block * len(get_adapter(model).blocks)

    def to_dict(self) -> dict:
        """The timings as plain data: per-call seconds by layer key, and the per-block overhead."""
        return {"per_block_s": self.per_block, "per_call_s": {" ".join(map(str, k)): v for k, v in self.per_call.items()}}
