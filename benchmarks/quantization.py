"""Weight-only quantization of SmolLM2-135M on the DESIGN.md protocol: quality, cost, size and CPU speed.

Each configuration runs in its own process (peak RSS is its own). Calibration: 32 × 2048 tokens
of WikiText-2 valid, seed 0; perplexity: the first 40 windows of WikiText-2 test. Speed, in
the same process as a freshly loaded fp32 dense model, the two alternating, medians of 3:
greedy decode tokens/s (batch 1, 128-token prompt, 32 new tokens) and the latency of one
2048-token prefill. ``kernels`` measures one quantized projection against the fp32 Linear at
1…256 rows, weights rotated through more memory than the caches hold, to place the crossover
between the packed kernels and the dequantized float32 path.

    python benchmarks/quantization.py [--only rtn8,gptq4g64] [--windows 40] [--nsamples 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, run_children, write_result

RUNS = ["dense", "floor", "kernels", "rtn8", "rtn4g64", "gptq4g64", "awq4g64", "gptq4g64+head8", "llmc-gptq", "torchao",
        "rtn8+head8", "gptq4g64noact", "llmc-awq", "gptq4g32sym", "sleb3+gptq4g64", "rtn4g32asym"]  # in order of priority
PEERS = ("llmc-gptq", "llmc-awq", "torchao")  # need --peer-python: an environment with llmcompressor and torchao


# SLEB is greedy: its first three rounds are a 3-block search. These are the first three blocks of the
# recorded SLEB 6/30 search (block_removal_smollm2_sleb_6, one 2048-token calibration window), removed
# directly instead of searched again on the 32 windows given to GPTQ, which would take two hours here.
SLEB_3 = [14, 25, 13]


def steps(name: str) -> list:
    """The method configs of one run."""
    from slimformer.methods import AWQConfig, GPTQConfig, RTNConfig

    head = dict(head=True, embedding=True) if name.endswith("+head8") else {}
    base = name.removesuffix("+head8")
    table = {
        "dense": [],
        "rtn8": [RTNConfig(bits=8, **head)],
        "rtn4g64": [RTNConfig(bits=4, group_size=64)],
        "rtn4g32asym": [RTNConfig(bits=4, group_size=32, symmetric=False)],
        "gptq4g64": [GPTQConfig(bits=4, group_size=64, **head)],
        "gptq4g32sym": [GPTQConfig(bits=4, group_size=32)],
        "gptq4g64noact": [GPTQConfig(bits=4, group_size=64, act_order=False)],
        "awq4g64": [AWQConfig(bits=4, group_size=64)],
        "sleb3+gptq4g64": [GPTQConfig(bits=4, group_size=64)],  # after removing SLEB_3
    }
    return table[base]


def kernel_rows(repeats: int = 7, copies: int = 48) -> list[dict]:
    """Microseconds per call of one SmolLM2 projection, packed kernel vs dequantized float vs fp32 Linear, by rows."""
    from slimformer.models.quantized import DECODE_ROWS, QuantizedLinear, float_path, set_decode_rows
    from slimformer.models.quantizer import QuantScheme, quantize_weight

    out = []
    for (n, k) in ((1536, 576), (576, 1536)):
        for bits, group in ((4, 64), (8, None)):
            # 48 copies (40-80 MB) rotate past the caches, as the 210 projections of a decode step do
            quant = [QuantizedLinear(quantize_weight(torch.randn(n, k), QuantScheme(bits, group))) for _ in range(copies)]
            dense = [torch.nn.Linear(k, n, bias=False) for _ in range(copies)]
            for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                x = torch.randn(rows, k)

                def per_call(mods) -> float:
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        for m in mods:
                            m(x)
                        times.append(time.perf_counter() - start)
                    return statistics.median(times) / len(mods) * 1e6

                with torch.no_grad():
                    set_decode_rows(1 << 30)  # the packed kernels at every row count
                    per_call(quant)  # warm-up (the allocator settles on the sizes it is asked for)
                    kernel = per_call(quant)
                    set_decode_rows(DECODE_ROWS)
                    with float_path():
                        per_call(quant)
                        dequant = per_call(quant)
                    per_call(dense)
                    fp32 = per_call(dense)
                out.append({"shape": f"{k}->{n}", "bits": bits, "group": group, "rows": rows, "kernel_us": kernel,
                            "dequant_us": dequant, "fp32_us": fp32})
    return out


class _Free(torch.nn.Module):
    """A stand-in projection that costs nothing: zeros of the output shape."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def decode_floor() -> dict:
    """Decode tokens/s of SmolLM2 with every projection and the head replaced by free stand-ins, beside the fp32 model.

    What is left is the rest of an eager decode step (norms, rotary, attention over the cache,
    the cache itself, Python): a ceiling on what any weight format can speed up.
    """
    from slimformer import load_model
    from slimformer.evaluation.speed import compare_speed
    from slimformer.methods import select_linears
    from slimformer.models.quantized import replace_module

    dense = load_model("smollm2-135m").model
    free = load_model("smollm2-135m")
    for name, module in {**select_linears(free.adapter), "lm_head": free.model.lm_head}.items():
        replace_module(free.model, name, _Free(module.out_features))
    ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
    speed = compare_speed({"dense": dense, "free": free.model}, ids, repeats=3, prompt_tokens=128, new_tokens=32)
    return {k: {f: v[f] for f in ("prefill_s", "decode_tok_s")} for k, v in speed.items()}


