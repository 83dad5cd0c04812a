"""Dense SmolLM2-135M on WikiText-2 test: perplexity (all windows and the first 40), tokens/s, load times,
and the evaluator's overhead over a bare ``model(input_ids)`` loop.

    python benchmarks/dense_perplexity.py [--windows N] [--overhead-windows 20]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time

import torch

from common import write_result
from slimformer.data import load_text, tokenize
from slimformer.evaluation import perplexity
from slimformer.models import load_model


def timed_load(cache: str) -> tuple[float, object]:
    os.environ["SLIMFORMER_CACHE"] = cache
    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    return time.perf_counter() - start, loaded


def overhead(model, ids: torch.Tensor, windows: int, seqlen: int) -> dict:
    """Evaluator seconds / bare forward seconds, window by window, alternating to share any drift."""
    bare, ours = [], []
    for w in range(windows):
        window = ids[:, w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=window, use_cache=False)
            bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        perplexity(model, window, seqlen=seqlen, progress=False)
        ours.append(time.perf_counter() - start)
    return {"windows": windows, "bare_s": sum(bare), "evaluator_s": sum(ours), "ratio": sum(ours) / sum(bare),
            "median_ratio": statistics.median(o / b for o, b in zip(ours, bare))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--windows", type=int, default=None, help="limit the full run (default: all)")
    parser.add_argument("--overhead-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seqlen = 2048

    with tempfile.TemporaryDirectory() as cache:
        first_load, _ = timed_load(cache)  # converts the GGUF into this empty cache
        second_load, loaded = timed_load(cache)
    ids = tokenize(loaded.tokenizer, load_text("wikitext2:test"))
    full = perplexity(loaded.model, ids, seqlen=seqlen, windows=args.windows)
    first40 = math.exp(sum(full.window_nll[:40]) / min(40, full.windows))
    ratio = overhead(loaded.model, ids, args.overhead_windows, seqlen)

    payload = {
        "model": "smollm2-135m (GGUF Q4_1 de-quantised to float32)",
        "data": "wikitext2:test, rows joined by \\n\\n",
        "test_tokens": ids.shape[-1],
        "load_s": {"first (GGUF conversion)": first_load, "second (cached safetensors)": second_load},
        "perplexity_all": full.perplexity,
        "windows_all": full.windows,
        "perplexity_first40": first40,
        "eval_seconds": full.seconds,
        "tokens_per_s": full.tokens_per_s,
        "overhead": ratio,
        "window_nll": full.window_nll,
    }
    rows = [
        ("WikiText-2 test tokens", f"{ids.shape[-1]:,}"),
        (f"perplexity, all {full.windows} windows × {seqlen}", f"{full.perplexity:.3f}"),
        ("perplexity, first 40 windows", f"{first40:.3f}"),
        ("evaluation wall time", f"{full.seconds:.1f} s"),
        ("throughput", f"{full.tokens_per_s:.0f} tokens/s"),
        (f"evaluator / bare forward loop ({args.overhead_windows} windows, alternating)",
         f"{ratio['ratio']:.3f} (median per window {ratio['median_ratio']:.3f})"),
        ("first load (GGUF de-quantise + cache)", f"{first_load:.1f} s"),
        ("second load (cached safetensors)", f"{second_load:.1f} s"),
    ]
    write_result("dense_smollm2", payload, rows)


if __name__ == "__main__":
    main()
