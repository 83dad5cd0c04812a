"""The ``slimformer`` command: a thin layer where every verb maps to one library call."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from slimformer.errors import SlimformerError

# The parser is built from these names alone, so `--help` and argument errors answer before torch,
# transformers or Ray are imported (seconds). Each equals the library's own list; a test checks that.
ALIASES = ("smollm2-135m", "minilm-l6")
DTYPES = ("float32", "bfloat16", "float16")
BOS_MODES = ("auto", "every", "once")
PROPAGATE = ("compressed", "sequential", "dense")
SPACES = ("small", "medium", "layer", "large")
OBJECTIVES = ("error", "params", "flops", "latency")
STRATEGIES = ("random", "local", "nsga2")
BACKENDS = ("local", "ray")
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
SOURCES_HELP = "wikitext2[:test|valid], text:PATH (or PATH.txt), jsonl:PATH[:FIELD] (or PATH.jsonl)"
TASKS_HELP = ("piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande, lambada, or a jsonl file (jsonl:PATH "
              "or PATH.jsonl) in a multiple-choice, partial-scoring or language-modelling layout")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=ALIASES[0],
                   help=f"alias ({', '.join(ALIASES)}), local HF directory, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run")


def _add_bos_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bos", default="auto", choices=BOS_MODES,
                   help="which windows start with the tokenizer's BOS: every one, or once in front of the whole "
                        "text as the papers slice it (auto: once for Llama and OPT, every for the other families)")


def cmd_eval(args: argparse.Namespace) -> int:
    """Measure a model: perplexity on named sources, zero-shot tasks, lm-evaluation-harness tasks."""
    from rich.console import Console
    from rich.table import Table

    from slimformer.data import load_text, tokenize
    from slimformer.data.tasks import load_task
    from slimformer.evaluation import perplexity
    from slimformer.files import write_json
    from slimformer.machine import machine_info
    from slimformer.models import load_model
    from slimformer.records import EvalRecord

    tasks = [t for t in (args.tasks or "").split(",") if t]
    harness = [t for t in (args.lm_eval or "").split(",") if t]
    sources = args.ppl or ([] if tasks or harness else ["wikitext2"])
    texts = {s: load_text(s) for s in sources}  # read data before the slow model load fails late
    for task in tasks:
        load_task(task, limit=1)  # an unknown task or a broken file fails before loading too
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    if loaded.adapter.family.kind != "decoder":
        raise SlimformerError(f"these measures need a decoder; '{args.model}' is a {loaded.adapter.family.name} "
                              "encoder (see `slimformer search --task glue:…` for GLUE)")
    results = {}
    for source, text in texts.items():
        ids = tokenize(loaded.tokenizer, text)
        results[source] = perplexity(loaded.model, ids, seqlen=args.seqlen, windows=args.windows,
                                     batch_size=args.batch_size, bos=loaded.window_bos(args.bos)).to_dict()
    console = Console()
    if results:
        table = Table(title=f"slimformer eval — {args.model}")
        for col in ("source", "perplexity", "windows × seqlen", "tokens/s", "seconds"):
            table.add_column(col, justify="left" if col == "source" else "right")
        for source, r in results.items():
            table.add_row(source, f"{r['perplexity']:.3f}", f"{r['windows']} × {r['seqlen']}",
                          f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.1f}")
        console.print(table)
    zero_shot = {}
    if tasks:
        from slimformer.evaluation import evaluate_task

        zero_shot = {t: evaluate_task(loaded.model, loaded.tokenizer, t, limit=args.limit) for t in tasks}
        table = Table(title="zero-shot tasks")
        for col in ("task", "layout", "acc", "acc_norm", "perplexity", "examples", "examples/s"):
            table.add_column(col, justify="left" if col in ("task", "layout") else "right")
        for t, r in zero_shot.items():
            optional = [f"{r[k]:.4f}" if k in r else "" for k in ("acc_norm", "perplexity")]
            table.add_row(t, r["layout"], f"{r['acc']:.4f}", *optional, str(r["examples"]), f"{r['examples_per_s']:.1f}")
        console.print(table)
    lm_eval = None
    if harness:
        from slimformer.evaluation import run_lm_eval

        lm_eval = run_lm_eval(loaded.model, loaded.tokenizer, harness, limit=args.limit,
                              include_path=args.lm_eval_include)
        for task, metrics in lm_eval["results"].items():
            console.print(f"lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                         if isinstance(v, float)))
    record = EvalRecord(model=args.model, source=loaded.source, dtype=args.dtype, perplexity=results, tasks=zero_shot,
                        lm_eval=lm_eval, machine=machine_info())
    write_json(args.out, record.to_dict())
    print(f"results written to {args.out}")
    return 0


def _method_config(args: argparse.Namespace):
    """The method config of ``prune`` from its flags; invalid values fail here, before any loading."""
    from slimformer.methods import MagnitudeConfig, SparseGPTConfig, WandaConfig

    common = dict(sparsity=args.sparsity, pattern=args.pattern, targets=tuple(args.targets), ignore=tuple(args.ignore))
    if args.method == "magnitude":
        return MagnitudeConfig(**common, scope=args.scope, rounds=args.rounds, finetune_steps=args.round_steps)
    calibrated = dict(common, propagate=args.propagate, batch_size=args.batch_size, device=args.device)
    if args.method == "wanda":
        return WandaConfig(**calibrated)
    return SparseGPTConfig(**calibrated, blocksize=args.blocksize, percdamp=args.percdamp)


def _split_name(name: str) -> tuple[str, str]:
    """(block index, projection) of a module name such as ``model.layers.3.self_attn.q_proj``."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return (parts[index], parts[-1]) if index is not None else (name, "weight")


