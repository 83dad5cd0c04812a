"""The verbs that load, compress, measure and report: each turns its flags into one library call."""

from __future__ import annotations

import argparse
from pathlib import Path

from slimformer.errors import SlimformerError


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


def _one_step_recipe(args: argparse.Namespace, *steps, speed: bool, calib: bool = True, calibration=None):
    """The recipe a compressing verb runs: its method (and recovery) on the flags' calibration and measurement.

    ``calibration`` replaces the one the flags describe (for a verb whose ``--seqlen`` means something else).
    """
    from slimformer.recipes import Calibration, Measure, Recipe

    if calibration is None:
        calibration = Calibration(args.calib, args.nsamples, args.seqlen) if calib else Calibration()
    return Recipe(steps=steps, model=args.model, seed=args.seed, bos=args.bos, calibration=calibration,
                  measure=Measure(ppl_windows=args.ppl_windows, speed=speed))


def cmd_prune(args: argparse.Namespace) -> int:
    """Prune weights (magnitude, Wanda, SparseGPT), optionally fine-tune, and save the model."""
    from rich.console import Console

    from slimformer.methods import FinetuneConfig

    finetune = (FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, seqlen=args.finetune_seqlen,
                               data=args.finetune_data, device=args.device),) if args.finetune_steps else ()
    recipe = _one_step_recipe(args, _method_config(args), *finetune, speed=False)
    summary = _run(args, recipe, sparse_out=args.sparse_out)
    result = summary["steps"][0]["result"]
    console = Console()
    console.print(_sparsity_table(result["layers"]))
    console.print(f"{result['method']}: sparsity {100 * result['summary']['sparsity']:.1f}% of "
                  f"{result['summary']['pruned_modules']} projections in {result['seconds']:.1f} s, "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    _print_outcome(console, summary, args)
    return 0


def _run(args: argparse.Namespace, recipe, sparse_out=None) -> dict:
    """Run a verb's recipe: in memory, or streamed from disk block by block under ``--max-memory``."""
    from slimformer.recipes import run_recipe, run_streamed

    if getattr(args, "max_memory", None):
        from slimformer.methods.memory import parse_size

        return run_streamed(recipe, args.out, max_memory=parse_size(args.max_memory), overwrite=args.overwrite,
                            dtype=args.dtype, out_dtype=args.out_dtype, activations=args.activations,
                            sparse_out=sparse_out)
    return run_recipe(recipe, args.out, overwrite=args.overwrite, dtype=args.dtype, sparse_out=sparse_out)


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
    if summary.get("streamed"):
        step = summary["steps"][-1]
        print(f"streamed within --max-memory: estimated peak {step['estimate_bytes']['total'] / 2**30:.2f} GiB, "
              f"measured {step['result']['peak_rss_gib']:.2f} GiB; figures: {args.out}/run.json")
    else:
        print(f"report: {summary['report_html']}")


def _quant_config(args: argparse.Namespace):
    """The method config of ``quantize`` from its flags; invalid values fail here, before any loading."""
    from slimformer.methods import AWQConfig, GPTQConfig, RTNConfig

    common = dict(bits=args.bits, group_size=args.group_size, symmetric=not args.asymmetric, mse=args.mse,
                  targets=tuple(args.targets), ignore=tuple(args.ignore), head=args.head, embedding=args.embedding,
                  head_bits=args.head_bits)
    if args.method == "rtn":
        return RTNConfig(**common)
    calibrated = dict(common, batch_size=args.batch_size, device=args.device, blocksize=args.blocksize,
                      percdamp=args.percdamp, **({"propagate": args.propagate} if args.propagate else {}))
    if args.method == "gptq":
        return GPTQConfig(**calibrated, act_order=args.act_order, static_groups=args.static_groups)
    return AWQConfig(**calibrated, then=args.then)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize weights (RTN, GPTQ, AWQ; int8 or int4) and save a compressed-tensors checkpoint."""
    config = _quant_config(args)
    summary, result, found, console = _run_one_step(args, config)
    console.print(f"{result['method']}: {found['quantized_modules']} modules to {found['scheme']} "
                  f"(mean {found['mean_bits']:.2f} bits per quantized weight) in {result['seconds']:.1f} s, "
                  f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    _print_outcome(console, summary, args)
    return 0


def _run_one_step(args: argparse.Namespace, config, *more, calib: bool = True, calibration=None):
    """Run ``config`` (and ``more`` steps) as a recipe into ``args.out``: (summary, first step's result, its summary, console)."""
    from rich.console import Console

    summary = _run(args, _one_step_recipe(args, config, *more, speed=False, calib=calib, calibration=calibration))
    result = summary["steps"][0]["result"]
    return summary, result, result["summary"], Console()


def _recover_config(args: argparse.Namespace):
    """The recovery config of ``recover`` from its flags; invalid values fail here, before any loading."""
    from slimformer.methods import DistillConfig, FinetuneConfig, LoRAConfig

    if args.method in ("kd", "kd+lora") and not args.teacher:
        raise SlimformerError(f"--method {args.method} distils from a teacher: give --teacher (the model before "
                              "compression)")
    common = dict(data=args.data, tokens=args.tokens, seqlen=args.seqlen, batch_size=args.batch_size,
                  heldout=args.heldout, eval_every=args.eval_every, patience=args.patience,
                  checkpointing=args.checkpointing, seed=args.seed, device=args.device, teacher=args.teacher,
                  loss=args.loss, temperature=args.temperature, top_k=args.top_k, hidden_weight=args.hidden_weight,
                  cache=args.cache, regrid=not args.no_regrid, **({"lr": args.lr} if args.lr else {}))
    lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=tuple(args.lora_targets),
                masked_merge=not args.unmasked_merge)
    if args.method == "ce":
        return FinetuneConfig(**common, **({"ce_weight": args.ce_weight} if args.ce_weight is not None else {}))
    kd = dict(kd_weight=1.0, ce_weight=args.ce_weight or 0.0)
    if args.method == "kd":
        return DistillConfig(**common, **kd)
    if args.method == "lora":
        return LoRAConfig(**common, **lora, **({"ce_weight": args.ce_weight} if args.ce_weight is not None else {}))
    return LoRAConfig(**common, **lora, **kd)


def cmd_recover(args: argparse.Namespace) -> int:
    """Win back quality after compression: fine-tuning, distillation from the original model, LoRA, or both."""
    from slimformer.data import load_text

    config = _recover_config(args)
    load_text(config.data)  # a missing training text fails before any model loads
    summary, result, found, console = _run_one_step(args, config, calib=False)
    console.print(f"{result['method']}: {found['steps']} of {found['planned_steps']} steps, {found['tokens']:,} tokens "
                  f"at {found['tokens_per_s']:.0f} tokens/s; held-out loss {found['heldout_before']:.3f} → "
                  f"{found['heldout_after']:.3f} (best step {found['best_step']}) in {result['seconds']:.0f} s")
    if "teacher_cache_bytes" in found:
        console.print(f"teacher cache: {found['teacher_cache_bytes'] / 2**20:.1f} MiB "
                      f"({found['teacher_cache_bytes_per_token']:.0f} bytes/token), {found['teacher_cache_seconds']:.0f} s")
    _print_outcome(console, summary, args)
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    """Upcycle a dense decoder into a mixture of adapter experts (PESC), optionally instruction-tune it, and save it."""
    from slimformer.data import instruction_examples
    from slimformer.methods import InstructConfig, UpcycleConfig
    from slimformer.models.moe import export_remote_code

    config = UpcycleConfig(layout=args.layout, experts=args.experts, top_k=args.top_k, adapter_dim=args.adapter_dim,
                           layers=args.layers, aux_loss=args.aux_loss, z_loss=args.z_loss, seed=args.seed,
                           router_init=args.router_init, device=args.device)
    tune = (InstructConfig(data=args.data, tokens=args.instruct_tokens, lora_rank=args.lora_rank, lr=args.lr,
                           seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed, device=args.device),) \
        if args.instruct_tokens else ()
    if tune:
        instruction_examples(args.data)  # missing instruction data fails before any model loads
    from slimformer.recipes import Calibration

    calibration = Calibration(args.calib, args.nsamples, args.calib_seqlen)  # read only by the data-aware router start
    summary, result, found, console = _run_one_step(args, config, *tune, calibration=calibration)
    console.print(f"pesc ({found['layout']}): {found['upcycled_blocks']} blocks × {found['experts']} experts "
                  f"(top-{found['top_k']}, width {found['adapter_dim']}): {found['params']:,} parameters, "
                  f"{found['activated_params']:,} activated per token (dense {found['dense_params']:,})")
    if tune:
        t = summary["steps"][1]["result"]["summary"]
        console.print(f"instruct: {t['steps']} steps, {t['tokens']:,} tokens at {t['tokens_per_s']:.0f} tokens/s; "
                      f"held-out response loss {t['heldout_before']:.3f} → {t['heldout_after']:.3f}")
    if args.export_remote_code and args.layout == "pesc":  # a Qwen2-MoE model needs no code of its own
        export_remote_code(args.out)
    _print_outcome(console, summary, args)
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    """Prune or merge the experts of a mixture-of-experts model, calibrated block by block, and save it."""
    from slimformer.methods import ExpertMergeConfig, ExpertPruneConfig

    count = {"keep": args.keep, "ratio": args.ratio}
    config = ExpertMergeConfig(**count) if args.method == "merge" else ExpertPruneConfig(**count, criterion=args.criterion)
    summary, result, found, console = _run_one_step(args, config)
    console.print(f"{result['method']}: {found['experts_before']} → {found['experts_after']} experts in "
                  f"{found['moe_blocks']} MoE blocks; parameters {found['params_before']:,} → {found['params_after']:,} "
                  f"in {result['seconds']:.1f} s")
    _print_outcome(console, summary, args)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a model for a serving runtime: GGUF (llama.cpp) or compressed-tensors (vLLM); --check runs it there."""
    from rich.console import Console

    from slimformer.models import load_model, save_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:  # before the model loads: a refused run costs nothing
        raise SlimformerError(f"output '{out}' exists; choose another path or pass --overwrite")
    if args.format == "gguf" and out.suffix != ".gguf":
        raise SlimformerError(f"a GGUF output is one file ending in .gguf, not '{out}'")
    console = Console()
    loaded = load_model(args.model, dtype="float32", device="cpu", trust_remote_code=args.trust_remote_code)
    if args.format == "compressed-tensors":
        from slimformer.export import decompress_with_compressed_tensors
        from slimformer.models.quantized import quantized_modules

        modules = quantized_modules(loaded.model)
        if not modules:
            raise SlimformerError("compressed-tensors export is for quantized models; this one has no quantized "
                                  "layers (quantize it first, or save it as it is: it is already a plain checkpoint)")
        save_model(loaded.model, loaded.tokenizer, out, overwrite=args.overwrite)
        console.print(f"wrote {out} (compressed-tensors, {len(modules)} quantized layers)")
        if args.check:
            state = decompress_with_compressed_tensors(out)
            worst = max((state[f"{n}.weight"].float() - m.dequantized()).abs().max().item() for n, m in modules.items())
            console.print(f"ModelCompressor decompressed {len(modules)} layers; largest difference from slimformer's "
                          f"weights {worst:.3g}")
            if worst:
                raise SlimformerError("compressed-tensors decompressed different weights than slimformer wrote")
        return 0
    from slimformer.export import export_gguf

    written = export_gguf(loaded, out, args.type, overwrite=args.overwrite)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(written["tensors"].items()))
    console.print(f"wrote {out} ({written['architecture']}, {written['bytes'] / 2**20:.1f} MiB): {kinds}; "
                  f"{written['quantized_kept']} slimformer-quantized weights kept exactly, "
                  f"{written['quantized_requantized']} rounded again")
    if args.check:
        _check_gguf(loaded, out, console)
    return 0
def _check_gguf(loaded, path, console) -> None:
    """Greedy continuations of one prompt by llama.cpp (the file) and transformers (the model), side by side."""
    import torch

    from slimformer.export.llamacpp import LlamaCpp

    prompt = "The capital of France is"
    ids = loaded.tokenizer(prompt)["input_ids"]
    tokens, speed = LlamaCpp(path, n_ctx=256).generate(ids, 16)
    with torch.no_grad():
        ref = loaded.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
    console.print(f"llama.cpp:    {prompt}[bold]{loaded.tokenizer.decode(tokens)}[/] ({speed:.1f} tokens/s)")
    console.print(f"transformers: {prompt}[bold]{loaded.tokenizer.decode(ref)}[/]")
    console.print(f"first {same} of {len(ref)} greedy tokens agree")


def cmd_remove_blocks(args: argparse.Namespace) -> int:
    """Remove whole blocks (SLEB, its one-shot variant, or block influence) and save the shallower model."""
    from rich.console import Console

    from slimformer.methods import SLEBConfig

    config = SLEBConfig(blocks=args.blocks, ratio=args.ratio, criterion=args.method.replace("sleb", "iterative"),
                        protect=tuple(args.protect), batch_size=args.batch_size, device=args.device)
    summary = _run(args, _one_step_recipe(args, config, speed=not args.max_memory))
    result = summary["steps"][0]["result"]
    found = result["summary"]
    console = Console()
    console.print(f"removed blocks {found['removed']} (in the order chosen) in {result['seconds']:.1f} s: "
                  f"{found['blocks_before']} → {found['blocks_after']} blocks, peak RSS {result['peak_rss_gib']:.2f} GiB")
    _print_outcome(console, summary, args)
    return 0


def cmd_glue(args: argparse.Namespace) -> int:
    """Fine-tune an encoder on one GLUE task and print the task's metrics on its dev set(s)."""
    from rich.console import Console
    from rich.table import Table

    from slimformer.data.glue import glue_task
    from slimformer.evaluation.glue import glue_data, run_glue
    from slimformer.files import write_json
    from slimformer.machine import machine_info
    from slimformer.models import load_model, save_model

    info = glue_task(args.task)
    data = glue_data(info)  # missing or malformed data fails before the model loads
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise SlimformerError(f"output '{args.out}' exists; choose another path or pass --overwrite")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    if loaded.adapter.family.kind != "encoder":
        raise SlimformerError(f"GLUE fine-tuning needs an encoder (bert, roberta); '{args.model}' is a "
                              f"{loaded.adapter.family.name} decoder")
    classifier, result = run_glue(loaded, loaded.tokenizer, info, epochs=args.epochs, lr=args.lr,
                                  batch_size=args.batch_size, max_length=args.max_length,
                                  train_limit=args.train_limit, seed=args.seed, data=data)
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


def _generations_table(generations: list[dict]):
    """Greedy continuations of the same prompts by each model, one row per prompt."""
    from rich.table import Table

    table = Table(title="greedy generations, side by side", show_lines=True)
    names = [k for k in generations[0] if k != "prompt"]
    for col in ("prompt", *names):
        table.add_column(col, overflow="fold", ratio=1)
    for g in generations:
        table.add_row(g["prompt"], *(g.get(n, "") for n in names))
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
    if args.max_memory:
        from slimformer.methods.memory import parse_size
        from slimformer.recipes import run_streamed

        run_streamed(recipe, args.out, max_memory=parse_size(args.max_memory), model=args.model,
                     overwrite=args.overwrite, out_dtype=args.out_dtype, activations=args.activations)
        print(f"model: {args.out} (streamed; figures in {args.out}/run.json)")
        return 0
    summary = run_recipe(recipe, args.out, model=args.model, overwrite=args.overwrite)
    console = Console()
    console.print(_before_after_table(summary["before_after"], f"{args.model or recipe.model}: before → after"))
    if summary.get("generations"):
        console.print(_generations_table(summary["generations"]))
    console.print(f"model: {args.out}\nreport: {summary['report_html']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild report.json and report.html of a run folder."""
    from slimformer.report import build_report

    json_path, html_path = build_report(args.run)
    print(f"report: {html_path}\nfigures: {json_path}")
    return 0


def _seconds(text: str) -> float:
    """Seconds of a duration such as ``90s``, ``30m``, ``2h`` or ``1800``."""
    raw = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(raw[-1:], None)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise SlimformerError(f"cannot read the duration '{text}': give seconds or a number with s, m or h (30m)")
    return value


def cmd_auto(args: argparse.Namespace) -> int:
    """Search every method family for the best model under a size, speed or perplexity target, and write it."""
    from rich.console import Console

    from slimformer.auto import AutoConfig, AutoSpace, Target, auto, describe_point
    from slimformer.recipes import Calibration

    target = Target.parse(args.target)  # bad input fails here, before any loading
    budget = _seconds(args.budget)
    if args.trials < 1:
        raise SlimformerError(f"--trials must be at least 1, not {args.trials}")
    if args.check_front < 0:
        raise SlimformerError(f"--check-front must be 0 or more, not {args.check_front}")
    if not 0 <= args.max_block_ratio < 1:
        raise SlimformerError(f"--max-block-ratio must be in [0, 1), not {args.max_block_ratio}")
    space = AutoSpace(max_block_ratio=args.max_block_ratio, recovery=(False,) if args.no_recovery else (False, True))
    config = AutoConfig(target=target, space=space, trials=args.trials, budget_s=budget, strategy=args.strategy,
                        seed=args.seed, calibration=Calibration(nsamples=args.nsamples, seqlen=args.seqlen),
                        recovery_tokens=args.recovery_tokens, check_front=args.check_front)
    record = auto(args.model, target, args.out, config=config, overwrite=args.overwrite)
    chosen = record["chosen"]
    console = Console()
    console.print(f"{len(record['trials'])} candidates in {record['search_seconds'] / 60:.1f} min, "
                  f"{len(record['pareto'])} on the front; chosen for {record['target_text']}: {chosen['describe']}")
    console.print(f"predicted: {describe_point(chosen['predicted'])}")
    for check in record["speed_checks"]:
        console.print(f"decode check: {check['measured_speed']:.2f}× measured, {check['predicted_speed']:.2f}× "
                      f"predicted — {check['describe']}{' (chosen)' if check['chosen'] else ''}")
    if chosen["measured"]:
        console.print(f"measured:  {describe_point(chosen['measured'])} "
                      f"({'meets' if chosen['meets_target_measured'] else 'MISSES'} the target)")
    console.print(f"model: {args.out}\nrecipe: {args.out}/recipe.yaml (rerun with slimformer run)\n"
                  f"report: {args.out}/report.html")
    return 0