def peer_run(name: str, nsamples: int, peer_python: str, folder: Path) -> tuple[dict, Path | None]:
    """Run a reference tool in its own environment on the same checkpoint and calibration windows."""
    import subprocess
    import sys

    from slimformer import load_model
    from slimformer.data import calibration_samples, load_text, tokenize
    from slimformer.models.loading import gguf_checkpoint, resolve_alias

    model_dir = gguf_checkpoint(resolve_alias("smollm2-135m"))
    tokenizer = load_model("smollm2-135m").tokenizer
    data = folder / "inputs.pt"
    torch.save({"samples": calibration_samples(tokenizer, "wikitext2:valid", n=nsamples, seqlen=2048, seed=0),
                "ids": tokenize(tokenizer, load_text("wikitext2:test"))[:, :2048].clone()}, data)
    what = name.removeprefix("llmc-")
    out = folder / what
    proc = subprocess.run([peer_python, str(Path(__file__).with_name("peers.py")), "--what", what, "--model",
                           str(model_dir), "--samples", str(data), "--out", str(out)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"peer {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), (out if what != "torchao" else None)


def one_run(name: str, windows: int, nsamples: int, peer_python: str | None = None) -> dict:
    """Quantize in this process and measure; called in a child process by ``main``."""
    from slimformer import load_model
    from slimformer.data import calibration_samples
    from slimformer.methods import apply

    torch.set_num_threads(2)
    if name == "kernels":
        return {"name": name, "rows": kernel_rows()}
    if name == "floor":
        return {"name": name, "speed": decode_floor()}
    if name in PEERS:
        if not peer_python:
            raise SystemExit(f"{name} needs --peer-python (an environment with llmcompressor and torchao)")
        with tempfile.TemporaryDirectory() as tmp:
            peer, checkpoint = peer_run(name, nsamples, peer_python, Path(tmp))
            if checkpoint is None:
                return {"name": name, **peer}
            # the reference's own compressed-tensors checkpoint, read by slimformer's loader and measured as ours
            loaded = load_model(str(checkpoint))
            out = {"name": name, "peer": peer, "compression_s": peer["seconds"], "peak_rss_gib": peer["peak_rss_gib"],
                   "quantization_config": json.loads((checkpoint / "config.json").read_text())["quantization_config"]}
            return _measure(loaded, out, windows)
    loaded = load_model("smollm2-135m")
    out: dict = {"name": name, "steps": []}
    configs = steps(name)
    if name.startswith("sleb3+"):
        from slimformer.models.surgery import remove_blocks

        remove_blocks(loaded.adapter, SLEB_3)
        out["removed"] = SLEB_3
    if configs:
        samples = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=nsamples, seqlen=2048, seed=0)
        for config in configs:
            result = apply(loaded.adapter, config, samples)
            out["steps"].append({"method": result.method, "seconds": result.seconds,
                                 "peak_rss_gib": result.peak_rss_gib, "summary": result.summary})
        out["compression_s"] = sum(s["seconds"] for s in out["steps"])
        out["peak_rss_gib"] = max(s["peak_rss_gib"] for s in out["steps"])
    return _measure(loaded, out, windows)


def _measure(loaded, out: dict, windows: int) -> dict:
    """Perplexity, size on disk, and speed against a freshly loaded fp32 model, alternating."""
    from slimformer import load_model, save_model
    from slimformer.data import load_text, tokenize
    from slimformer.evaluation import measure_costs, perplexity, size_on_disk

    ids = tokenize(loaded.tokenizer, load_text("wikitext2:test"))
    out["ppl"] = perplexity(loaded.model, ids, windows=windows, progress=False).perplexity
    with tempfile.TemporaryDirectory() as tmp:
        out["size_bytes"] = size_on_disk(save_model(loaded.model, None, Path(tmp) / "m"))
    dense = load_model("smollm2-135m").model
    costs = measure_costs({"dense": dense, "model": loaded.model}, ids[:, :2048], repeats=3, prompt_tokens=128,
                          new_tokens=32)
    out["speed"] = {k: {f: v[f] for f in ("prefill_s", "decode_tok_s", "prefill_speedup", "decode_speedup")}
                    for k, v in costs["models"].items()}
    return out


def _rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    dense = results.get("dense")
    rows = []
    for name in [n for base in RUNS for n in results if n.split("@")[0] == base]:
        r = results[name]
        if name == "kernels":
            for k in r["rows"]:
                rows.append((f"kernel {k['shape']} int{k['bits']} {'g' + str(k['group']) if k['group'] else 'per-ch'}"
                             f", {k['rows']} rows",
                             f"packed {k['kernel_us']:.0f} µs · dequant+fp32 {k['dequant_us']:.0f} µs · "
                             f"fp32 {k['fp32_us']:.0f} µs"))
            continue
        if name == "floor":
            f, d = r["speed"]["free"], r["speed"]["dense"]
            rows.append(("decode with free projections and head (ceiling of any weight format)",
                         f"{f['decode_tok_s']:.1f} tok/s = {f['decode_tok_s'] / d['decode_tok_s']:.2f}× fp32 dense "
                         f"({d['decode_tok_s']:.1f} tok/s); {1e3 / f['decode_tok_s']:.1f} ms of every step is not in "
                         "the projections"))
            continue
        if name == "torchao":
            d = r["speed"]["dense"]
            for peer, f in r["speed"].items():
                if peer != "dense":
                    rows.append((f"{peer} (eager, torchao {r['versions']['torchao']})",
                                 f"decode {f['decode_tok_s']:.1f} tok/s ({f['decode_tok_s'] / d['decode_tok_s']:.2f}× "
                                 f"fp32) · prefill 2048 {f['prefill_s']:.2f} s ({d['prefill_s'] / f['prefill_s']:.2f}× fp32)"))
            continue
        s = r["speed"]["model"]
        rel = f" ({r['ppl'] / dense['ppl']:.3f}× dense)" if dense and name != "dense" else ""
        size = f"{r['size_bytes'] / 2**20:.0f} MiB" + (f" ({r['size_bytes'] / dense['size_bytes']:.3f}×)" if dense else "")
        cost = f" · {r['compression_s']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB" if "compression_s" in r else ""
        calibration = f" ({r['nsamples']} × 2048 calibration tokens)" if "@" in name else ""
        rows.append((name + calibration, f"ppl {r['ppl']:.2f}{rel} · {size}{cost} · decode {s['decode_tok_s']:.1f} tok/s "
                           f"({s['decode_speedup']:.2f}× fp32) · prefill 2048 {s['prefill_s']:.2f} s "
                           f"({s['prefill_speedup']:.2f}× fp32)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None, help="comma-separated run names: " + ", ".join(RUNS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--peer-python", default=None,
                        help="python of an environment with llmcompressor and torchao, for the runs " + ", ".join(PEERS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(json.loads(args.child), args.windows, args.nsamples, args.peer_python)))
        return
    runs = [r for r in RUNS if (r in args.only.split(",") if args.only else r not in PEERS or args.peer_python)]
    path = RESULTS / "quantization_smollm2.json"
    results = {r["name"]: r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    # A run on another calibration size is kept apart from the protocol's: NAME@NSAMPLES.
    suffix = "" if args.nsamples == 32 else f"@{args.nsamples}"
    for run in runs:  # written after every run: a long benchmark keeps what it measured
        extra = ["--windows", str(args.windows), "--nsamples", str(args.nsamples)]
        extra += ["--peer-python", args.peer_python] if args.peer_python else []
        for r in run_children(__file__, [run], extra):
            r.update(name=r["name"] + suffix, nsamples=args.nsamples)
            results[r["name"]] = r
        ordered = [n for base in RUNS for n in results if n.split("@")[0] == base]
        write_result("quantization_smollm2", {"windows": args.windows, "nsamples": 32,
                                              "runs": [results[n] for n in ordered]}, _rows(results))


if __name__ == "__main__":
    main()