def _sparsity_table(layers: dict):
    """Blocks as rows, projections as columns, sparsity in percent."""
    from rich.table import Table

    cells: dict[str, dict[str, float]] = {}
    for name, info in layers.items():
        block, module = _split_name(name)
        cells.setdefault(block, {})[module] = info["sparsity"]
    columns = list(dict.fromkeys(c for row in cells.values() for c in row))
    table = Table(title="sparsity per layer (%)")
    table.add_column("block")
    for c in columns:
        table.add_column(c, justify="right")
    for block, row in cells.items():
        table.add_row(block, *(f"{100 * row[c]:.1f}" if c in row else "" for c in columns))
    return table


def _one_step_recipe(args: argparse.Namespace, *steps, speed: bool):
    """The recipe a compressing verb runs: its method (and recovery) on the flags' calibration and measurement."""
    from slimformer.recipes import Calibration, Measure, Recipe

    return Recipe(steps=steps, model=args.model, seed=args.seed, bos=args.bos,
                  calibration=Calibration(args.calib, args.nsamples, args.seqlen),
                  measure=Measure(ppl_windows=args.ppl_windows, speed=speed))


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune weights (magnitude, Wanda, SparseGPT), optionally fine-tune, and save the model."""
    from rich.console import Console

    from slimformer.methods import FinetuneConfig
    from slimformer.recipes import run_recipe

    finetune = (FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, seqlen=args.finetune_seqlen,
                               device=args.device),) if args.finetune_steps else ()
    recipe = _one_step_recipe(args, _method_config(args), *finetune, speed=False)
    summary = run_recipe(recipe, args.out, overwrite=args.overwrite, dtype=args.dtype, sparse_out=args.sparse_out)
    result = summary["steps"][0]["result"]
    console = Console()
    console.print(_sparsity_table(result["layers"]))
    console.print(f"{result['method']}: sparsity {100 * result['summary']['sparsity']:.1f}% of "
                  f"{result['summary']['pruned_modules']} projections in {result['seconds']:.1f} s, "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    _print_outcome(console, summary, args)
    return 0


def _print_outcome(console, summary: dict, args: argparse.Namespace) -> None:
    """Perplexities before and after each step, sizes, and where the model and its report are."""
    if args.ppl_windows:
        on = f"{args.ppl_windows} windows of WikiText-2 test"
        console.print(f"perplexity before: {summary['before']['ppl']:.3f} ({on})")
        for step in summary["steps"]:
            console.print(f"perplexity after {step['result']['method']}: {step['after']['ppl']:.3f} ({on})")
    for kind, size in summary["steps"][-1]["after"]["size_bytes"].items():
        console.print(f"{kind} model: {size / 2**20:.1f} MiB")
    for out in (args.out, summary.get("sparse_out")):
        if out:
            print(f"saved {out}")  # paths unwrapped, whatever the terminal's width
    print(f"report: {summary['report_html']}")


def cmd_remove_blocks(args: argparse.Namespace) -> int:
    """Remove whole blocks (SLEB, its one-shot variant, or block influence) and save the shallower model."""
    from rich.console import Console

    from slimformer.methods import SLEBConfig
    from slimformer.recipes import run_recipe

    config = SLEBConfig(blocks=args.blocks, ratio=args.ratio, criterion=args.method.replace("sleb", "iterative"),
                        protect=tuple(args.protect), batch_size=args.batch_size, device=args.device)
    summary = run_recipe(_one_step_recipe(args, config, speed=True), args.out, overwrite=args.overwrite,
                         dtype=args.dtype)
    result = summary["steps"][0]["result"]
    found = result["summary"]
    console = Console()
    console.print(f"removed blocks {found['removed']} (in the order chosen) in {result['seconds']:.1f} s: "
                  f"{found['blocks_before']} → {found['blocks_after']} blocks, peak RSS {result['peak_rss_gib']:.2f} GiB")
    _print_outcome(console, summary, args)
    return 0


def _add_remove_blocks_parser(sub) -> None:
    p = sub.add_parser("remove-blocks", help=cmd_remove_blocks.__doc__)
    _add_model_args(p)
    p.add_argument("--method", default="sleb", choices=["sleb", "oneshot", "influence"],
                   help="sleb: greedy, loss-verified rounds; oneshot: one scoring round; influence: ShortGPT")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--blocks", type=int, help="number of blocks to remove")
    count.add_argument("--ratio", type=float, help="fraction of the blocks to remove, in (0, 1)")
    _add_bos_arg(p)
    p.add_argument("--protect", type=int, nargs="*", default=[0, -1], help="blocks never removed (default: first, last)")
    p.add_argument("--calib", default="wikitext2:valid", help=f"calibration source: {SOURCES_HELP}")
    p.add_argument("--nsamples", type=int, default=1, help="SLEB's search cost grows with the sample count")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--ppl-windows", type=int, default=0, help="measure WikiText-2 perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the shallower model (stock transformers loads it)")
    p.add_argument("--overwrite", action="store_true")


def cmd_search(args: argparse.Namespace) -> int:
    """Structural pruning by multi-objective search: the Pareto set of sub-networks (heads, units, blocks)."""
    from slimformer.search import runs

    config = _search_config(args)  # bad spaces, strategies, objectives fail before any loading
    summary = runs.run_search_job(args.model, args.task, config, args.out, seed=args.seed, nsamples=args.nsamples,
                                  seqlen=args.seqlen, dtype=args.dtype, device=args.device, progress=True)
    _print_search(summary)
    from slimformer.report import build_report

    print(f"report: {build_report(args.out)[1]}")
    return 0


def cmd_glue(args: argparse.Namespace) -> int:
    """Fine-tune an encoder on one GLUE task and print the task's metrics on its dev set(s)."""
    from rich.console import Console
    from rich.table import Table

    from slimformer.data.glue import glue_task, load_glue
    from slimformer.evaluation import run_glue
    from slimformer.files import write_json
    from slimformer.machine import machine_info
    from slimformer.models import load_model, save_model

    info = glue_task(args.task)
    for split in ("train", *info.dev_splits):
        load_glue(info, split)  # missing or malformed data fails before the model loads
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise SlimformerError(f"output '{args.out}' exists; choose another path or pass --overwrite")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    if loaded.adapter.family.kind != "encoder":
        raise SlimformerError(f"GLUE fine-tuning needs an encoder (bert, roberta); '{args.model}' is a "
                              f"{loaded.adapter.family.name} decoder")
    classifier, result = run_glue(loaded, loaded.tokenizer, info, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, max_length=args.max_length,
                                  train_limit=args.train_limit, seed=args.seed)
    table = Table(title=f"GLUE {info.name} — {args.model}, {result['train_examples']} training examples, "
                        f"{args.epochs} epoch(s)")
    for col in ("dev split", *info.metrics, "examples"):
        table.add_column(col, justify="left" if col == "dev split" else "right")
    for split, m in result["metrics"].items():
        table.add_row(split, *(f"{m[k]:.4f}" for k in info.metrics), str(m["examples"]))
    console = Console()
    console.print(table)
    for split, m in result["metrics"].items():  # one plain line per split, whatever the terminal's width
        console.print(f"{info.name} {split}: " + ", ".join(f"{k} {m[k]:.4f}" for k in info.metrics)
                      + f" ({m['examples']} examples; trained on {result['train_examples']} training examples)")
    if args.out:
        save_model(classifier, loaded.tokenizer, args.out, overwrite=args.overwrite)
        write_json(Path(args.out) / "glue.json", {"model": args.model, **result, "machine": machine_info()})
        print(f"saved {args.out}")
    return 0


