"""The peak resident memory a streamed method run will need, estimated before any work, so a budget is refused up front.

The terms follow the block runner's memory (see :mod:`slimformer.calibration`): one block's
weights in the compute dtype, the hidden states entering and leaving the block for every
sample, one batch's activations inside the block, the cast copy of a finished block being
written, and what the method keeps (Hessians, input rows, cached states), on top of what the
process holds already (interpreter, libraries, embeddings). With the activations on disk
(``Stream.spill``) the hidden states of one batch in and one out remain, and SLEB's states per
kept block go to disk as well.
"""

from __future__ import annotations

import torch

from slimformer.errors import SlimformerError
from slimformer.machine import current_rss_bytes
from slimformer.methods.blocks import SLEBConfig
from slimformer.methods.experts import ExpertFields, ExpertMergeConfig
from slimformer.methods.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig
from slimformer.methods.quantization import AWQConfig, GPTQConfig, RTNConfig
from slimformer.models.adapters import Adapter, weight_matrix
from slimformer.models.moe import moe_modules, moe_modules_within, router_weight
from slimformer.models.streaming import stream_of

STREAMABLE = (MagnitudeConfig, WandaConfig, SparseGPTConfig, RTNConfig, GPTQConfig, AWQConfig, SLEBConfig,
              ExpertFields)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``4GiB``, ``512MiB``, ``1.5GB`` or ``2000000``."""
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise SlimformerError(f"cannot read the memory size '{text}': give a number and a unit such as 4GiB or 512MiB")
    return int(value * _UNITS[unit])


def _input_groups(adapter: Adapter, block) -> list[tuple[int, int]]:
    """(input width, projections fed it) for each distinct input of a block's projections (q/k/v share one).

    The family's scale pairs name the projections that read one tensor (AWQ scales them
    together); a projection in no pair reads its own.
    """
    roles = adapter.linears(block)
    grouped = [g for g in (tuple(r for r in targets if r in roles) for _, targets in adapter.family.scale_pairs) if g]
    alone = [(r,) for r in roles if not any(r in g for g in grouped)]
    order = list(roles)  # the adapter names a block's projections in forward order
    groups = sorted(grouped + alone, key=lambda g: order.index(g[0]))
    return [(weight_matrix(roles[g[0]]).shape[1], len(g)) for g in groups]


def _hessian_bytes(groups: list[tuple[int, int]], sequential: bool) -> int:
    """Bytes of the float32 Hessians alive at once, with the working copy of the inverse factor.

    A Hessian is let go once the last projection fed its input is compressed, and that one makes
    its inverse factor in it; the others sharing it make theirs in a copy. Sequentially, one
    input's Hessian is gathered and used at a time (the one before, in forward order, may be
    held until every sample has passed it); otherwise every Hessian of the block is gathered
    before the first is used.
    """
    sizes = [w * w * 4 for w, _ in groups]
    shared = max([w * w * 4 for w, n in groups if n > 1], default=0)
    if not sequential:
        return sum(sizes) + shared
    return max(size * (2 if n > 1 else 1) + (sizes[i - 1] if i else 0)
               for i, (size, (_, n)) in enumerate(zip(sizes, groups)))


def _bits(config) -> tuple[int, int] | None:
    """(bits, columns per scale) of a quantizing step's output, or None when it writes float weights."""
    bits = getattr(config, "bits", None)
    if not bits:
        return None
    group = getattr(config, "group_size", None)
    return bits, group if group and group > 0 else 2**31


