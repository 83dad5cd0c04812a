"""The ``slimformer`` command: a thin layer where every verb maps to one library call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from slimformer.data import SOURCES_HELP, load_text, tokenize
from slimformer.errors import SlimformerError
from slimformer.evaluation import perplexity
from slimformer.machine import machine_info
from slimformer.models import ALIASES, DEFAULT_MODEL, load_model
from slimformer.models.loading import DTYPES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"alias ({', '.join(ALIASES)}), local HF directory, .gguf file or hub id")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own Python code to run")


def _write_json(path: str, payload: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(out)


def cmd_eval(args: argparse.Namespace) -> int:
    """Measure a model: perplexity on the named sources."""
    from rich.console import Console
    from rich.table import Table

    sources = args.ppl or ["wikitext2"]
    texts = {s: load_text(s) for s in sources}  # read data before the slow model load fails late
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    if loaded.adapter.family.kind != "decoder":
        raise SlimformerError(f"perplexity needs a decoder; '{args.model}' is a {loaded.adapter.family.name} encoder")
    results = {}
    for source, text in texts.items():
        ids = tokenize(loaded.tokenizer, text)
        results[source] = perplexity(
            loaded.model, ids, seqlen=args.seqlen, windows=args.windows, batch_size=args.batch_size
        ).to_dict()
    table = Table(title=f"slimformer eval — {args.model}")
    for col in ("source", "perplexity", "windows × seqlen", "tokens/s", "seconds"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for source, r in results.items():
        table.add_row(source, f"{r['perplexity']:.3f}", f"{r['windows']} × {r['seqlen']}",
                      f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.1f}")
    Console().print(table)
    _write_json(args.out, {"model": args.model, "source": loaded.source, "dtype": args.dtype,
                           "perplexity": results, "machine": machine_info()})
    print(f"results written to {args.out}")
    return 0


COMMANDS = {"eval": cmd_eval}


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
    p.add_argument("--out", default="eval.json", help="where to write the JSON results")
    assert set(sub.choices) == set(COMMANDS), "every verb needs a handler and a parser"
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run one verb, turn a SlimformerError into one line and exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # loading takes a second; our own bars show the long work
    if args.threads:
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
