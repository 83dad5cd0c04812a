"""The parser of every verb, built from plain names so that `--help` answers before any heavy import."""

from __future__ import annotations

import argparse

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
QUANT_METHODS = ("rtn", "gptq", "awq")
QUANT_BITS = (2, 3, 4, 8)
RECOVER_METHODS = ("ce", "kd", "lora", "kd+lora")
KD_LOSSES = ("kl", "reverse_kl", "js")
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
SOURCES_HELP = ("wikitext2[:test|valid], alpaca[:PATH], text:PATH (or PATH.txt), jsonl:PATH[:FIELD] (or PATH.jsonl); "
                "A+B joins sources")
TASKS_HELP = ("piqa, arc_easy, arc_challenge, boolq, hellaswag, winogrande, lambada, or a jsonl file (jsonl:PATH "
              "or PATH.jsonl) in a multiple-choice, partial-scoring or language-modelling layout")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model, dtype, device and thread options every model-loading verb takes."""
    p.add_argument("model", nargs="?", default=ALIASES[0],
                   help=f"alias ({', '.join(ALIASES)}), local HF directory, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run")


def add_max_memory_arg(p: argparse.ArgumentParser) -> None:
    """``--max-memory``: stream the model from disk block by block within this budget."""
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="stream the model from disk one block at a time and refuse, before any work, a run whose "
                        "estimated peak exceeds SIZE (4GiB, 512MiB…); an interrupted run resumes at its last block")
    p.add_argument("--out-dtype", default=None, choices=DTYPES,
                   help="with --max-memory: dtype of the written weights (default: --dtype)")
    p.add_argument("--activations", default="auto", choices=("auto", "memory", "disk"),
                   help="with --max-memory: where the calibration hidden states live; auto puts them on disk "
                        "(one file per batch) only when they would not fit the budget")


def add_bos_arg(p: argparse.ArgumentParser) -> None:
    """``--bos``: which windows start with the tokenizer's BOS."""
    p.add_argument("--bos", default="auto", choices=BOS_MODES,
                   help="which windows start with the tokenizer's BOS: every one, or once in front of the whole "
                        "text as the papers slice it (auto: once for Llama and OPT, every for the other families)")


def add_remove_blocks_parser(sub, helps: dict[str, str]) -> None:
    """``remove-blocks``: SLEB, its one-shot variant, or block influence."""
    p = sub.add_parser("remove-blocks", help=helps["remove-blocks"])
    add_model_args(p)
    p.add_argument("--method", default="sleb", choices=["sleb", "oneshot", "influence"],
                   help="sleb: greedy, loss-verified rounds; oneshot: one scoring round; influence: ShortGPT")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--blocks", type=int, help="number of blocks to remove")
    count.add_argument("--ratio", type=float, help="fraction of the blocks to remove, in (0, 1)")
    add_bos_arg(p)
    p.add_argument("--protect", type=int, nargs="*", default=[0, -1], help="blocks never removed (default: first, last)")
    p.add_argument("--calib", default="wikitext2:valid", help=f"calibration source: {SOURCES_HELP}")
    p.add_argument("--nsamples", type=int, default=1, help="SLEB's search cost grows with the sample count")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--ppl-windows", type=int, default=0, help="measure WikiText-2 perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the shallower model (stock transformers loads it)")
    p.add_argument("--overwrite", action="store_true")
    add_max_memory_arg(p)


def add_glue_parser(sub, helps: dict[str, str]) -> None:
    """``glue``: fine-tune an encoder on one GLUE task and print its metric."""
    p = sub.add_parser("glue", help=helps["glue"])
    add_model_args(p)
    p.add_argument("--task", required=True, help=f"GLUE task: {', '.join(GLUE_TASKS)}")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded sample of N training examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the fine-tuned classifier and glue.json")
    p.add_argument("--overwrite", action="store_true")


def add_search_parsers(sub, helps: dict[str, str]) -> None:
    """``search`` and ``extract``: structural search and cutting out one of its sub-networks."""
    p = sub.add_parser("search", help=helps["search"])
    add_model_args(p)
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
    p = sub.add_parser("extract", help=helps["extract"])
    p.add_argument("run", help="folder of a finished search")
    p.add_argument("--trial", type=int, required=True, help="trial number (see search.json)")
    p.add_argument("--out", required=True, help="folder for the smaller model")
    p.add_argument("--overwrite", action="store_true")


