"""Sparsity crafting on SmolLM2-135M: the PESC paper's Camel vs Camelidae comparison at small scale, and fewer experts.

Runs (each in its own process; tuned models are kept under ``--store`` for the later runs):

- ``base``: the model as shipped (no tuning), for reference;
- ``camel``: the dense model instruction-tuned (``instruct`` step: LoRA r16 on every projection,
  Alpaca 5k in the chat template, loss on responses, constant lr 2e-4 after 3% warm-up);
- ``camelidae``: PESC upcycling (8 experts, top-2, adapter width 72 = hidden / 8; routers set from
  8 × 2048 tokens of WikiText-2 valid), then the same tuning with the same data, steps and seed,
  adapters and routers trained in full, balancing loss α = 0.01; ``camelidae-noaux``: the same
  with α = 0; ``camelidae-random`` / ``camelidae-noaux-random``: both with random routers
  (``router_init: random``);
- ``qwen2moe``: the same idea in the stock Qwen2-MoE layout (shared expert = the FFN, 8 routed
  SwiGLU experts of width 72), tuned the same way; ``qwen2moe-random`` with random routers;
- ``router-start``: routing entropy per block of the untrained upcycled model on held-out Alpaca
  windows, routers random and set from data;
- ``speed``: latency of a 512-token forward and greedy decode tokens/s of base, camelidae and
  qwen2moe, measured side by side in one process (medians, models interleaved);
- ``experts``: expert pruning (frequency, output) and merging of the tuned Camelidae model down
  to 6, 4 and 2 experts (held-out loss against experts kept), and of tiny random Mixtral and
  Qwen2-MoE models (KL divergence from the unpruned model on random tokens); a plot.

Every tuned model is scored by its loss on the reference responses of the 252 user-oriented
self-instruct tasks (never trained on), and with ``--tasks`` by PIQA, ARC-Easy and BoolQ
accuracy (``--limit`` examples each; full sets without). Routing: the share of routing slots per
expert per block on held-out Alpaca windows, and its entropy against ln(8).

    python benchmarks/pesc.py --only base,camel,camelidae,camelidae-noaux,qwen2moe,speed,experts [--tokens 60000] [--tasks --limit 500]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from common import RESULTS, run_children, write_result

RUNS = ["base", "router-start", "camel", "camelidae", "camelidae-noaux", "camelidae-random", "camelidae-noaux-random",
        "qwen2moe", "qwen2moe-random", "speed", "experts"]
TUNED = {"camel": None, "camelidae": dict(layout="pesc"), "camelidae-noaux": dict(layout="pesc"),
         "camelidae-random": dict(layout="pesc", router_init="random"),
         "camelidae-noaux-random": dict(layout="pesc", router_init="random"),
         "qwen2moe": dict(layout="qwen2_moe"), "qwen2moe-random": dict(layout="qwen2_moe", router_init="random")}
EXPERTS, TOP_K, WIDTH = 8, 2, 72


def _score(loaded, args) -> dict:
    """Held-out instruction loss, parameters and (with --tasks) zero-shot accuracy of a loaded model."""
    from slimformer.evaluation import evaluate_task, instruction_loss
    from slimformer.models.moe import parameter_counts

    out = {"self_instruct": instruction_loss(loaded.model, loaded.tokenizer, "self-instruct", limit=args.si_limit,
                                             progress=False),
           "params": parameter_counts(loaded.model)}
    if args.tasks:
        out["tasks"] = {t: evaluate_task(loaded.model, loaded.tokenizer, t, limit=args.limit, progress=False)
                        for t in ("piqa", "arc_easy", "boolq")}
    return out


def tune(name: str, args) -> dict:
    """Upcycle (unless Camel), instruction-tune, save under the store, score."""
    from slimformer import load_model, save_model
    from slimformer.data import calibration_samples, instruction_examples, tokenize_instructions
    from slimformer.methods import InstructConfig, UpcycleConfig, apply

    loaded = load_model("smollm2-135m")
    out: dict = {"name": name}
    if TUNED[name] is not None:
        calib = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=8, seqlen=2048, seed=0)  # the router start
        up = apply(loaded.adapter, UpcycleConfig(experts=EXPERTS, top_k=TOP_K, adapter_dim=WIDTH, **TUNED[name]), calib)
        out["upcycle"] = up.summary
    samples = tokenize_instructions(loaded.tokenizer, instruction_examples("alpaca"))
    config = InstructConfig(tokens=args.tokens, **({"aux_loss": 0.0} if "-noaux" in name else {}))
    result = apply(loaded.adapter, config, samples)
    out.update(seconds=result.seconds, peak_rss_gib=result.peak_rss_gib, config=result.config,
               summary={k: v for k, v in result.summary.items() if k != "history"},
               history=result.summary["history"])
    save_model(loaded.model, loaded.tokenizer, Path(args.store).expanduser() / name, overwrite=True)
    out.update(_score(loaded, args))
    return out


def router_start() -> dict:
    """Routing entropy per block of the untrained upcycled model, routers random or set from data, on held-out Alpaca windows."""
    from slimformer import load_model
    from slimformer.data import calibration_samples, instruction_examples, tokenize_instructions
    from slimformer.methods import InstructConfig, UpcycleConfig, apply
    from slimformer.methods.pesc import heldout_routing, routing_entropy
    from slimformer.methods.training import split_windows

    out: dict = {"name": "router-start"}
    for init in ("random", "data"):
        loaded = load_model("smollm2-135m")
        samples = tokenize_instructions(loaded.tokenizer, instruction_examples("alpaca"))
        windows = split_windows(samples, InstructConfig(tokens=30000))[1][:, 0]  # the tuning runs' held-out windows
        calib = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=8, seqlen=2048, seed=0)
        apply(loaded.adapter, UpcycleConfig(experts=EXPERTS, top_k=TOP_K, adapter_dim=WIDTH, router_init=init), calib)
        out[init] = list(routing_entropy(heldout_routing(loaded.adapter, windows)).values())
    return out


def speed(args) -> dict:
    """Prefill latency (512 tokens) and decode tokens/s of the base and upcycled models, side by side."""
    from slimformer import load_model
    from slimformer.data import load_text, tokenize
    from slimformer.evaluation import measure_costs

    store = Path(args.store).expanduser()
    base = load_model("smollm2-135m")
    models = {"base": base.model}
    for name in ("camelidae", "qwen2moe"):
        if (store / name).exists():
            models[name] = load_model(str(store / name)).model
    ids = tokenize(base.tokenizer, load_text("wikitext2:test"))[:, :512]
    costs = measure_costs(models, ids, repeats=args.repeats, prompt_tokens=128, new_tokens=64)
    return {"name": "speed", "models": costs["models"], "settings": costs["settings"]}


def tiny_moe(family: str) -> torch.nn.Module:
    """A random stock MoE causal LM (hidden 32, 6 experts, top-2, 2 blocks, vocabulary 128), seeded."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    torch.manual_seed(0)
    # initializer_range 0.2: at the default 0.02 the experts' outputs are too small beside the residual to move the logits
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, initializer_range=0.2)
    config = MixtralConfig(**common, num_local_experts=6) if family == "mixtral" else \
        Qwen2MoeConfig(**common, num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=32)
    return AutoModelForCausalLM.from_config(config).eval()


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference ‖ model) of next-token distributions (nats)."""
    p = reference.log_softmax(-1)
    return float((p.exp() * (p - logits.log_softmax(-1))).sum(-1).mean())


def experts(args) -> dict:
    """Held-out loss (Camelidae) and KL from the unpruned model (tiny random MoEs) against experts kept."""
    from slimformer import load_model
    from slimformer.data import calibration_samples
    from slimformer.evaluation import instruction_loss
    from slimformer.methods import ExpertMergeConfig, ExpertPruneConfig, apply

    methods = {"prune-frequency": lambda k: ExpertPruneConfig(keep=k),
               "prune-output": lambda k: ExpertPruneConfig(keep=k, criterion="output", max_tokens=2048),
               "merge": lambda k: ExpertMergeConfig(keep=k)}
    out: dict = {"name": "experts", "model": "camelidae", "camelidae": {}, "tiny": {}, "sweep_limit": args.sweep_limit}
    folder = Path(args.store).expanduser() / "camelidae"
    if folder.exists():
        loaded = load_model(str(folder))
        samples = calibration_samples(loaded.tokenizer, "alpaca", n=16, seqlen=512, seed=0)
        full = instruction_loss(loaded.model, loaded.tokenizer, limit=args.sweep_limit, progress=False)["loss"]
        out["camelidae"]["8"] = {m: full for m in methods}
        for keep in (6, 4, 2):
            row = {}
            for method, make in methods.items():
                loaded = load_model(str(folder))
                apply(loaded.adapter, make(keep), samples)
                row[method] = instruction_loss(loaded.model, loaded.tokenizer, limit=args.sweep_limit, progress=False)["loss"]
            out["camelidae"][str(keep)] = row
    from slimformer.models import get_adapter

    for family in ("mixtral", "qwen2_moe"):
        ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = tiny_moe(family)(ids).logits
        out["tiny"][family] = {"6": {m: 0.0 for m in methods}}
        for keep in (5, 4, 3, 2):
            row = {}
            for method, make in methods.items():
                model = tiny_moe(family)
                apply(get_adapter(model), make(keep), torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0)))
                with torch.no_grad():
                    row[method] = _kl(reference, model(ids).logits)
            out["tiny"][family][str(keep)] = row
    return out


def one_run(name: str, args) -> dict:
    """One benchmark run in a child process."""
    torch.set_num_threads(2)
    if name == "base":
        from slimformer import load_model

        return {"name": "base", **_score(load_model("smollm2-135m"), args)}
    if name == "speed":
        return speed(args)
    if name == "router-start":
        return router_start()
    if name == "experts":
        return experts(args)
    return tune(name, args)


def _plot(result: dict) -> str | None:
    """A PNG of quality against experts kept; its file name, or None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Camelidae (SmolLM2-135M)", result["camelidae"], "self-instruct loss (nats)")] if result["camelidae"] else []
    panels += [(f"tiny random {f}", d, "KL from 6 experts (nats)") for f, d in result["tiny"].items()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, data, label) in zip(axes if len(panels) > 1 else [axes], panels):
        keeps = sorted(data, key=int)
        for method in data[keeps[0]]:
            ax.plot([int(k) for k in keeps], [data[k][method] for k in keeps], marker="o", label=method)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("experts kept per block")
        ax.set_ylabel(label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes_list = axes if len(panels) > 1 else [axes]
    axes_list[0].legend(fontsize=8)
    fig.tight_layout()
    name = "pesc_experts_smollm2.png"
    fig.savefig(RESULTS / name, dpi=110)
    plt.close(fig)
    return name


def _rows(results: dict[str, dict]) -> list[tuple[str, str]]:
    rows = []
    for name in ("base", *TUNED):
        r = results.get(name)
        if r is None:
            continue
        p = r["params"]
        text = (f"self-instruct loss {r['self_instruct']['loss']:.4f} ({r['self_instruct']['examples']} examples, "
                f"{r['self_instruct']['tokens']:,} response tokens) · params {p['total'] / 1e6:.2f} M, activated "
                f"{p['activated'] / 1e6:.2f} M")
        for task, t in r.get("tasks", {}).items():
            text += f" · {task} {100 * t['acc']:.1f} ({t['examples']})"
        if s := r.get("summary"):
            text += (f" · {s['tokens']:,} training tokens in {s['steps']} steps, {s['tokens_per_s']:.0f} tokens/s, "
                     f"held-out Alpaca loss {s['heldout_before']:.3f} → {s['heldout_after']:.3f} (best step "
                     f"{s['best_step']}) · {r['seconds'] / 60:.1f} min, peak RSS {r['peak_rss_gib']:.2f} GiB")
            if "routing_entropy" in s:
                ent = list(s["routing_entropy"].values())
                text += (f" · routing entropy per block {min(ent):.3f}–{max(ent):.3f} (ln 8 = {math.log(8):.3f}; "
                         f"target ≥ {0.9 * math.log(8):.3f}), balancing loss {s['balancing_loss_first']:.3f} → "
                         f"{s['balancing_loss_last']:.3f}")
        rows.append((name, text))
    if r := results.get("router-start"):
        for init in ("random", "data"):
            ent = r[init]
            below = sum(e < 0.9 * math.log(EXPERTS) for e in ent)
            rows.append((f"router start: {init}", f"routing entropy per block before training {min(ent):.3f}–{max(ent):.3f}"
                                                  f" ({below} of {len(ent)} blocks below 0.9 · ln 8)"))
    if r := results.get("speed"):
        base = r["models"]["base"]
        for name, m in r["models"].items():
            text = (f"512-token forward {1000 * m['prefill_s']:.0f} ms ({m['prefill_s'] / base['prefill_s']:.2f}× base; "
                    f"target ≤ 1.3×) · decode {m['decode_tok_s']:.1f} tokens/s ({m['decode_tok_s'] / base['decode_tok_s']:.2f}×)")
            rows.append((f"speed: {name}", text))
    if r := results.get("experts"):
        model = r.get("model", "camelidae")
        for title, data in [(f"{model} self-instruct loss (first {r.get('sweep_limit')} examples)", r["camelidae"]),
                            *[(f"tiny {f} KL", d) for f, d in r["tiny"].items()]]:
            for keep in sorted(data, key=int, reverse=True):
                rows.append((f"{title}, {keep} experts", " · ".join(f"{m} {v:.4g}" for m, v in data[keep].items())))
        if plot := _plot(r):
            rows.append(("plot", f"![quality against experts kept]({plot})"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated runs: " + ", ".join(RUNS))
    parser.add_argument("--tokens", type=int, default=200_000, help="instruction-tuning budget of every tuned model")
    parser.add_argument("--tasks", action="store_true", help="also PIQA, ARC-Easy and BoolQ")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (default: full sets)")
    parser.add_argument("--repeats", type=int, default=5, help="speed: timed repeats per model")
    parser.add_argument("--si-limit", type=int, default=None, help="self-instruct examples scored (default: all 252)")
    parser.add_argument("--sweep-limit", type=int, default=100,
                        help="self-instruct examples scored per point of the experts sweep")
    parser.add_argument("--store", default="~/.cache/slimformer/pesc-bench")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_run(json.loads(args.child), args)))
        return
    runs = [r for r in RUNS if r in args.only.split(",")] if args.only else RUNS
    path = RESULTS / "pesc_smollm2.json"
    results = {r["name"]: r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    extra = ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--store", args.store,
             "--sweep-limit", str(args.sweep_limit)] + (["--si-limit", str(args.si_limit)] if args.si_limit else [])
    extra += (["--tasks"] if args.tasks else []) + (["--limit", str(args.limit)] if args.limit else [])
    for run in runs:  # written after every run: a long benchmark keeps what it measured
        start = time.perf_counter()
        for r in run_children(__file__, [run], extra):
            results[r["name"]] = {**r, "wall_s": time.perf_counter() - start}
        write_result("pesc_smollm2", {"tokens": args.tokens, "runs": [results[n] for n in RUNS if n in results]},
                     _rows(results))


if __name__ == "__main__":
    main()
