"""Recovery after compression on SmolLM2-135M: CE fine-tuning, distillation and distillation into LoRA at one token budget.

Starting points (each built once and kept under ``--store``): SLEB 6/30 (the blocks SLEB
chose in ``block_removal_smollm2_sleb_6``: 12, 13, 14, 17, 25, 26; ``--search-sleb`` searches
again), SparseGPT 2:4 and Wanda 2:4 (32 × 2048 calibration tokens of WikiText-2 valid, seed 0),
GPTQ int4 g64 (act-order), and the dense model itself (what training does with nothing to recover).
Methods: ``ce`` (fine-tuning), ``kd`` (distillation), ``kd+ce`` (both losses, equal weights),
``kd+lora`` (distillation into LoRA adapters, merged); ``ce+gptq``, ``kd+gptq`` and ``kd+lora+gptq`` keep a
quantized start's trained float weights and quantize them afresh with the start's GPTQ instead of
rounding them back onto their grids. Each recovery run trains on ``wikitext2:valid+alpaca`` (windows of
512, batch 4, 16 held-out windows scored every 10 steps, early stopping) with the original
model as teacher, then measures perplexity on the first 40 windows of WikiText-2 test and,
with ``--tasks``, PIQA and ARC-Easy accuracy (full sets unless ``--limit``). ``hf-loop`` times
a plain ``transformers`` training loop (``model(input_ids, labels=...)``, AdamW) beside the
``finetune`` step on the dense model, same batches, for the throughput comparison.

    python benchmarks/recovery.py --only sleb6:none,sleb6:ce,sleb6:kd,sleb6:kd+lora [--tokens 200000] [--tasks]

Results merge into ``results/recovery_smollm2.{json,md}`` after every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, run_children, write_result

STARTS = ("dense", "sleb6", "sparsegpt24", "wanda24", "gptq4g64")  # dense: what training alone does to the teacher
METHODS = ("none", "ce", "kd", "kd+ce", "kd+lora", "ce+gptq", "kd+gptq", "kd+lora+gptq")
RUNS = ["hf-loop"] + [f"{s}:{m}" for s in STARTS for m in METHODS]
SLEB_6 = [12, 13, 14, 17, 25, 26]


def start_gptq(device: str = "cpu"):
    """The GPTQ of the ``gptq4g64`` start (int4, groups of 64, act-order), also used to re-quantize after training."""
    from slimformer.methods import GPTQConfig

    return GPTQConfig(bits=4, group_size=64, device=device)
DENSE_PPL = 20.38  # the dense model on the same 40 windows (benchmarks/results/dense_smollm2.md)


def start_model(name: str, store: Path, search_sleb: bool, device: str = "cpu"):
    """The compressed starting point, built once and saved under ``store`` (calibrated on ``device``)."""
    from slimformer import load_model, save_model
    from slimformer.methods import SLEBConfig, SparseGPTConfig, WandaConfig, apply
    from slimformer.models.surgery import remove_blocks

    folder = store / name
    if folder.exists():
        return load_model(str(folder)), json.loads((folder / "start.json").read_text())
    loaded = load_model("smollm2-135m")
    start = time.perf_counter()
    if name == "dense":
        info = {"how": "the original model"}
    elif name == "sleb6" and not search_sleb:
        remove_blocks(loaded.adapter, SLEB_6)
        info = {"removed": SLEB_6, "how": "the blocks of block_removal_smollm2_sleb_6"}
    else:
        samples = calibration(loaded.tokenizer, n=1 if name == "sleb6" else 32)
        config = {"sleb6": SLEBConfig(blocks=6, device=device), "sparsegpt24": SparseGPTConfig(pattern="2:4", device=device),
                  "wanda24": WandaConfig(pattern="2:4", device=device), "gptq4g64": start_gptq(device)}[name]
        result = apply(loaded.adapter, config, samples)
        info = {"method": result.method, "seconds": result.seconds, "summary": {
            k: v for k, v in result.summary.items() if k in ("removed", "sparsity", "scheme")}}
    info["build_s"] = time.perf_counter() - start
    save_model(loaded.model, loaded.tokenizer, folder)
    (folder / "start.json").write_text(json.dumps(info))
    return load_model(str(folder)), info


def calibration(tokenizer, n: int = 32):
    """The starting points' calibration: ``n`` × 2048 tokens of WikiText-2 valid, seed 0."""
    from slimformer.data import calibration_samples

    return calibration_samples(tokenizer, "wikitext2:valid", n=n, seqlen=2048, seed=0)


