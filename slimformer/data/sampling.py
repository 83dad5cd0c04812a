"""Calibration samples: seeded random windows of a tokenised text, drawn as Wanda's loader draws them."""

from __future__ import annotations

import random

import torch

from slimformer.data.sources import load_text, tokenize
from slimformer.errors import SlimformerError


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random offsets of ``ids`` (shape ``(1, L)``); ``(n, seqlen)``.

    Offsets come from ``random.Random(seed).randint(0, L - seqlen - 1)``, the same sequence
    as Wanda's ``random.seed(seed); random.randint(...)``.
    """
    if n < 1:
        raise SlimformerError(f"the number of calibration samples must be at least 1, not {n}")
    length = ids.shape[-1]
    if seqlen < 1 or length <= seqlen:
        raise SlimformerError(f"calibration text has {length} tokens, too few for windows of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, length - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[0, s : s + seqlen] for s in starts])


def calibration_samples(tokenizer, source: str = "wikitext2:valid", n: int = 32, seqlen: int = 2048, seed: int = 0):
    """Tokenise a named source and draw ``n × seqlen`` seeded calibration windows from it."""
    return sample_windows(tokenize(tokenizer, load_text(source)), n, seqlen, seed)
