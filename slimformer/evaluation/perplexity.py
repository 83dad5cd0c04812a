"""Perplexity over non-overlapping windows, as GPTQ, SparseGPT, Wanda and SLEB measure it."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from slimformer.data.sampling import cut_windows
from slimformer.errors import SlimformerError
from slimformer.models.adapters import get_adapter, next_token_nll


@dataclass
class PerplexityResult:
    """A perplexity and what it was measured on."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    windows: int
    seqlen: int
    predicted_tokens: int
    seconds: float
    tokens_per_s: float  # input tokens through the model per second
    window_nll: list[float]  # mean NLL of each window, in order: any prefix's perplexity follows

    def to_dict(self) -> dict:
        """The result as JSON-able fields."""
        return asdict(self)


def max_positions(config) -> int | None:
    """The longest sequence a model accepts, from its config (``None`` when unbounded, e.g. RoPE-only)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Mean next-token NLL of each row of ``windows`` (``(n, T)`` token ids on the model's device).

    The head is applied to the final hidden states in row chunks
    (:func:`~slimformer.models.adapters.next_token_nll`), so no window's full-vocabulary
    logits are ever materialised.
    """
    adapter = get_adapter(model)
    hidden = adapter.base(input_ids=windows, use_cache=False).last_hidden_state
    return (next_token_nll(adapter, hidden, windows) / (windows.shape[1] - 1)).tolist()


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    windows: int | None = None,
    batch_size: int = 1,
    bos: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``ids`` (shape ``(1, L)``) cut into non-overlapping windows.

    Each window of ``seqlen`` tokens is scored on its own, predicting tokens 2..seqlen from
    the ones before; the result is exp of the mean NLL over all predicted tokens. The tail
    shorter than a window is dropped, as in the papers. ``windows`` keeps only the first ones.
    ``bos`` starts every window with that token (see :func:`cut_windows`).
    """
    limit = max_positions(model.config)
    if seqlen < 2:
        raise SlimformerError(f"seqlen must be at least 2, not {seqlen}")
    if limit is not None and seqlen > limit:
        raise SlimformerError(f"seqlen {seqlen} is larger than the model allows ({limit} positions)")
    cut = cut_windows(ids, seqlen, windows, bos=bos)
    count = cut.shape[0]
    device = next(model.parameters()).device
    nlls, start = [], time.perf_counter()
    for batch in tqdm(cut.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
        nlls.extend(window_nll(model, batch.to(device)))
    seconds = time.perf_counter() - start
    predicted = count * (seqlen - 1)
    nll = sum(nlls) / count  # windows predict equally many tokens: the mean of means is exact
    return PerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        windows=count,
        seqlen=seqlen,
        predicted_tokens=predicted,
        seconds=seconds,
        tokens_per_s=count * seqlen / seconds,
        window_nll=nlls,
    )
