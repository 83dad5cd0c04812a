"""Weight pruning of SmolLM2-135M on the DESIGN.md protocol: magnitude, Wanda and SparseGPT at 50% and 2:4.

Each configuration runs in its own process, so peak RSS is that run's own. Calibration:
32 × 2048 tokens of WikiText-2 valid, seed 0; perplexity: the first 40 windows of WikiText-2
test. Also: 50% magnitude pruning followed by masked fine-tuning (before/after), and the
dense vs sparse-bitmask size on disk.

    python benchmarks/pruning.py [--only wanda:unstructured] [--windows 40] [--finetune-steps 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from common import RESULTS, run_children, write_result

RUNS = [
    ("magnitude", None, "sequential"),
    ("magnitude", "2:4", "sequential"),
    ("wanda", None, "sequential"),
    ("wanda", "2:4", "sequential"),
    ("sparsegpt", None, "sequential"),
    ("sparsegpt", "2:4", "sequential"),
    ("wanda", None, "compressed"),
    ("sparsegpt", None, "compressed"),
]
REFERENCE = {  # ../shared/TARGETS.md: wanda repo, ppl (40 windows) and compression wall seconds
    ("magnitude", None): (525.9, 9.4), ("magnitude", "2:4"): (2023.6, 4.0),
    ("wanda", None): (44.73, 351.3), ("wanda", "2:4"): (175.07, 361.3),
    ("sparsegpt", None): (37.94, 481.3), ("sparsegpt", "2:4"): (66.86, 515.8),
}


def one_run(method: str, pattern: str | None, propagate: str, windows: int, finetune_steps: int) -> dict:
    """Prune in this process and measure; called in a child process by ``main``."""
    from slimformer import load_model, save_model
    from slimformer.data import calibration_samples, load_text, tokenize
    from slimformer.evaluation import perplexity
    from slimformer.methods import FinetuneConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig, apply, select_linears
    from slimformer.methods.pruning import overall_sparsity
    from slimformer.evaluation import size_on_disk

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m")
    samples = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=32, seqlen=2048, seed=0)
    cls = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}[method]
    config = cls(sparsity=0.5, pattern=pattern) if method == "magnitude" else cls(0.5, pattern, propagate=propagate)
    result = apply(loaded.adapter, config, samples)
    ids = tokenize(loaded.tokenizer, load_text("wikitext2:test"))
    out = {"method": method, "pattern": pattern or "unstructured", "propagate": propagate,
           "compression_s": result.seconds, "peak_rss_gib": result.peak_rss_gib,
           "sparsity": result.summary["sparsity"],
           "ppl": perplexity(loaded.model, ids, windows=windows, progress=False).perplexity}
    if method == "magnitude" and pattern is None:
        with tempfile.TemporaryDirectory() as tmp:
            out["size_dense_bytes"] = size_on_disk(save_model(loaded.model, None, Path(tmp) / "dense"))
            out["size_sparse_bytes"] = size_on_disk(save_model(loaded.model, None, Path(tmp) / "s", sparse="unstructured"))
        if finetune_steps:
            ft = apply(loaded.adapter, FinetuneConfig(steps=finetune_steps, lr=1e-4, seqlen=512), samples)
            out.update(finetune_steps=finetune_steps, finetune_s=ft.seconds, finetune_loss=ft.summary,
                       ppl_after_finetune=perplexity(loaded.model, ids, windows=windows, progress=False).perplexity,
                       sparsity_after_finetune=overall_sparsity(select_linears(loaded.adapter)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None, help="METHOD:PATTERN[:PROPAGATE], e.g. wanda:2:4")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--finetune-steps", type=int, default=100)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, pattern, propagate = json.loads(args.child)
        print("RESULT " + json.dumps(one_run(method, pattern, propagate, args.windows, args.finetune_steps)))
        return
    runs = RUNS
    if args.only:
        wanted = args.only.split(",")
        runs = [r for r in RUNS if any(f"{r[0]}:{r[1] or 'unstructured'}:{r[2]}".startswith(w) for w in wanted)]
    fresh = run_children(__file__, runs, ["--windows", str(args.windows), "--finetune-steps", str(args.finetune_steps)])
    results = merge_runs(fresh)
    rows = []
    for r in results:
        ref_ppl, ref_s = REFERENCE[(r["method"], None if r["pattern"] == "unstructured" else r["pattern"])]
        rows.append((f"{r['method']} {r['pattern']} ({r['propagate']})",
                     f"ppl {r['ppl']:.2f} (ref {ref_ppl}) · {r['compression_s']:.1f} s (ref {ref_s}) · "
                     f"peak RSS {r['peak_rss_gib']:.2f} GiB"))
        if "ppl_after_finetune" in r:
            rows.append(("magnitude 50% + masked fine-tune", f"ppl {r['ppl']:.1f} → {r['ppl_after_finetune']:.1f} "
                         f"after {r['finetune_steps']} steps × 512 tokens ({r['finetune_s']:.0f} s)"))
        if "size_sparse_bytes" in r:
            rows.append(("size on disk, 50% sparse", f"dense {r['size_dense_bytes'] / 2**20:.0f} MiB, "
                         f"sparse-bitmask {r['size_sparse_bytes'] / 2**20:.0f} MiB"))
    write_result("pruning_smollm2", {"windows": args.windows, "runs": results}, rows)


def merge_runs(fresh: list[dict]) -> list[dict]:
    """Earlier results of runs not repeated now, then the fresh ones, in the order of RUNS."""
    path = RESULTS / "pruning_smollm2.json"
    key = lambda r: (r["method"], r["pattern"], r["propagate"])  # noqa: E731
    merged = {key(r): r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    merged.update({key(r): r for r in fresh})
    order = [(m, p or "unstructured", g) for m, p, g in RUNS]
    return [merged[k] for k in order if k in merged]


if __name__ == "__main__":
    main()
