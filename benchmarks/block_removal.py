"""Block elimination on SmolLM2-135M (30 blocks): SLEB at 10% and 20%, its one-shot variant and block influence.

Search calibration: the first of the 32 seed-0 windows of WikiText-2 valid (1 × 2048), as in
../shared/TARGETS.md; block influence reads all 32 windows in 256-token chunks, as ShortGPT's
reference figure does. Perplexity on the first 40 windows of WikiText-2 test. Speed: dense
and pruned in the same process, alternating, 10 repeats: median prefill of 2048 tokens; greedy
decoding of 64 tokens after a 128-token prompt, as 1 / the median cached step (and, for
comparison, the median end-to-end ``generate`` rate). Each run is its own process (its own peak RSS).

    python benchmarks/block_removal.py [--only sleb:6] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json

import torch

from common import run_children, write_result

RUNS = [("sleb", 3), ("sleb", 6), ("influence", 6), ("oneshot", 6)]
REFERENCE = {("sleb", 3): "14, 16, 17 · ppl 36.90 · ≈ 472 s", ("sleb", 6): "13–18 · ppl 57.32 · 887.1 s",
             ("influence", 6): "12, 13, 14, 15, 17, 25 · ppl 64.66 · 179.5 s", ("oneshot", 6): "—"}


def one_run(criterion: str, blocks: int, windows: int, repeats: int) -> dict:
    """Search, remove, measure quality and speed against a dense copy; runs in a child process."""
    from slimformer import load_model
    from slimformer.data import calibration_samples, load_text, tokenize
    from slimformer.evaluation import perplexity
    from slimformer.evaluation.speed import compare_speed
    from slimformer.methods import SLEBConfig, apply

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m")
    samples = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=32, seqlen=2048, seed=0)
    if criterion == "influence":
        samples, batch = samples.reshape(-1, 256), 16
    else:
        samples, batch = samples[:1], 1
    config = SLEBConfig(blocks=blocks, criterion="iterative" if criterion == "sleb" else criterion, batch_size=batch)
    result = apply(loaded.adapter, config, samples)
    ids = tokenize(loaded.tokenizer, load_text("wikitext2:test"))
    out = {"criterion": criterion, "blocks": blocks, "removed": result.summary["removed"],
           "search_s": result.seconds, "peak_rss_gib": result.peak_rss_gib,
           "block_calls": result.summary.get("block_calls"),
           "ppl": perplexity(loaded.model, ids, windows=windows, progress=False).perplexity}
    if criterion == "sleb":  # the dense copy is loaded after the search, so it is not in the search's peak RSS
        dense = load_model("smollm2-135m").model
        speed = compare_speed({"dense": dense, "pruned": loaded.model}, ids[:, :2048], repeats=repeats)
        ideal = 30 / (30 - blocks)
        out["speed"] = speed
        out["prefill_speedup"] = speed["dense"]["prefill_s"] / speed["pruned"]["prefill_s"]
        out["decode_speedup"] = speed["pruned"]["decode_tok_s"] / speed["dense"]["decode_tok_s"]
        out["ideal_speedup"] = ideal
        out["rounds"] = result.summary["rounds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None, help="CRITERION:BLOCKS, e.g. sleb:6")
    parser.add_argument("--only-runs", type=int, default=None, help="the first N runs (the last is the one-shot variant)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        criterion, blocks = json.loads(args.child)
        print("RESULT " + json.dumps(one_run(criterion, blocks, args.windows, args.repeats)))
        return
    runs = [r for r in RUNS if not args.only or f"{r[0]}:{r[1]}" == args.only][: args.only_runs]
    results = run_children(__file__, runs, ["--windows", str(args.windows), "--repeats", str(args.repeats)])
    rows = []
    for r in results:
        rows.append((f"{r['criterion']} {r['blocks']}/30",
                     f"removed {sorted(r['removed'])} (order {r['removed']}) · ppl {r['ppl']:.2f} · "
                     f"search {r['search_s']:.1f} s · peak RSS {r['peak_rss_gib']:.2f} GiB · "
                     f"reference: {REFERENCE[(r['criterion'], r['blocks'])]}"))
        if "speed" in r:
            d, p = r["speed"]["dense"], r["speed"]["pruned"]
            rows.append((f"speed, {30 - r['blocks']} vs 30 blocks",
                         f"prefill {d['prefill_s']:.2f} → {p['prefill_s']:.2f} s ({r['prefill_speedup']:.2f}×); "
                         f"decode {d['decode_tok_s']:.1f} → {p['decode_tok_s']:.1f} tok/s ({r['decode_speedup']:.2f}×); "
                         f"generate {d['generate_tok_s']:.1f} → {p['generate_tok_s']:.1f} tok/s "
                         f"({p['generate_tok_s'] / d['generate_tok_s']:.2f}×); "
                         f"ideal {r['ideal_speedup']:.2f}×"))
    name = "block_removal_smollm2" if not args.only else f"block_removal_smollm2_{args.only.replace(':', '_')}"
    write_result(name, {"windows": args.windows, "runs": results}, rows)


if __name__ == "__main__":
    main()