def _add_glue_parser(sub) -> None:
    p = sub.add_parser("glue", help=cmd_glue.__doc__)
    _add_model_args(p)
    p.add_argument("--task", required=True, help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded sample of N training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the fine-tuned classifier and glue.json")
    p.add_argument("--overwrite", action="store_true")


def _search_config(args: argparse.Namespace):
    """The search config of the CLI's flags."""
    from slimformer.search.structural import SearchConfig

    return SearchConfig(space=args.space, objectives=tuple(args.objectives.split(",")), strategy=args.strategy,
                        trials=args.trials, seed=args.seed, backend=args.backend, population=args.population,
                        epochs=args.epochs, supernet=not args.no_supernet, supernet_init=args.supernet_init,
                        random_subnets=args.random_subnets, distill=args.distill, sampling=args.sampling,
                        train_limit=args.train_limit, max_length=args.max_length)


def _print_search(summary: dict) -> None:
    """The Pareto set as a table."""
    from rich.console import Console
    from rich.table import Table

    from slimformer.data.glue import glue_task

    objectives = summary["objectives"]
    table = Table(title=f"Pareto set — {summary['model']} on {summary['task']} "
                        f"({len(summary['trials'])} trials, hypervolume {summary['hypervolume']:.4f})")
    table.add_column("trial", justify="right")
    for name in objectives:
        table.add_column(name, justify="right")
    dev = {p["number"]: p for p in summary.get("dev_front", [])}
    if dev:
        table.add_column(f"dev {glue_task(summary['task']).metrics[0]}", justify="right")
    for i in summary["pareto"]:
        t = summary["trials"][i]
        row = [str(t["number"]), *(f"{v:.4f}" for v in t["values"])]
        if dev:
            row.append(f"{dev[t['number']]['dev']['score']:.4f}" if t["number"] in dev else "")
        table.add_row(*row)
    Console().print(table)


def cmd_extract(args: argparse.Namespace) -> int:
    """Cut one searched sub-network out as a smaller model (stock transformers loads uniform shapes)."""
    from slimformer.search import runs

    path = runs.extract_trial(args.run, args.trial, args.out, overwrite=args.overwrite)
    print(f"saved {path}")
    return 0


def _add_search_parsers(sub) -> None:
    p = sub.add_parser("search", help=cmd_search.__doc__)
    _add_model_args(p)
    p.add_argument("--space", default="small", help=f"search space: {', '.join(SPACES)}")
    p.add_argument("--objectives", default="error,params", help=f"comma-separated, from {', '.join(OBJECTIVES)}")
    p.add_argument("--strategy", default="nsga2", help=f"{', '.join(STRATEGIES)}")
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--population", type=int, default=None, help="nsga2: individuals per generation")
    p.add_argument("--task", default=None,
                   help="encoders: glue:TASK, any GLUE task (two-stage search); decoders: a calibration source "
                        f"({SOURCES_HELP}; default wikitext2:valid)")
    p.add_argument("--backend", default="local", help=f"where candidates are evaluated: {', '.join(BACKENDS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=8, help="decoders: calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="decoders: calibration window length")
    p.add_argument("--epochs", type=int, default=3, help="encoders: fine-tuning epochs (reference and super-network)")
    p.add_argument("--no-supernet", action="store_true", help="encoders: search the standard fine-tuned weights")
    p.add_argument("--supernet-init", default="reference", choices=["reference", "pretrained"],
                   help="encoders: start the super-network from the fine-tuned reference or the pre-trained weights")
    p.add_argument("--random-subnets", type=int, default=2, help="sandwich rule: random sub-networks per step")
    p.add_argument("--distill", default="inplace", choices=["inplace", "reference", "none"],
                   help="encoders: what the smaller sub-networks learn from (the largest one's predictions, "
                        "the fine-tuned reference's, or the labels)")
    p.add_argument("--sampling", default="sized", choices=["sized", "uniform"],
                   help="encoders: how the super-network's random sub-networks are drawn (a size first, or "
                        "each head and unit count uniformly)")
    p.add_argument("--train-limit", type=int, default=None, help="encoders: train on a seeded sample of N training examples")
    p.add_argument("--max-length", type=int, default=128, help="encoders: tokens per example (longer ones are truncated)")
    p.add_argument("--out", required=True, help="run folder (running again resumes the search)")
    p = sub.add_parser("extract", help=cmd_extract.__doc__)
    p.add_argument("run", help="folder of a finished search")
    p.add_argument("--trial", type=int, required=True, help="trial number (see search.json)")
    p.add_argument("--out", required=True, help="folder for the smaller model")
    p.add_argument("--overwrite", action="store_true")


def _before_after_table(rows: list[dict], title: str):
    """The report's before/after rows as a table (the same figures report.html shows)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("figure", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "figure" else "right")
    for r in rows:
        table.add_row(r["metric"], _fmt(r.get("before"), r["key"]), _fmt(r.get("after"), r["key"]),
                      f"{r['change']:.3f}×" if r.get("change") is not None else "")
    return table


def _fmt(value, key: str) -> str:
    if value is None:
        return ""
    if key == "size_bytes":
        return f"{value / 2**20:.1f} MiB"
    if key in ("params", "nonzero_params", "flops_per_token"):
        return f"{value / 1e6:.1f} M"
    if key == "sparsity":
        return f"{100 * value:.1f}%"
    if key == "blocks":
        return f"{value:.0f}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def cmd_run(args: argparse.Namespace) -> int:
    """Run a recipe (a YAML list of steps) end to end: the compressed model, its figures and report."""
    from rich.console import Console

    from slimformer.recipes import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)  # an invalid recipe fails here, before any work
    summary = run_recipe(recipe, args.out, model=args.model, overwrite=args.overwrite)
    console = Console()
    console.print(_before_after_table(summary["before_after"], f"{args.model or recipe.model}: before → after"))
    console.print(f"model: {args.out}\nreport: {summary['report_html']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild report.json and report.html of a run folder."""
    from slimformer.report import build_report

    json_path, html_path = build_report(args.run)
    print(f"report: {html_path}\nfigures: {json_path}")
    return 0


def _add_run_parsers(sub) -> None:
    p = sub.add_parser("run", help=cmd_run.__doc__)
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--model", default=None, help="use this model instead of the recipe's")
    p.add_argument("--out", required=True, help="output folder (written when the recipe finishes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p = sub.add_parser("report", help=cmd_report.__doc__)
    p.add_argument("run", help="run folder")


COMMANDS = {"eval": cmd_eval, "run": cmd_run, "report": cmd_report, "prune": cmd_prune, "remove-blocks": cmd_remove_blocks,
            "search": cmd_search, "extract": cmd_extract, "glue": cmd_glue}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="slimformer", description="Make Transformer models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help=cmd_eval.__doc__)
    _add_model_args(p)
    p.add_argument("--ppl", action="append", metavar="SOURCE", help=f"perplexity source: {SOURCES_HELP}")
    p.add_argument("--windows", type=int, default=None, help="only the first N windows (default: all)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--tasks", default=None, help=f"zero-shot tasks, comma-separated: {TASKS_HELP}")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--lm-eval", default=None, help="lm-evaluation-harness task names, comma-separated")
    p.add_argument("--lm-eval-include", default=None, help="folder of extra lm-eval task YAMLs (local data)")
    p.add_argument("--out", default="eval.json", help="where to write the JSON results")
    _add_bos_arg(p)
    _add_prune_parser(sub)
    _add_remove_blocks_parser(sub)
    _add_search_parsers(sub)
    _add_run_parsers(sub)
    _add_glue_parser(sub)
    assert set(sub.choices) == set(COMMANDS), "every verb needs a handler and a parser"
    return parser


def _add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help=cmd_prune.__doc__)
    _add_model_args(p)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    _add_bos_arg(p)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of weights to zero, in [0, 1)")
    p.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (sets the sparsity)")
    p.add_argument("--targets", nargs="*", default=[], help="module names, suffixes or re:REGEX (default: block projections)")
    p.add_argument("--ignore", nargs="*", default=[], help="modules to leave dense, same rules")
    p.add_argument("--calib", default="wikitext2:valid", help=f"calibration source: {SOURCES_HELP}")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="calibration samples per block call")
    p.add_argument("--propagate", default="sequential", choices=PROPAGATE,
                   help="how pruned outputs feed the next block (see slimformer.calibration)")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="magnitude: threshold per matrix or global")
    p.add_argument("--rounds", type=int, default=1, help="magnitude: iterative rounds up to the target")
    p.add_argument("--round-steps", type=int, default=0, help="magnitude: fine-tune steps after each round")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt: column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="sparsegpt: dampening, fraction of mean diag(H)")
    p.add_argument("--finetune-steps", type=int, default=0, help="masked fine-tuning steps after pruning")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-seqlen", type=int, default=512, help="crop samples to this length for fine-tuning")
    p.add_argument("--ppl-windows", type=int, default=0, help="measure WikiText-2 perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the pruned model (stock transformers loads it)")
    p.add_argument("--sparse-out", default=None, help="folder for a sparse-bitmask copy (smaller on disk)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run one verb, turn a SlimformerError into one line and exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # loading takes a second; our own bars show the long work
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except SlimformerError as e:
        print(f"slimformer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