def recovery_config(method: str, tokens: int, lr: float | None = None, device: str = "cpu"):
    """The recovery step of a run (the teacher is the original model); ``lr`` overrides the method's default.

    ``METHOD+gptq`` trains a quantized start's float weights without putting them back on their
    grids (``regrid=False``); the run then quantizes them afresh with the start's GPTQ.
    """
    from slimformer.methods import DistillConfig, FinetuneConfig, LoRAConfig

    extra = {"lr": lr} if lr else {}
    extra["device"] = device
    if method.endswith("+gptq"):
        method, extra["regrid"] = method.removesuffix("+gptq"), False
    if method == "ce":
        return FinetuneConfig(tokens=tokens, **extra)
    if method == "kd":
        return DistillConfig(tokens=tokens, teacher="smollm2-135m", **extra)
    if method == "kd+ce":  # distillation plus the labels' cross-entropy, equal weights
        return DistillConfig(tokens=tokens, teacher="smollm2-135m", ce_weight=1.0, **extra)
    return LoRAConfig(tokens=tokens, teacher="smollm2-135m", kd_weight=1.0, ce_weight=0.0, **extra)


def hf_loop(steps: int = 12, seqlen: int = 512, batch_size: int = 4) -> dict:
    """Training tokens/s of a plain transformers loop and of the finetune step on the same dense model and batches."""
    from slimformer import load_model
    from slimformer.data import load_text, tokenize
    from slimformer.methods import FinetuneConfig, apply

    loaded = load_model("smollm2-135m")
    ids = tokenize(loaded.tokenizer, load_text("wikitext2:valid"))
    batches = ids[0, : steps * batch_size * seqlen].view(steps, batch_size, seqlen)
    model = loaded.model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    times = []
    for batch in batches:
        start = time.perf_counter()
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    model.eval()
    plain = batch_size * seqlen * (steps - 2) / sum(times[2:])  # the first two steps warm the allocator
    loaded = load_model("smollm2-135m")
    config = FinetuneConfig(steps=steps, seqlen=seqlen, batch_size=batch_size, heldout=0, data="wikitext2:valid")
    ours = apply(loaded.adapter, config, ids).summary["tokens_per_s"]
    return {"name": "hf-loop", "plain_tokens_per_s": plain, "finetune_tokens_per_s": ours, "steps": steps,
            "seqlen": seqlen, "batch_size": batch_size}


def one_run(name: str, args) -> dict:
    """Build or load the starting point, recover, measure; in a child process."""
    from slimformer.data import load_text, tokenize
    from slimformer.evaluation import evaluate_task, perplexity
    from slimformer.methods import apply

    torch.set_num_threads(args.threads)
    if name == "hf-loop":
        return hf_loop()
    start_name, method = name.split(":")
    loaded, info = start_model(start_name, Path(args.store).expanduser(), args.search_sleb, args.device)
    out = {"name": name, "start": info, "device": args.device}
    if method != "none":
        config = recovery_config(method, args.tokens, args.lr, args.device)
        ids = tokenize(loaded.tokenizer, load_text(config.data))
        result = apply(loaded.adapter, config, ids)
        out.update(seconds=result.seconds, peak_rss_gib=result.peak_rss_gib, config=result.config,
                   summary={k: v for k, v in result.summary.items()})
        if method.endswith("+gptq"):
            again = apply(loaded.adapter, start_gptq(args.device), calibration(loaded.tokenizer))
            out["requantized"] = {"method": again.method, "seconds": again.seconds}
    loaded.model.to(args.device)
    test = tokenize(loaded.tokenizer, load_text("wikitext2:test"))
    out["ppl"] = perplexity(loaded.model, test, windows=args.windows, progress=False).perplexity
    if args.tasks:
        batch = 16 if args.device == "cpu" else 64  # on a GPU the cost is the number of forward calls
        out["tasks"] = {t: evaluate_task(loaded.model, loaded.tokenizer, t, limit=args.limit, batch_size=batch,
                                         progress=False)
                        for t in ("piqa", "arc_easy")}
    return out


def _gap_closed(ppl_before: float, ppl_after: float) -> float:
    """The share of the log-perplexity gap to the dense model that recovery closed."""
    import math

    return (math.log(ppl_before) - math.log(ppl_after)) / (math.log(ppl_before) - math.log(DENSE_PPL))


