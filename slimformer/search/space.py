"""Search spaces of sub-networks (which blocks, heads and FFN units to keep), masks that apply one, and its cost.

The four spaces of Klein et al., "Structural Pruning of Pre-trained Language Models via
Neural Architecture Search" (2024):

- ``small``: the number of blocks (the first ones are kept, as in the paper), and one head
  count and one FFN-unit count shared by every kept block;
- ``medium``: a head count and a unit count per block;
- ``layer``: keep or drop each block;
- ``large``: keep or drop each head and each FFN unit.

Counts keep the most important units (:mod:`slimformer.search.importance`), so a count is a
sub-network. With grouped-query attention the head choices respect KV groups: a count is a
number of query heads per KV group (the same in every group, so the block keeps one group
size), and in the ``large`` space a whole KV group (its key/value head and its query heads)
is one unit. Deviation, for the sake of extraction: a kept block has at least one head
(group) and one unit — in ``large``, a block left with neither is dropped, one left with
only one of them keeps its most important unit of the other.

A :class:`Subnet` is applied either as masks (:func:`masked`, for search and super-network
training, weights shared) or by :func:`extract`, which cuts the model to that shape.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import optuna
import torch
from torch import nn

from slimformer.calibration import scaled_inputs
from slimformer.errors import SlimformerError
from slimformer.evaluation.cost import flops_per_token as cost_flops
from slimformer.models.adapters import Adapter, get_adapter, weight_matrix
from slimformer.models.surgery import block_shape, head_dim, remove_blocks, shrink_heads, shrink_neurons, sync_config_shapes

SPACES = ("small", "medium", "layer", "large")


@dataclass
class Subnet:
    """Kept query heads and FFN units of every block of the full model (``None``: the block is dropped)."""

    heads: list[list[int] | None]
    units: list[list[int] | None]

    @property
    def kept_blocks(self) -> list[int]:
        """The indices of the blocks the sub-network keeps."""
        return [i for i, h in enumerate(self.heads) if h is not None]

    def to_json(self) -> str:
        """The sub-network as JSON text."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Subnet:
        """A sub-network from :meth:`to_json`'s text."""
        return cls(**json.loads(text))


@dataclass
class Importance:
    """One score per query head and per FFN unit of every block; higher is more important."""

    heads: list[torch.Tensor]
    units: list[torch.Tensor]

    @classmethod
    def uniform(cls, adapter: Adapter) -> Importance:
        """Index order (earlier units first): for spaces that need no ranking, or as a neutral baseline."""
        shapes = [block_shape(adapter, b) for b in adapter.blocks]
        return cls([torch.arange(s["heads"], 0, -1).float() for s in shapes],
                   [torch.arange(s["intermediate"], 0, -1).float() for s in shapes])


