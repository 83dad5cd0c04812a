"""Calibration samples: seeded random windows of a tokenised text, drawn as Wanda's loader draws them."""

from __future__ import annotations

import random

import torch

from slimformer.data.sources import load_text, tokenize
from slimformer.errors import SlimformerError


def _text_and_span(ids: torch.Tensor, seqlen: int, bos: int | None) -> tuple[torch.Tensor, int]:
    """The text a window is cut from and how many of its tokens a window holds.

    With ``bos``: the text without the one leading ``bos`` its tokenizer put in front, and
    ``seqlen − 1`` (the window's first token is ``bos``); without, ``ids`` and ``seqlen``.
    """
    if bos is None:
        return ids, seqlen
    text = ids[:, 1:] if ids.shape[-1] and ids[0, 0].item() == bos else ids
    return text, seqlen - 1


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``(n, k)`` windows with a ``bos`` column in front (``(n, k + 1)``); unchanged when ``bos`` is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def cut_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None, *, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(count, seqlen)`` windows of ``ids`` (shape ``(1, L)``), the first ``windows``; the tail is dropped.

    With ``bos``, each window is ``bos`` then the next ``seqlen − 1`` tokens of the text, so every
    text token is predicted once and each window starts as the model's inputs start in use;
    without, windows are cut from ``ids`` as they are (the papers' protocol).
    """
    text, span = _text_and_span(ids, seqlen, bos)
    available = text.shape[-1] // span if span > 0 else 0
    count = available if windows is None else min(windows, available)
    if count < 1:
        raise SlimformerError(f"the text has {ids.shape[-1]} tokens, fewer than one window of {seqlen}")
    return _with_bos(text[0, : count * span].view(count, span), bos)


def sample_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0, *, bos: int | None = None) -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random offsets of ``ids`` (shape ``(1, L)``); ``(n, seqlen)``.

    Offsets come from ``random.Random(seed).randint(0, L - seqlen - 1)``, the same sequence
    as Wanda's ``random.seed(seed); random.randint(...)``. With ``bos`` (the token the model's
    tokenizer starts every text with), every window is ``bos`` then ``seqlen − 1`` tokens of the
    text (drawn the same way from the text without its leading ``bos``), so each sample starts
    as the model sees its inputs in use; without, windows are cut from ``ids`` as they are (the
    papers' protocol: only a window at offset 0 starts with the text's one BOS).
    """
    if n < 1:
        raise SlimformerError(f"the number of calibration samples must be at least 1, not {n}")
    ids, span = _text_and_span(ids, seqlen, bos)
    length = ids.shape[-1]
    if span < 1 or length <= span:
        raise SlimformerError(f"calibration text has {length} tokens, too few for windows of {seqlen}")
    rng = random.Random(seed)
    starts = [rng.randint(0, length - span - 1) for _ in range(n)]
    return _with_bos(torch.stack([ids[0, s : s + span] for s in starts]), bos)


def calibration_samples(tokenizer, source: str = "wikitext2:valid", n: int = 32, seqlen: int = 2048, seed: int = 0,
                        *, bos: int | None = None) -> torch.Tensor:
    """Tokenise a named source and draw ``n × seqlen`` seeded calibration windows from it (see :func:`sample_windows`)."""
    return sample_windows(tokenize(tokenizer, load_text(source)), n, seqlen, seed, bos=bos)