def estimate_peak(adapter: Adapter, config, nsamples: int, seqlen: int) -> dict[str, int]:
    """Bytes of each term of a streamed run's peak (``total`` is their sum); see the module docstring.

    ``4 ·`` counts float32 activations and statistics, whatever the weights' dtype. The stream's
    ``spill`` setting says whether the hidden states are counted in memory or on disk.
    """
    stream = stream_of(adapter)
    if stream is None:
        raise SlimformerError("the memory estimate is for a streamed model (load_streamed)")
    if not isinstance(config, STREAMABLE):
        raise SlimformerError(f"{config.method} needs the whole model in memory; it does not stream block by block")
    block = adapter.blocks[0]
    widths = [weight_matrix(m).shape for m in adapter.linears(block).values()]
    hidden = adapter.model.get_input_embeddings().weight.shape[1]
    inner = max(max(w) for w in widths)
    calibrated = getattr(config, "needs_samples", True) and not isinstance(config, (MagnitudeConfig, RTNConfig))
    n, s = (nsamples, seqlen) if calibrated else (0, 0)
    batch = min(getattr(config, "batch_size", 1), max(n, 1))
    resident = min(batch, n) if stream.spill else n  # samples whose hidden states are in memory at once
    now, embedding = current_rss_bytes(), stream.releasable_bytes() if calibrated else 0
    sequential = getattr(config, "propagate", None) == "sequential"
    quantized = _bits(config)
    block_bytes = stream.peak_block_bytes()
    linear_numel = sum(w[0] * w[1] for w in widths)
    if quantized:  # packed codes, a scale and a zero point per group, and the float rest of the block
        bits, group = quantized
        rest = block_bytes - linear_numel * torch.finfo(stream.dtype).bits // 8
        out_bytes = linear_numel * bits // 8 + 2 * 2 * -(-linear_numel // group) + \
            rest * torch.finfo(stream.out_dtype).bits // torch.finfo(stream.dtype).bits
    else:
        out_bytes = block_bytes * torch.finfo(stream.out_dtype).bits // torch.finfo(stream.dtype).bits
    terms = {
        "process": now - embedding,  # interpreter, libraries, final norm; the embedding goes after the capture
        "block": block_bytes,
        # the block's inputs and outputs; the sequential mode also keeps the attention's outputs
        "activations": (3 if sequential else 2) * resident * s * hidden * 4,
        "pass": batch * s * (6 * hidden + 4 * inner) * 4,  # one batch inside the block
        "method": 0,
        # a finished block is serialised whole (its tensors, then their bytes) before its shard is written
        "write": 2 * out_bytes,
    }
    largest = max(w[0] * w[1] for w in widths)  # elements of the largest weight matrix
    if isinstance(config, (GPTQConfig, SparseGPTConfig)) or getattr(config, "then", None) == "gptq":
        # the Hessians, and what the column loop keeps besides (it works in the weight itself): the
        # mask and codes, its blocks of columns, then the de-quantized copy written back
        terms["method"] = _hessian_bytes(_input_groups(adapter, block), sequential) + largest * 4
    if isinstance(config, AWQConfig):
        terms["method"] += 4 * config.max_rows * inner * 4 + 2 * largest * config.clip_rows * 4 // 32
    if quantized:
        terms["method"] += linear_numel  # the int8 codes of the block's finished projections
    if isinstance(config, ExpertFields):
        # a MoE block's inputs, flattened to tokens and joined, then at most max_tokens of them scored: merging
        # runs every expert on them, the output criterion keeps a few block outputs; the experts kept or merged
        # are new tensors, made one stacked parameter at a time while the old one is still there
        tokens = min(n * s, config.max_tokens)
        moes = moe_modules_within(moe_modules(adapter.model), block).values()
        experts = max((router_weight(m).shape[0] for m in moes), default=0)
        scored = experts if isinstance(config, ExpertMergeConfig) else 3
        largest_param = max((p.numel() for m in moes for p in m.parameters()), default=0)
        kept = config.kept(experts) / experts if experts else 0
        terms["method"] = 2 * n * s * hidden * 4 + scored * tokens * hidden * 4 + \
            int(largest_param * kept) * torch.finfo(stream.dtype).bits // 8
    if isinstance(config, SLEBConfig):
        states = (len(adapter.blocks) + 1) * resident * s * hidden * 4  # the hidden state entering every kept block
        terms["method"] = states + int(config.cache_gib * 2**30)
    if stream.convert_bytes:
        # a converted tensor's sources and their join, as stored, while a block is read: before any pass, so
        # only what it needs beyond the pass, the method and the write, which come after it, adds to the peak
        terms["convert"] = max(0, stream.convert_bytes - terms["pass"] - terms["method"] - terms["write"])
    # the capture pass, before the embedding is dropped, holds it and the block inputs only
    terms["total"] = max(sum(terms.values()), now + terms["activations"] // 2)
    return terms


ACTIVATIONS = ("auto", "memory", "disk")


def check_budget(adapter: Adapter, config, nsamples: int, seqlen: int, budget: int,
                 activations: str = "auto") -> dict[str, int]:
    """The estimate of :func:`estimate_peak`; a run whose estimate exceeds ``budget`` bytes is refused in one line.

    ``activations``: ``memory`` keeps the calibration hidden states in memory, ``disk`` spills
    them to the stream's work folder, ``auto`` spills only when they would not fit. Sets the
    stream's ``spill`` accordingly.
    """
    if activations not in ACTIVATIONS:
        raise SlimformerError(f"activations must be one of {', '.join(ACTIVATIONS)}, not '{activations}'")
    stream = stream_of(adapter)
    if stream is None:
        raise SlimformerError("the memory estimate is for a streamed model (load_streamed)")
    stream.spill = activations == "disk"
    terms = estimate_peak(adapter, config, nsamples, seqlen)
    if terms["total"] > budget and activations == "auto":
        stream.spill = True
        spilled = estimate_peak(adapter, config, nsamples, seqlen)
        if spilled["total"] < terms["total"]:
            terms = spilled
        else:
            stream.spill = False
    if terms["total"] > budget:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in terms.items() if k != "total" and v)
        where = " (activations on disk)" if stream.spill else ""
        raise SlimformerError(f"{config.method} needs about {terms['total'] / 2**30:.2f} GiB{where} ({parts} GiB), more "
                              f"than --max-memory {budget / 2**30:.2f} GiB: use fewer or shorter calibration samples")
    return terms
