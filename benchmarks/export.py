"""SmolLM2-135M exported to GGUF and run in llama.cpp itself: perplexity and decode speed of dense, SLEB 6/30, GPTQ int4 → Q4_0 and llama.cpp-style round-to-nearest Q4_0.

For each model: the GGUF file's size; perplexity on the first ``--windows`` WikiText-2 test windows of
2048 tokens computed from llama.cpp — its final hidden state of every position (the server's native
``/embedding`` endpoint with per-token output) times the file's own output weights, read and
de-quantized with gguf-py — beside slimformer's perplexity of the same model in transformers;
a check that this head step agrees with llama.cpp's own next-token log-probabilities; and llama.cpp's
greedy decode tokens/s (128 tokens after a 16-token prompt, median of ``--repeats``), 2 threads.

- ``dense-f16``: the model as shipped, float16 weights;
- ``sleb6-f16``: SLEB 6/30 (the blocks of ``block_removal_smollm2_sleb_6``), float16;
- ``gptq4g32-q4_0``: slimformer GPTQ int4, symmetric, groups of 32 (32 × 2048 WikiText-2 valid calibration
  windows, seed 0), written code for code as Q4_0; the float embedding (also the output layer) as Q8_0;
- ``gptq4g32mse-q4_0``: the same with each group's range clipped to the value that minimises its rounding
  error (``mse``, the GPTQ quantizer's grid search) before the codes are chosen;
- ``rtn-q4_0``: the dense model rounded to nearest Q4_0 by gguf-py's quantizer (bit-exact with llama.cpp's
  reference), with the same Q8_0 embedding: what llama.cpp's own quantizer makes of it.

``speed`` measures the decode tokens/s of every file written so far again, side by side in one process
(the models interleaved, median of ``--repeats``), which the per-run figures are not.

    python benchmarks/export.py [--windows 40] [--only dense-f16,sleb6-f16,gptq4g32-q4_0,gptq4g32mse-q4_0,rtn-q4_0,speed]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS, write_result

RUNS = ["dense-f16", "sleb6-f16", "gptq4g32-q4_0", "gptq4g32mse-q4_0", "rtn-q4_0", "speed"]
SEQLEN = 2048


def build(name: str, store: Path):
    """The transformers model of a run (built once and kept under ``store``) and the GGUF type to write."""
    from recovery import start_model

    from slimformer import load_model, save_model
    from slimformer.data import calibration_samples
    from slimformer.methods import GPTQConfig, apply

    if name in ("dense-f16", "rtn-q4_0"):
        return load_model("smollm2-135m"), name.split("-")[1]
    if name == "sleb6-f16":
        return start_model("sleb6", store.parent / "recovery-starts", search_sleb=False)[0], "f16"
    mse = name.startswith("gptq4g32mse")
    folder = store / ("gptq4g32mse" if mse else "gptq4g32")
    if not folder.exists():
        loaded = load_model("smollm2-135m")
        samples = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=32, seqlen=SEQLEN, seed=0)
        apply(loaded.adapter, GPTQConfig(bits=4, group_size=32, mse=mse), samples)
        save_model(loaded.model, loaded.tokenizer, folder)
    return load_model(str(folder)), "q4_0"


def output_weight(path: Path) -> torch.Tensor:
    """The file's output layer (``output.weight``, or the tied ``token_embd.weight``), de-quantized by gguf-py."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    t = tensors.get("output.weight") or tensors["token_embd.weight"]
    data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(int(t.shape[1]), int(t.shape[0]))


def window_nll(hidden: np.ndarray, head: torch.Tensor, window: torch.Tensor, chunk: int = 512) -> float:
    """Mean NLL of tokens 2..n of a window from llama.cpp's hidden states, the logits made in chunks."""
    h = torch.from_numpy(hidden)
    total = 0.0
    for s in range(0, h.shape[0] - 1, chunk):
        logits = h[s: min(s + chunk, h.shape[0] - 1)] @ head.T
        total += torch.nn.functional.cross_entropy(logits, window[s + 1: s + 1 + logits.shape[0]], reduction="sum").item()
    return total / (h.shape[0] - 1)


def speed(args) -> dict:
    """Decode tokens/s of every GGUF in the store, the models interleaved in each of ``--repeats`` rounds."""
    from slimformer.export.llamacpp import LlamaCpp

    store = Path(args.store).expanduser()
    files = {n: store / f"{n}.gguf" for n in RUNS if (store / f"{n}.gguf").exists()}
    servers = {n: LlamaCpp(p, n_ctx=512, threads=2) for n, p in files.items()}
    prompt = list(range(1000, 1016))
    runs: dict[str, list[float]] = {n: [] for n in servers}
    for _ in range(args.repeats):
        for n, server in servers.items():
            runs[n].append(server.generate(prompt, 128)[1])
    return {"name": "speed", "repeats": args.repeats, "decode_tok_s": {n: statistics.median(v) for n, v in runs.items()},
            "decode_runs": runs}


