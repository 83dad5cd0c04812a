"""Speed of a causal LM: prefill latency and greedy decode tokens/s, medians over repeats, models interleaved."""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Wall time of one forward pass over ``ids`` (no cache)."""
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy generation of exactly ``new_tokens`` after ``prompt``, in generated tokens per second."""
    # min = max new tokens: no sequence ends early, so the pad id is never used; it only silences a warning.
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    return (out.shape[1] - prompt.shape[1]) / seconds


def compare_speed(
    models: dict[str, torch.nn.Module],
    ids: torch.Tensor,
    *,
    repeats: int = 5,
    prompt_tokens: int = 128,
    new_tokens: int = 64,
) -> dict[str, dict[str, float]]:
    """Median prefill seconds over ``ids`` and decode tokens/s of each model, measured alternately.

    One warm-up run per model is not counted; then the models take turns ``repeats`` times,
    so drift in the machine's speed touches all of them alike.
    """
    prompt = ids[:, :prompt_tokens]
    for model in models.values():
        prefill_seconds(model, ids)
        decode_tokens_per_s(model, prompt, 4)
    runs: dict[str, dict[str, list[float]]] = {name: {"prefill_s": [], "decode_tok_s": []} for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            runs[name]["prefill_s"].append(prefill_seconds(model, ids))
            runs[name]["decode_tok_s"].append(decode_tokens_per_s(model, prompt, new_tokens))
    return {name: {key: statistics.median(values) for key, values in r.items()} | {"runs": r} for name, r in runs.items()}
