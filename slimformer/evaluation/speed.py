"""Speed of a causal LM: prefill latency and greedy decode tokens/s, medians over repeats, models interleaved."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from transformers import DynamicCache

T = TypeVar("T")


def synchronize(model) -> None:
    """Wait for the model's device to finish its queued work, so a wall-clock reading times the work itself.

    CUDA kernels run asynchronously: without this a timer would measure kernel launches only.
    A no-op on a CPU.
    """
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(model, fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()``'s result and its wall seconds, with the model's device synchronised on both sides."""
    synchronize(model)
    start = time.perf_counter()
    out = fn()
    synchronize(model)
    return out, time.perf_counter() - start


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Wall time of one forward pass over ``ids`` (no cache)."""
    return timed(model, lambda: model(input_ids=ids, use_cache=False))[1]


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding with a KV cache after ``prompt``: the new tokens and the wall time of each step.

    Each step is one forward of the last token against the cache plus the argmax; only the
    last position's logits are computed, as ``generate`` does.
    """
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    steps = []

    def step() -> torch.Tensor:
        logits = model(input_ids=tokens[-1], cache=cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    for _ in range(new_tokens - 1):
        token, seconds = timed(model, step)
        tokens.append(token)
        steps.append(seconds)
    return torch.cat(tokens, 1), steps


def decode_step_seconds(model, prompt: torch.Tensor, new_tokens: int) -> list[float]:
    """Wall time of each cached greedy step after ``prompt`` (the first token comes with the prompt's forward)."""
    return greedy_decode(model, prompt, new_tokens)[1]


@torch.no_grad()
def generate_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """End-to-end ``model.generate`` (greedy, exactly ``new_tokens``) in generated tokens per second."""
    # min = max new tokens: no sequence ends early, so the pad id is never used; it only silences a warning.
    out, seconds = timed(model, lambda: model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                       do_sample=False, pad_token_id=0))
    return (out.shape[1] - prompt.shape[1]) / seconds


def compare_speed(
    models: dict[str, torch.nn.Module],
    ids: torch.Tensor,
    *,
    repeats: int = 5,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
) -> dict[str, dict]:
    """Prefill seconds, decode tokens/s and ``generate`` tokens/s of each model, measured alternately.

    One warm-up run per model is not counted; then the models take turns ``repeats`` times,
    so drift in the machine's speed touches all of them alike. ``prefill_s`` is the median
    over repeats; ``decode_tok_s`` is 1 / the median step time over all ``repeats ×
    new_tokens`` decode steps (robust to the odd slow step on a shared machine);
    ``generate_tok_s`` is the median end-to-end rate of ``model.generate``, which adds its
    own per-token bookkeeping to the model's cost.
    """
    prompt = ids[:, :prompt_tokens]
    for model in models.values():
        prefill_seconds(model, ids)
        decode_step_seconds(model, prompt, 4)
        generate_tokens_per_s(model, prompt, 4)
    runs: dict[str, dict[str, list[float]]] = {
        name: {"prefill_s": [], "decode_step_s": [], "generate_tok_s": []} for name in models
    }
    for _ in range(repeats):
        for name, model in models.items():
            runs[name]["prefill_s"].append(prefill_seconds(model, ids))
            runs[name]["decode_step_s"].extend(decode_step_seconds(model, prompt, new_tokens))
            runs[name]["generate_tok_s"].append(generate_tokens_per_s(model, prompt, new_tokens))
    return {
        name: {
            "prefill_s": statistics.median(r["prefill_s"]),
            "decode_tok_s": 1.0 / statistics.median(r["decode_step_s"]),
            "generate_tok_s": statistics.median(r["generate_tok_s"]),
            "runs": r,
        }
        for name, r in runs.items()
    }