def one_run(name: str, args) -> dict:
    """Export, then score in llama.cpp and in transformers, then time llama.cpp's decoding."""
    if name == "speed":
        return speed(args)
    from slimformer.data import cut_windows, load_text, tokenize
    from slimformer.evaluation import perplexity
    from slimformer.export import export_gguf
    from slimformer.export.llamacpp import LlamaCpp

    store = Path(args.store).expanduser()
    loaded, ftype = build(name, store)
    path = store / f"{name}.gguf"
    written = export_gguf(loaded, path, ftype, overwrite=True)
    ids = tokenize(loaded.tokenizer, load_text("wikitext2:test"))
    bos = loaded.window_bos()
    windows = cut_windows(ids, SEQLEN, args.windows, bos=bos)
    head = output_weight(path)

    runtime = LlamaCpp(path, n_ctx=SEQLEN, threads=2, embeddings=True)
    start, nlls = time.perf_counter(), []
    for i, w in enumerate(windows):
        hidden = runtime.hidden_states(w.tolist())
        if i == 0:
            first_hidden = hidden[100]  # causal: the state at position 100 is that of the 101-token prefix
        nlls.append(window_nll(hidden, head, w))
    llamacpp_s = time.perf_counter() - start
    del runtime

    generator = LlamaCpp(path, n_ctx=SEQLEN, threads=2)
    # the head step against llama.cpp's own logits: log-probabilities of its 20 most likely next tokens
    own = generator.next_token_logprobs(windows[0, :101].tolist(), 20)
    derived = torch.log_softmax(torch.from_numpy(first_hidden) @ head.T, -1)
    head_gap = max(abs(lp - derived[i].item()) for i, lp in own.items())
    prompt = windows[0, :16].tolist()
    speeds = [generator.generate(prompt, 128)[1] for _ in range(args.repeats)]
    del generator

    out = {"name": name, "type": ftype, "gguf_bytes": written["bytes"], "tensors": written["tensors"],
           "quantized_kept": written["quantized_kept"], "windows": len(nlls),
           "ppl_llamacpp": math.exp(sum(nlls) / len(nlls)), "llamacpp_eval_s": llamacpp_s,
           "head_check_max_abs_logprob_diff": head_gap, "decode_tok_s": statistics.median(speeds),
           "decode_runs": speeds, "blocks": loaded.model.config.num_hidden_layers}
    if name != "rtn-q4_0":  # llama.cpp's own rounding has no transformers counterpart
        torch.set_num_threads(2)
        out["ppl_slimformer"] = perplexity(loaded.model, ids, seqlen=SEQLEN, windows=args.windows, bos=bos,
                                           progress=False).perplexity
    return out


def _rows(results: dict) -> list[tuple[str, str]]:
    rows = []
    dense = results.get("dense-f16")
    for name in RUNS:
        if (r := results.get(name)) is None or name == "speed":
            continue
        text = (f"{r['blocks']} blocks · {r['gguf_bytes'] / 2**20:.1f} MiB GGUF · llama.cpp ppl {r['ppl_llamacpp']:.2f} "
                f"({r['windows']} windows)")
        if "ppl_slimformer" in r:
            text += f" vs slimformer {r['ppl_slimformer']:.2f} ({r['ppl_llamacpp'] / r['ppl_slimformer'] - 1:+.2%})"
        text += f" · decode {r['decode_tok_s']:.1f} tok/s"
        if dense and name != "dense-f16":
            text += f" ({r['decode_tok_s'] / dense['decode_tok_s']:.2f}× dense f16)"
        text += f" · head check {r['head_check_max_abs_logprob_diff']:.1e} nats"
        rows.append((name, text))
    for gptq in ("gptq4g32-q4_0", "gptq4g32mse-q4_0"):
        if (g := results.get(gptq)) and (q := results.get("rtn-q4_0")):
            rows.append((f"{gptq} against round-to-nearest Q4_0",
                         f"ppl ratio {g['ppl_llamacpp'] / q['ppl_llamacpp']:.3f} ({g['ppl_llamacpp']:.2f} vs "
                         f"{q['ppl_llamacpp']:.2f}), file size {g['gguf_bytes'] / 2**20:.1f} vs "
                         f"{q['gguf_bytes'] / 2**20:.1f} MiB"))
    if sp := results.get("speed"):
        base = sp["decode_tok_s"].get("dense-f16")
        rows.append((f"decode side by side ({sp['repeats']} interleaved rounds, 128 tokens)", " · ".join(
            f"{n} {v:.1f} tok/s" + (f" ({v / base:.2f}×)" if base and n != "dense-f16" else "")
            for n, v in sp["decode_tok_s"].items())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated runs: " + ", ".join(RUNS))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="decode timings per model")
    parser.add_argument("--store", default="~/.cache/slimformer/export-bench")
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = [r for r in RUNS if r in args.only.split(",")] if args.only else RUNS
    path = RESULTS / "export_smollm2.json"
    results = {r["name"]: r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    for run in runs:  # written after every run: a long benchmark keeps what it measured
        start = time.perf_counter()
        results[run] = {**one_run(run, args), "wall_s": time.perf_counter() - start}
        print({k: v for k, v in results[run].items() if k != "decode_runs"}, flush=True)
        write_result("export_smollm2", {"windows": args.windows, "runs": [results[n] for n in RUNS if n in results]},
                     _rows(results))


if __name__ == "__main__":
    main()
