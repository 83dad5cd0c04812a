"""A model larger than this machine's memory, compressed block by block from disk: peak RSS, seconds per block, disk traffic.

The script writes a random-weight Llama checkpoint of Llama-2-13B shapes (hidden 5120, intermediate
13824, 40 heads, 40 blocks; bfloat16, ≈ 26 GB, SmolLM2's tokenizer and vocabulary so WikiText-2
calibration text tokenizes) one block-shard at a time, never whole in memory; then each method
runs streamed (``slimformer run --max-memory``-style, in a fresh process so its peak RSS is its
own) and the output's sparsity or bit width is checked from a few tensors. Everything it wrote is
removed at the end. Disk needed: the checkpoint (≈ 26 GB) plus the largest output (Wanda's
bfloat16 copy, ≈ 26 GB; each output is deleted before the next method runs). Mixtral-8x7B shapes
(experts stored apart, as its checkpoints store them) take 2.9 GB a block, and as much again for
each block of the output.
A method run again replaces its row in the result; the other methods' rows are kept, so
methods measured in separate invocations on the same shapes share one table.

    python scale.py                                # wanda then gptq on the 13B shapes, 4 × 512 tokens
    python scale.py --methods wanda --layers 8     # a shorter run: 8 blocks of the same shapes
    python scale.py --shape 70b-block --methods wanda --nsamples 16 --seqlen 2048 --max-memory 24GiB
                                                   # one 70B-shaped block: the sequential mode's peak vs the formula
    python scale.py --shape mixtral-8x7b --layers 4 --methods expert-prune --max-memory 20GiB
                                                   # 4 blocks of Mixtral-8x7B shapes, a quarter of the experts pruned
    python scale.py --source smollm2-135m --methods wanda --nsamples 32 --seqlen 2048 --max-memory 4GiB \
                    --activations memory,disk      # an existing model; hidden states in memory, then on disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common import RESULTS, write_result

RUN_SETTINGS = ("nsamples", "seqlen", "max_memory", "threads", "activations")  # kept with each method's figures
SHAPES = {"13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      num_hidden_layers=40),
          "70b-block": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                            num_hidden_layers=1),
          # Mixtral-8x7B: 8 experts of the 7B FFN per block, each token routed to 2; ≈ 2.9 GB a block in bfloat16
          "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                               num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2)}


def write_checkpoint(folder: Path, shape: dict, layers: int) -> dict:
    """A random bfloat16 Llama (or Mixtral) checkpoint, one shard per block plus one for the rest, with an index.

    Mixtral's experts are stored as its released checkpoints store them, each expert's w1, w2, w3 apart.
    """
    from transformers import AutoTokenizer, LlamaConfig, MixtralConfig

    from slimformer.models.loading import resolve_alias, gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf_checkpoint(resolve_alias("smollm2-135m")))
    moe = "num_local_experts" in shape
    config = (MixtralConfig if moe else LlamaConfig)(
        **{**shape, "num_hidden_layers": layers}, vocab_size=len(tokenizer), max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.dtype = torch.bfloat16
    folder.mkdir(parents=True)
    h, i, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * (h_d := config.hidden_size // config.num_attention_heads)
    block = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
             "self_attn.o_proj.weight": (h, h), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}
    if moe:
        block["block_sparse_moe.gate.weight"] = (config.num_local_experts, h)
        for e in range(config.num_local_experts):
            block.update({f"block_sparse_moe.experts.{e}.w1.weight": (i, h), f"block_sparse_moe.experts.{e}.w3.weight": (i, h),
                          f"block_sparse_moe.experts.{e}.w2.weight": (h, i)})
    else:
        block.update({"mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i)})
    gen = torch.Generator().manual_seed(0)
    weight_map, total, start = {}, 0, time.perf_counter()
    n = layers + 1
    for k in range(n):
        if k < layers:
            tensors = {f"model.layers.{k}.{name}": (torch.ones(s) if len(s) == 1 else
                                                     torch.randn(s, generator=gen) * (0.01 if "down" in name or "w2" in name else 0.02))
                       for name, s in block.items()}
        else:
            v = config.vocab_size
            tensors = {"model.embed_tokens.weight": torch.randn((v, h), generator=gen) * 0.02,
                       "model.norm.weight": torch.ones(h), "lm_head.weight": torch.randn((v, h), generator=gen) * 0.02}
        tensors = {key: t.to(torch.bfloat16) for key, t in tensors.items()}
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
        print(f"\rwrote shard {k + 1}/{n} ({total / 1e9:.1f} GB)", end="", flush=True)
    print()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"bytes": total, "seconds": time.perf_counter() - start, "head_dim": h_d}


def child(spec: dict) -> None:
    """One streamed method run (in its own process): prints a JSON line with its figures."""
    from slimformer.machine import peak_rss_gib
    from slimformer.methods import ExpertPruneConfig, GPTQConfig, WandaConfig
    from slimformer.methods.memory import parse_size
    from slimformer.recipes import Calibration, Measure, Recipe, run_streamed

    torch.set_num_threads(spec["threads"])
    config = {"wanda": WandaConfig(sparsity=0.5), "gptq": GPTQConfig(bits=4, group_size=128),
              "expert-prune": ExpertPruneConfig(ratio=0.25)}[spec["method"]]
    recipe = Recipe(steps=(config,), model=spec["model"], calibration=Calibration("wikitext2:valid", spec["nsamples"],
                                                                                   spec["seqlen"]),
                    measure=Measure(ppl_windows=0, speed=False))
    io_before = _io()
    out = Path(spec["out"])
    trace, stop = {}, threading.Event()
    sampler = threading.Thread(target=_rss_by_block, args=(out.parent / f".{out.name}.streaming" / "blocks", trace, stop))
    sampler.start()
    start = time.perf_counter()
    try:
        summary = run_streamed(recipe, out, max_memory=parse_size(spec["max_memory"]), overwrite=True,
                               out_dtype="bfloat16", progress=False, activations=spec["activations"])
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - start
    io_after = _io()
    step = summary["steps"][0]
    print(json.dumps({"seconds": seconds, "method_seconds": step["result"]["seconds"],
                      "peak_rss_gib": peak_rss_gib(), "method_peak_rss_gib": step["result"]["peak_rss_gib"],
                      "estimate_gib": step["estimate_bytes"]["total"] / 2**30,
                      "activations_on_disk": step["activations_on_disk"],
                      "estimate_terms_gib": {k: v / 2**30 for k, v in step["estimate_bytes"].items()},
                      "read_gb": (io_after["read_bytes"] - io_before["read_bytes"]) / 1e9,
                      "written_gb": (io_after["write_bytes"] - io_before["write_bytes"]) / 1e9,
                      "rss_by_block_gib": trace,
                      "summary": {k: v for k, v in step["result"]["summary"].items() if not isinstance(v, (dict, list))}}))


def _rss_by_block(blocks: Path, trace: dict[int, float], stop: threading.Event) -> None:
    """The largest resident memory (GiB) seen while each block ran, keyed by the count of blocks written before it.

    Sampled every 0.2 s; a peak that grows with the key is memory a finished block left behind.
    """
    from slimformer.machine import current_rss_bytes

    done = 0
    while not stop.wait(0.2):  # at the end the shards are renamed away: the count only goes up
        done = max(done, sum(1 for _ in blocks.glob("*.safetensors")) if blocks.exists() else 0)
        trace[done] = max(trace.get(done, 0.0), current_rss_bytes() / 2**30)


def _io() -> dict[str, int]:
    """This process's bytes read from and written to storage (/proc/self/io)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in fields.items()}