def add_run_parsers(sub, helps: dict[str, str]) -> None:
    """``run`` (a recipe) and ``report`` (rebuild a run folder's report)."""
    p = sub.add_parser("run", help=helps["run"])
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("--model", default=None, help="use this model instead of the recipe's")
    p.add_argument("--out", required=True, help="output folder (written when the recipe finishes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    add_max_memory_arg(p)
    p = sub.add_parser("report", help=helps["report"])
    p.add_argument("run", help="run folder")


def add_prune_parser(sub, helps: dict[str, str]) -> None:
    """``prune``: magnitude, Wanda or SparseGPT, optionally fine-tuned after."""
    p = sub.add_parser("prune", help=helps["prune"])
    add_model_args(p)
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    add_bos_arg(p)
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
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="fine-tuning steps after pruning, pruned weights kept at zero (see `recover` for more)")
    p.add_argument("--finetune-lr", type=float, default=2e-4)
    p.add_argument("--finetune-seqlen", type=int, default=512, help="tokens per fine-tuning window")
    p.add_argument("--finetune-data", default="wikitext2:valid+alpaca", help=f"fine-tuning text: {SOURCES_HELP}")
    p.add_argument("--ppl-windows", type=int, default=0, help="measure WikiText-2 perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the pruned model (stock transformers loads it)")
    p.add_argument("--sparse-out", default=None, help="folder for a sparse-bitmask copy (smaller on disk)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    add_max_memory_arg(p)


def add_eval_parser(sub, helps: dict[str, str]) -> None:
    """``eval``: perplexity, zero-shot tasks and lm-evaluation-harness tasks."""
    p = sub.add_parser("eval", help=helps["eval"])
    add_model_args(p)
    p.add_argument("--ppl", action="append", metavar="SOURCE", help=f"perplexity source: {SOURCES_HELP}")
    p.add_argument("--windows", type=int, default=None, help="only the first N windows (default: all)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--tasks", default=None, help=f"zero-shot tasks, comma-separated: {TASKS_HELP}")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples of each task")
    p.add_argument("--lm-eval", default=None, help="lm-evaluation-harness task names, comma-separated")
    p.add_argument("--lm-eval-include", default=None, help="folder of extra lm-eval task YAMLs (local data)")
    p.add_argument("--out", default="eval.json", help="where to write the JSON results")
    add_bos_arg(p)


def add_quantize_parser(sub, helps: dict[str, str]) -> None:
    """``quantize``: RTN, GPTQ or AWQ weight-only int8/int4, saved as a compressed-tensors checkpoint."""
    p = sub.add_parser("quantize", help=helps["quantize"])
    add_model_args(p)
    p.add_argument("--method", default="gptq", choices=QUANT_METHODS)
    p.add_argument("--bits", type=int, default=4, help=f"bits per weight: {', '.join(map(str, QUANT_BITS))}")
    p.add_argument("--group-size", type=int, default=None,
                   help="columns per scale (32, 64, 128...; -1: per channel; default: per channel for 8 bits, else "
                        "the largest of 128, 64, 32 that divides every width)")
    p.add_argument("--asymmetric", action="store_true", help="a zero point per group (default: symmetric)")
    p.add_argument("--mse", action="store_true", help="clip each range to the value minimising the rounding error")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq: columns by decreasing Hessian diagonal, with static groups (default: on)")
    p.add_argument("--static-groups", action="store_true", help="gptq: group scales from the unquantized weight")
    p.add_argument("--then", default="rtn", choices=["rtn", "gptq"], help="awq: the rounding after the scales")
    p.add_argument("--head", action="store_true", help="also quantize lm_head, per row, to --head-bits")
    p.add_argument("--embedding", action="store_true", help="also quantize the input embedding, per row")
    p.add_argument("--head-bits", type=int, default=8)
    add_bos_arg(p)
    p.add_argument("--targets", nargs="*", default=[], help="module names, suffixes or re:REGEX (default: block projections)")
    p.add_argument("--ignore", nargs="*", default=[], help="modules to leave in float, same rules")
    p.add_argument("--calib", default="wikitext2:valid", help=f"calibration source: {SOURCES_HELP}")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1, help="calibration samples per block call")
    p.add_argument("--propagate", default=None, choices=PROPAGATE,
                   help="how quantized outputs feed the next block (default: sequential for gptq, dense for awq)")
    p.add_argument("--blocksize", type=int, default=128, help="gptq: column block size")
    p.add_argument("--percdamp", type=float, default=0.01, help="gptq: dampening, fraction of mean diag(H)")
    p.add_argument("--ppl-windows", type=int, default=0, help="measure WikiText-2 perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the compressed-tensors checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_max_memory_arg(p)


def token_count(text: str) -> int:
    """A token budget such as ``200000``, ``200k`` or ``1.5M``."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a token count: '{text}' (e.g. 200000, 200k, 1.5M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the token budget must be at least 1, not {text}")
    return int(value)


def add_recover_parser(sub, helps: dict[str, str]) -> None:
    """``recover``: fine-tuning, distillation from the original model, LoRA, or distillation into LoRA."""
    p = sub.add_parser("recover", help=helps["recover"])
    add_model_args(p)
    p.add_argument("--teacher", default=None, help="the model before compression (needed by kd and kd+lora)")
    p.add_argument("--method", default="kd", choices=RECOVER_METHODS,
                   help="ce: plain fine-tuning; kd: distillation, every weight; lora: LoRA with cross-entropy; "
                        "kd+lora: distillation into LoRA adapters")
    p.add_argument("--tokens", type=token_count, default=200_000, help="training budget in tokens (200k, 1M...)")
    p.add_argument("--data", default="wikitext2:valid+alpaca",
                   help=f"training text, not the evaluation text: {SOURCES_HELP}")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per training window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per optimiser step")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", nargs="*", default=[], help="projection roles (q k v o gate up down); default all")
    p.add_argument("--unmasked-merge", action="store_true", help="lora: merge into pruned weights too (loses sparsity)")
    p.add_argument("--no-regrid", action="store_true",
                   help="quantized input: keep the trained float weights instead of rounding them back onto "
                        "their grids (quantize afresh afterwards, e.g. slimformer quantize --method gptq)")
    p.add_argument("--loss", default="kl", choices=KD_LOSSES, help="kd divergence: forward KL, reverse KL, Jensen-Shannon")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=64, help="teacher logits kept per token in the cache")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of hidden-state distillation")
    p.add_argument("--ce-weight", type=float, default=None, help="weight of cross-entropy on the labels (kd: default 0)")
    p.add_argument("--cache", default=None, help="folder for the teacher cache (default: memory)")
    p.add_argument("--heldout", type=int, default=16, help="held-out windows scored every --eval-every steps")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--patience", type=int, default=3, help="stop after N held-out scores without improvement (0: never)")
    p.add_argument("--checkpointing", action="store_true", help="recompute activations in the backward pass")
    p.add_argument("--seed", type=int, default=0)
    add_bos_arg(p)
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 test perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the recovered model (stock transformers loads it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_upcycle_parser(sub, helps: dict[str, str]) -> None:
    """``upcycle``: a dense decoder into a mixture of adapter experts (PESC), optionally instruction-tuned."""
    p = sub.add_parser("upcycle", help=helps["upcycle"])
    add_model_args(p)
    p.add_argument("--layout", default="pesc", choices=["pesc", "qwen2_moe"],
                   help="pesc: adapter experts over the shared FFN (own model class); qwen2_moe: the same idea as a "
                        "stock Qwen2-MoE model (shared expert + small routed SwiGLU experts)")
    p.add_argument("--experts", type=int, default=8, help="adapter experts per upcycled FFN")
    p.add_argument("--top-k", type=int, default=2, help="experts each token is routed to")
    p.add_argument("--adapter-dim", type=int, default=None, help="adapter width (default: hidden size / 8)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="block indices to upcycle (default: all)")
    p.add_argument("--aux-loss", type=float, default=0.01, help="weight of the load-balancing loss in training")
    p.add_argument("--z-loss", type=float, default=0.0, help="weight of the router z-loss in training")
    p.add_argument("--router-init", default="data", choices=["data", "random"],
                   help="data: routers set from the calibration inputs so tokens spread evenly over the experts; "
                        "random: N(0, initializer_range²), no calibration read")
    p.add_argument("--calib", default="wikitext2:valid", help=f"calibration source of the router start: {SOURCES_HELP}")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows of the router start")
    p.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration window of the router start")
    p.add_argument("--instruct-tokens", type=token_count, default=0,
                   help="instruction-tune for this many tokens after upcycling (0: upcycle only)")
    p.add_argument("--data", default="alpaca", help="instruction data: alpaca[:PATH], self-instruct[:PATH]")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on the projections while tuning (0: all weights)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    add_bos_arg(p)
    p.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 test perplexity before/after on N windows")
    p.add_argument("--export-remote-code", action="store_true",
                   help="also write the modeling file and auto_map, for stock transformers with trust_remote_code=True")
    p.add_argument("--out", required=True, help="folder for the PESC model (slimformer.load_model loads it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def add_export_parser(sub, helps: dict[str, str]) -> None:
    """``export``: a model as GGUF for llama.cpp, or as a compressed-tensors checkpoint for vLLM."""
    p = sub.add_parser("export", help=helps["export"])
    add_model_args(p)
    p.add_argument("--format", default="gguf", choices=["gguf", "compressed-tensors"])
    p.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0", "q4_1"],
                   help="gguf: the type of float weights; weights quantized by slimformer as int8/int4 in groups of 32 "
                        "keep their codes (Q8_0 / Q4_0 / Q4_1) whatever this says")
    p.add_argument("--check", action="store_true",
                   help="gguf: load the file in llama.cpp (xllamacpp) and compare its greedy continuation of a prompt "
                        "with transformers'; compressed-tensors: decompress with ModelCompressor and compare weights")
    p.add_argument("--out", required=True, help="the .gguf file, or the checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def add_experts_parser(sub, helps: dict[str, str]) -> None:
    """``experts``: fewer experts in a MoE model (PESC, Mixtral, Qwen-MoE, OLMoE) by pruning or merging."""
    p = sub.add_parser("experts", help=helps["experts"])
    add_model_args(p)
    p.add_argument("--method", default="prune", choices=["prune", "merge"],
                   help="prune: drop experts; merge: average groups of similar experts (M-SMoE)")
    p.add_argument("--criterion", default="frequency", choices=["frequency", "output"],
                   help="prune: the least routed-to experts, or those whose removal changes the block output least")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--keep", type=int, help="experts kept in every MoE block")
    count.add_argument("--ratio", type=float, help="fraction of the experts removed, in (0, 1)")
    p.add_argument("--calib", default="wikitext2:valid", help=f"calibration source: {SOURCES_HELP}")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    add_bos_arg(p)
    p.add_argument("--ppl-windows", type=int, default=0, help="measure WikiText-2 perplexity before/after on N windows")
    p.add_argument("--out", required=True, help="folder for the model with fewer experts (the same class, stock-loadable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_max_memory_arg(p)


def add_auto_parser(sub, helps: dict[str, str]) -> None:
    """``auto``: search every family for the best model under a target."""
    p = sub.add_parser("auto", help=helps["auto"])
    p.add_argument("model", nargs="?", default=ALIASES[0],
                   help=f"alias ({', '.join(ALIASES)}), local HF directory, .gguf file or hub id")
    p.add_argument("--target", required=True,
                   help="size=FRACTION of the dense bytes (size=0.25), speed=FACTOR of dense decoding (speed=2), "
                        "or ppl=+PERCENT over dense perplexity (ppl=+10%%)")
    p.add_argument("--budget", default="30m", help="wall-clock time for the search (90s, 30m, 2h); the final run comes after")
    p.add_argument("--trials", type=int, default=60, help="at most this many candidates")
    p.add_argument("--strategy", default="nsga2", choices=STRATEGIES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-block-ratio", type=float, default=0.2, help="the largest share of blocks a candidate removes")
    p.add_argument("--no-recovery", action="store_true", help="never distil after removing blocks or weights")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows of the final run")
    p.add_argument("--seqlen", type=int, default=1024, help="tokens per calibration window of the final run")
    p.add_argument("--recovery-tokens", type=token_count, default=40_000,
                   help="distillation budget of the final run (40k, 200000)")
    p.add_argument("--check-front", type=int, default=2,
                   help="besides the chosen candidate, how many other Pareto-optimal ones get their decode speed "
                        "measured against the cost model's prediction (0: none)")
    p.add_argument("--out", required=True, help="output folder: model, recipe.yaml, auto.json, report")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