class SearchSpace:
    """A named space over the sub-networks of one (uniform) model, as optuna distributions."""

    def __init__(self, name: str, adapter: Adapter, importance: Importance | None = None):
        if name not in SPACES:
            raise SlimformerError(f"unknown search space '{name}'; choose one of {', '.join(SPACES)}")
        shapes = [block_shape(adapter, b) for b in adapter.blocks]
        if any(s != shapes[0] for s in shapes):
            raise SlimformerError("structural search needs a model whose blocks all have the same shape")
        self.name, self.adapter = name, adapter
        self.blocks = len(shapes)
        self.heads, self.units = shapes[0]["heads"], shapes[0]["intermediate"]
        kv = shapes[0]["kv_heads"]
        self.gqa = kv < self.heads
        # Head choices come in groups: the KV groups with GQA, else one group of all heads.
        self.groups = kv if self.gqa else 1
        self.group_size = self.heads // self.groups
        self.importance = importance or Importance.uniform(adapter)

    # -- the space ---------------------------------------------------------------------
    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """The parameters of the space: integers (counts) or 0/1 choices."""
        Int = optuna.distributions.IntDistribution
        heads = Int(self.groups, self.heads, step=self.groups)
        if self.name == "small":
            return {"blocks": Int(1, self.blocks), "heads": heads, "units": Int(1, self.units)}
        if self.name == "medium":
            return {k: v for b in range(self.blocks) for k, v in ((f"heads_{b}", heads), (f"units_{b}", Int(1, self.units)))}
        if self.name == "layer":
            return {f"block_{b}": Int(0, 1) for b in range(self.blocks)}
        head_units = self.groups if self.gqa else self.heads
        return {
            **{f"head_{b}_{j}": Int(0, 1) for b in range(self.blocks) for j in range(head_units)},
            **{f"unit_{b}_{u}": Int(0, 1) for b in range(self.blocks) for u in range(self.units)},
        }

    def largest(self) -> dict[str, int]:
        """Parameters of the full network."""
        return {k: d.high for k, d in self.distributions().items()}

    def smallest(self) -> dict[str, int]:
        """Parameters of the smallest network of the space."""
        if self.name == "large":  # one block with one head (group) and one unit
            return {k: int(k in ("head_0_0", "unit_0_0")) for k in self.distributions()}
        if self.name == "layer":
            return {k: int(k == "block_0") for k in self.distributions()}
        return {k: d.low for k, d in self.distributions().items()}

    def uniform(self, fraction: float) -> dict[str, int] | None:
        """Counts keeping ``fraction`` of every block's heads and units (``small``/``medium``), else None.

        Seeds a search with a few evenly shrunk networks between the largest and the smallest.
        """
        if self.name not in ("small", "medium"):
            return None
        out = {}
        for k, d in self.distributions().items():
            out[k] = d.high if k == "blocks" else max(d.low, round(d.high * fraction / d.step) * d.step)
        return out

    def sample(self, generator: torch.Generator, spread: float | None = None) -> dict[str, int]:
        """Random parameters, for the random sub-networks of super-network training.

        ``spread=None``: each parameter uniformly at random. In a space of many parameters
        (``medium``: two per block) the size of such a sub-network is a sum of independent
        draws and so concentrates in the middle — for MiniLM-L6, 90% of them keep 0.70–0.85 of
        the parameters, none of 200 more than 0.88 — leaving the large and the small sub-networks
        untrained. ``spread=w``: first a fraction ``t`` uniform in [0, 1], then each parameter
        at ``t`` plus uniform noise in [-w, w] (clipped) of its range, so sizes cover the whole
        range evenly while the shapes still vary from block to block.
        """
        out = {}
        t = float(torch.rand((), generator=generator)) if spread is not None else 0.0
        for k, d in self.distributions().items():
            choices = (d.high - d.low) // d.step + 1
            if spread is None:
                index = int(torch.randint(choices, (1,), generator=generator))
            else:
                u = t + spread * (2 * float(torch.rand((), generator=generator)) - 1)
                index = round(min(max(u, 0.0), 1.0) * (choices - 1))
            out[k] = d.low + d.step * index
        return out

    # -- parameters -> sub-network -------------------------------------------------------
    def _top_heads(self, block: int, per_group: int) -> list[int]:
        score = self.importance.heads[block].view(self.groups, self.group_size)
        top = score.topk(per_group, dim=1).indices + torch.arange(self.groups)[:, None] * self.group_size
        return sorted(top.flatten().tolist())

    def _top_units(self, block: int, count: int) -> list[int]:
        return sorted(self.importance.units[block].topk(count).indices.tolist())

    def subnet(self, params: dict[str, int]) -> Subnet:
        """The sub-network a parameter set names."""
        heads: list[list[int] | None] = [None] * self.blocks
        units: list[list[int] | None] = [None] * self.blocks
        try:
            if self.name == "small":
                for b in range(params["blocks"]):
                    heads[b] = self._top_heads(b, params["heads"] // self.groups)
                    units[b] = self._top_units(b, params["units"])
            elif self.name == "medium":
                for b in range(self.blocks):
                    heads[b] = self._top_heads(b, params[f"heads_{b}"] // self.groups)
                    units[b] = self._top_units(b, params[f"units_{b}"])
            elif self.name == "layer":
                for b in range(self.blocks):
                    if params[f"block_{b}"]:
                        heads[b], units[b] = list(range(self.heads)), list(range(self.units))
            else:
                for b in range(self.blocks):
                    chosen = [j for j in range(self.groups if self.gqa else self.heads) if params[f"head_{b}_{j}"]]
                    kept_units = [u for u in range(self.units) if params[f"unit_{b}_{u}"]]
                    if not chosen and not kept_units:
                        continue
                    if not chosen:
                        best = int(self.importance.heads[b].argmax())
                        chosen = [best // self.group_size if self.gqa else best]
                    if self.gqa:
                        heads[b] = [g * self.group_size + i for g in chosen for i in range(self.group_size)]
                    else:
                        heads[b] = chosen
                    units[b] = kept_units or self._top_units(b, 1)
        except KeyError as e:
            raise SlimformerError(f"parameter {e} missing for the '{self.name}' space") from None
        return Subnet(heads, units)

    def full(self) -> Subnet:
        """The whole network as a sub-network."""
        return self.subnet(self.largest())

    def params_of(self, subnet: Subnet) -> dict[str, int] | None:
        """The parameters that name ``subnet`` in this space, or None where the space cannot express it.

        The inverse of :meth:`subnet`: e.g. an importance-pruned network (per-block counts of the
        most important units) is a point of ``medium`` and ``large`` but, unless its counts are the
        same in every block, not of ``small``.
        """
        if len(subnet.heads) != self.blocks:
            return None
        kept = subnet.kept_blocks
        if self.name == "layer":
            params = {f"block_{b}": int(b in kept) for b in range(self.blocks)}
        elif self.name == "large":
            per = self.group_size if self.gqa else 1
            params = {}
            for b in range(self.blocks):
                heads, units = set(subnet.heads[b] or ()), set(subnet.units[b] or ())
                params.update({f"head_{b}_{j}": int(j * per in heads) for j in range(self.heads // per)})
                params.update({f"unit_{b}_{u}": int(u in units) for u in range(self.units)})
        elif self.name == "medium":
            if len(kept) != self.blocks:
                return None
            params = {k: v for b in kept for k, v in ((f"heads_{b}", len(subnet.heads[b])),
                                                       (f"units_{b}", len(subnet.units[b])))}
        else:
            counts = {(len(subnet.heads[b]), len(subnet.units[b])) for b in kept}
            if not kept or kept != list(range(len(kept))) or len(counts) != 1:
                return None
            (heads, units), = counts
            params = {"blocks": len(kept), "heads": heads, "units": units}
        try:
            return params if self.subnet(params) == subnet else None
        except (SlimformerError, RuntimeError):  # a count the space does not allow
            return None


# -- applying a sub-network --------------------------------------------------------------
class _Skip(nn.Module):
    """Stands in for a dropped block: returns its hidden states unchanged."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.attention_type = getattr(block, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _head_mask(adapter: Adapter, kept: list[int], heads: int, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(heads, dtype=like.dtype, device=like.device)
    mask[kept] = 1
    return mask.repeat_interleave(head_dim(adapter))


@contextlib.contextmanager
def masked(adapter: Adapter, subnet: Subnet) -> Iterator[None]:
    """Run the model as ``subnet``: dropped blocks are skipped, cut heads and units are zeroed.

    Heads are zeroed at the input of the attention output projection and units at the input
    of the FFN down projection, so the output equals that of the extracted sub-network
    (biases of the output projections stay, as they do in the extracted model). Gradients
    flow through the kept weights, which is how the super-network is trained.
    """
    blocks = adapter.blocks
    if len(subnet.heads) != len(blocks):
        raise SlimformerError(f"sub-network has {len(subnet.heads)} blocks, the model {len(blocks)}")
    originals, scales = {}, []
    try:
        for b, block in enumerate(list(blocks)):
            if subnet.heads[b] is None:
                originals[b] = block
                blocks[b] = _Skip(block)
                continue
            shape = block_shape(adapter, block)
            lin = adapter.linears(block)
            if len(subnet.heads[b]) < shape["heads"]:
                scales.append((lin["o"], _head_mask(adapter, subnet.heads[b], shape["heads"], weight_matrix(lin["o"]))))
            if len(subnet.units[b]) < shape["intermediate"]:
                mask = torch.zeros(shape["intermediate"], dtype=weight_matrix(lin["down"]).dtype)
                mask[subnet.units[b]] = 1
                scales.append((lin["down"], mask.to(weight_matrix(lin["down"]).device)))
        with scaled_inputs(scales):
            yield
    finally:
        for b, block in originals.items():
            blocks[b] = block


def extract(model: nn.Module, subnet: Subnet, *, inplace: bool = False) -> nn.Module:
    """The sub-network as a physically smaller model (a copy unless ``inplace``); outputs equal :func:`masked`'s.

    Uniform shapes give a stock ``transformers`` model; others carry ``slimformer_layer_shapes``
    in their config and load through :func:`slimformer.load_model`.
    """
    model = model if inplace else copy.deepcopy(model)
    adapter = get_adapter(model)
    if len(subnet.heads) != len(adapter.blocks):
        raise SlimformerError(f"sub-network has {len(subnet.heads)} blocks, the model {len(adapter.blocks)}")
    if not subnet.kept_blocks:
        raise SlimformerError("the sub-network keeps no block")
    for b, block in enumerate(adapter.blocks):
        if subnet.heads[b] is None:
            continue
        shape = block_shape(adapter, block)
        if len(subnet.heads[b]) < shape["heads"]:
            shrink_heads(adapter, block, subnet.heads[b])
        if len(subnet.units[b]) < shape["intermediate"]:
            shrink_neurons(adapter, block, subnet.units[b])
    dropped = [b for b, h in enumerate(subnet.heads) if h is None]
    if dropped:
        remove_blocks(adapter, dropped)
    sync_config_shapes(adapter)
    return model


# -- cost of a sub-network ------------------------------------------------------------------
def _linear_params(module: nn.Module, out_frac: float = 1.0, in_frac: float = 1.0) -> float:
    w = weight_matrix(module)
    bias = module.bias.numel() * out_frac if getattr(module, "bias", None) is not None else 0
    return w.numel() * out_frac * in_frac + bias


def count_params(adapter: Adapter, subnet: Subnet | None = None) -> int:
    """Parameters of the model as ``subnet`` would have them after extraction (all of them without one)."""
    total = sum(p.numel() for p in adapter.model.parameters())
    if subnet is None:
        return total
    for b, block in enumerate(adapter.blocks):
        full = sum(p.numel() for p in block.parameters())
        if subnet.heads[b] is None:
            total -= full
            continue
        shape, lin = block_shape(adapter, block), adapter.linears(block)
        hf = len(subnet.heads[b]) / shape["heads"]
        group = shape["heads"] // shape["kv_heads"]
        kvf = len({h // group for h in subnet.heads[b]}) / shape["kv_heads"]
        uf = len(subnet.units[b]) / shape["intermediate"]
        kept = {
            "q": _linear_params(lin["q"], hf) if "q" in lin else 0,
            "k": _linear_params(lin["k"], kvf) if "k" in lin else 0,
            "v": _linear_params(lin["v"], kvf) if "v" in lin else 0,
            "qkv": _linear_params(lin["qkv"], hf) if "qkv" in lin else 0,
            "o": _linear_params(lin["o"], in_frac=hf),
            "gate": _linear_params(lin["gate"], uf) if "gate" in lin else 0,
            "up": _linear_params(lin["up"], uf),
            "down": _linear_params(lin["down"], in_frac=uf),
        }
        total -= sum(_linear_params(m) for m in lin.values()) - round(sum(kept.values()))
    return int(total)


def flops_per_token(adapter: Adapter, subnet: Subnet | None = None, seq_len: int = 128) -> float:
    """Forward FLOPs per token of the model as ``subnet`` would be after extraction (see
    :func:`slimformer.evaluation.cost.flops_per_token`, which this counts with, sliding windows included)."""
    if subnet is None:
        return cost_flops(adapter.model, seq_len)
    fractions: list[dict[str, float] | None] = []
    for b, block in enumerate(adapter.blocks):
        if subnet.heads[b] is None:
            fractions.append(None)
            continue
        shape = block_shape(adapter, block)
        hf = len(subnet.heads[b]) / shape["heads"]
        uf = len(subnet.units[b]) / shape["intermediate"]
        group = shape["heads"] // shape["kv_heads"]
        kvf = len({h // group for h in subnet.heads[b]}) / shape["kv_heads"]
        fractions.append({"q": hf, "k": kvf, "v": kvf, "qkv": hf, "o": hf, "gate": uf, "up": uf, "down": uf, "heads": hf})
    return cost_flops(adapter.model, seq_len, fractions=fractions)