def merged(path: Path, payload: dict) -> dict:
    """``payload`` with the runs of an earlier result for the same checkpoint that this one did not redo.

    So methods measured in separate invocations (a 40-block GPTQ run takes over an hour) land in one
    table; each run carries its own calibration settings (older runs: their file's settings).
    """
    if not path.exists():
        return payload
    earlier = json.loads(path.read_text())
    kept = {label: {**figures, "settings": figures.get("settings") or
                    {k: earlier["settings"].get(k) for k in RUN_SETTINGS}}
            for label, figures in earlier.get("runs", {}).items() if label not in payload["runs"]}
    return {**payload, "runs": {**kept, **payload["runs"]}}


def run_rows(label: str, figures: dict, layers: int) -> list[tuple[str, str]]:
    """The table rows of one method run."""
    settings = figures["settings"]
    terms = ", ".join(f"{k} {v:.2f}" for k, v in figures["estimate_terms_gib"].items() if k != "total" and v)
    return [(f"{label}: peak RSS (whole process)", f"{figures['peak_rss_gib']:.2f} GiB "
             f"(estimate {figures['estimate_gib']:.2f}" + (f" = {terms}" if terms else "") +
             f"; budget {settings['max_memory']}; {settings['nsamples']} × {settings['seqlen']} calibration tokens)"),
            (f"{label}: seconds per block", f"{figures['method_seconds'] / layers:.1f} "
             f"({figures['method_seconds']:.0f} s for {layers} blocks)"),
            (f"{label}: disk read / written", f"{figures['read_gb']:.1f} GB / {figures['written_gb']:.1f} GB"),
            *([(f"{label}: largest RSS while block k runs", rss_row(figures["rss_by_block_gib"], layers))]
              if figures.get("rss_by_block_gib") else []),
            (f"{label}: output", f"{figures['output_gb']:.1f} GB; " +
             "; ".join(f"{k.split('layers.')[-1]}: {v}" for k, v in figures["output"].items()))]