def _rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    rows = []
    if r := results.get("hf-loop"):
        rows.append(("training throughput, dense, 4 × 512 tokens per step",
                     f"plain transformers loop {r['plain_tokens_per_s']:.0f} tokens/s · slimformer finetune "
                     f"{r['finetune_tokens_per_s']:.0f} tokens/s ({r['finetune_tokens_per_s'] / r['plain_tokens_per_s']:.2f}×)"))
    for name in [n for base in RUNS[1:] for n in results if n.split("@")[0] == base]:
        r = results[name]
        start = results.get(name.split(":")[0] + ":none")
        text = f"ppl {r['ppl']:.2f}"
        if start and r is not start:
            text += f" (from {start['ppl']:.2f}; {100 * _gap_closed(start['ppl'], r['ppl']):.0f}% of the log gap closed)"
        for task, t in r.get("tasks", {}).items():
            text += f" · {task} {100 * t['acc']:.1f} ({t['examples']})"
        if s := r.get("summary"):
            text += (f" · {s['tokens']:,} tokens in {s['steps']} steps (best {s['best_step']}"
                     f"{', stopped early' if s['stopped_early'] else ''}), {s['tokens_per_s']:.0f} tokens/s · held-out "
                     f"{s['heldout_before']:.3f} → {s['heldout_after']:.3f} · {r['seconds']:.0f} s, "
                     f"peak RSS {r['peak_rss_gib']:.2f} GiB")
            if "teacher_cache_bytes" in s:
                text += (f" · teacher cache {s['teacher_cache_bytes'] / 2**20:.0f} MiB "
                         f"({s['teacher_cache_bytes_per_token']:.0f} B/token), {s['teacher_cache_seconds']:.0f} s")
            if "heldout_unmerged" in s:
                text += f" · LoRA held-out unmerged {s['heldout_unmerged']:.4f}, merged {s['heldout_merged']:.4f}"
            if "heldout_requantized" in s:
                text += f" · float {s['heldout_float']:.4f}, back on the int4 grid {s['heldout_requantized']:.4f}"
            elif "heldout_float" in s:
                text += f" · float {s['heldout_float']:.4f}"
            if q := r.get("requantized"):
                text += f", then {q['method'].upper()} afresh ({q['seconds']:.0f} s)"
        rows.append((name, text))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated run names: " + ", ".join(RUNS))
    parser.add_argument("--tokens", type=int, default=200_000, help="training budget of every recovery run")
    parser.add_argument("--lr", type=float, default=None, help="learning rate of every recovery run (default: the method's)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--tasks", action="store_true", help="also PIQA and ARC-Easy (full sets: ~12 min per model)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task")
    parser.add_argument("--store", default="~/.cache/slimformer/recovery-starts")
    parser.add_argument("--search-sleb", action="store_true", help="search SLEB's blocks instead of the recorded ones")
    parser.add_argument("--device", default="cpu", help="where calibration, training and evaluation run (cuda for a GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    parser.add_argument("--tag", default=None, help="write results/recovery_smollm2_TAG.{json,md} instead")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(json.loads(args.child), args)))
        return
    runs = [r for r in RUNS if r in args.only.split(",")] if args.only else RUNS
    stem = "recovery_smollm2" + (f"_{args.tag}" if args.tag else "")
    path = RESULTS / f"{stem}.json"
    results = {r["name"]: r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    extra = ["--tokens", str(args.tokens), "--windows", str(args.windows), "--store", args.store,
             "--device", args.device, "--threads", str(args.threads)]
    extra += (["--tasks"] if args.tasks else []) + (["--limit", str(args.limit)] if args.limit else [])
    extra += ["--search-sleb"] if args.search_sleb else []
    extra += ["--lr", str(args.lr)] if args.lr else []
    # A run at another budget or learning rate is kept apart from the protocol's: NAME@12k@lr0.0002.
    suffix = (f"@{args.tokens // 1000}k" if args.tokens != 200_000 else "") + (f"@lr{args.lr:g}" if args.lr else "")
    for run in runs:  # written after every run: a long benchmark keeps what it measured
        for r in run_children(__file__, [run], extra):
            name = r["name"] if r["name"].endswith(":none") else r["name"] + suffix  # no training: no budget
            results[name] = {**r, "name": name}
        ordered = [n for base in RUNS for n in results if n.split("@")[0] == base]
        write_result(stem, {"tokens": args.tokens, "windows": args.windows, "device": args.device,
                                          "runs": [results[n] for n in ordered]}, _rows(results))


if __name__ == "__main__":
    main()