def rss_row(trace: dict, layers: int) -> str:
    """``block 0: 3.1 GiB · block 20: 3.2 · …`` from a run's RSS trace (keys may be strings once read from JSON)."""
    trace = {int(k): v for k, v in trace.items()}
    picks = sorted({k for k in (0, 1, layers // 4, layers // 2, 3 * layers // 4, layers - 1) if k in trace})
    parts = [f"block {k}: {trace[k]:.2f}" for k in picks]
    if layers in trace:
        parts.append(f"head, embedding and index: {trace[layers]:.2f}")
    return " · ".join(parts) + " GiB"


def check_output(folder: Path, method: str, layers: int) -> dict:
    """Sparsity or bit width of a few output tensors (first, middle and last block); experts left per block."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    found = {}
    if method == "expert-prune":
        config = json.loads((folder / "config.json").read_text())
        for k in sorted({0, layers // 2, layers - 1}):
            prefix = f"model.layers.{k}.block_sparse_moe."
            experts = {key.split(".")[5] for key in index if key.startswith(prefix + "experts.")}
            with safe_open(folder / index[prefix + "gate.weight"], "pt") as f:
                router = list(f.get_tensor(prefix + "gate.weight").shape)
            found[f"model.layers.{k}.block_sparse_moe"] = {"experts": len(experts), "router": router}
        found["config"] = {"num_local_experts": config["num_local_experts"]}
        return found
    for k in sorted({0, layers // 2, layers - 1}):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{k}.{proj}"
            key = f"{name}.weight" if method == "wanda" else f"{name}.weight_packed"
            with safe_open(folder / index[key], "pt") as f:
                t = f.get_tensor(key)
                if method == "wanda":
                    found[name] = {"zeros": float((t == 0).float().mean()), "dtype": str(t.dtype)}
                else:
                    shape = f.get_tensor(f"{name}.weight_shape").tolist()
                    found[name] = {"bits_per_weight": t.numel() * 32 / (shape[0] * shape[1]),
                                   "scales": list(f.get_tensor(f"{name}.weight_scale").shape)}
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default="13b", choices=list(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="blocks to write (default: all of the shape)")
    p.add_argument("--methods", default="wanda,gptq")
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-memory", default="4GiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default="/tmp/slimformer-scale", help="where the checkpoint and outputs go")
    p.add_argument("--source", default=None,
                   help="an existing model that fits in memory (alias, folder, GGUF) instead of a random checkpoint")
    p.add_argument("--activations", default="auto",
                   help="where the calibration hidden states live: auto, memory, disk, or a comma list to compare")
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))
    shape = SHAPES[args.shape]
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    try:
        if args.source:
            from slimformer.models.loading import load_model

            model, layers = args.source, len(load_model(args.source).adapter.blocks)
            rows, payload, name = [("model", f"{args.source}, {layers} blocks")], {"runs": {}}, args.source
        else:
            layers = args.layers or shape["num_hidden_layers"]
            made = write_checkpoint(root / "model", shape, layers)
            print(f"checkpoint: {made['bytes'] / 1e9:.1f} GB in {made['seconds']:.0f} s")
            rows = [("checkpoint", f"{args.shape} shapes, {layers} blocks, {made['bytes'] / 1e9:.1f} GB bfloat16 "
                                   f"(written in {made['seconds']:.0f} s)")]
            payload, model = {"checkpoint": made, "runs": {}}, str(root / "model")
            name = args.shape + (f"_{layers}blocks" if args.layers else "")
        runs = [(m, a) for m in args.methods.split(",") for a in args.activations.split(",")]
        for method, activations in runs:
            out = root / f"out-{method}"
            spec = {"method": method, "model": model, "out": str(out), "nsamples": args.nsamples,
                    "seqlen": args.seqlen, "max_memory": args.max_memory, "threads": args.threads,
                    "activations": activations}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
            figures = json.loads(proc.stdout.strip().splitlines()[-1])
            figures["output"] = check_output(out, method, layers)
            figures["output_gb"] = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9
            label = method if len(runs) == 1 and activations == "auto" else \
                f"{method}, activations {'on disk' if figures['activations_on_disk'] else 'in memory'}"
            figures["settings"] = {k: spec[k] for k in RUN_SETTINGS}
            payload["runs"][label] = figures
            shutil.rmtree(out)
        result = f"scale_{name}" + (f"_{args.nsamples}x{args.seqlen}" if args.source else "")
        payload = merged(RESULTS / f"{result}.json", payload)
        payload["settings"] = vars(args)
        for label, figures in payload["runs"].items():
            rows += run_rows(label, figures, layers)
        write_result(result, payload, rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
