"""The ``slimformer`` command: a thin layer where every verb maps to one library call.

The parser (``options.py``) is built from plain names, so `--help` and argument errors answer
before torch or transformers are imported; the verbs (``verbs.py``, ``search.py``) import the
library when they run.
"""

from __future__ import annotations

import argparse
import logging
import sys

from slimformer.cli import options
from slimformer.cli.options import (ALIASES, BACKENDS, BOS_MODES, DTYPES, GLUE_TASKS, OBJECTIVES, PROPAGATE,
                                    QUANT_BITS, QUANT_METHODS, SOURCES_HELP, SPACES, STRATEGIES, TASKS_HELP)
from slimformer.cli.search import cmd_extract, cmd_search
from slimformer.cli.verbs import (cmd_auto, cmd_eval, cmd_experts, cmd_export, cmd_glue, cmd_prune, cmd_quantize, cmd_recover,
                                  cmd_remove_blocks, cmd_report, cmd_run, cmd_upcycle)
from slimformer.errors import SlimformerError

__all__ = ["ALIASES", "BACKENDS", "BOS_MODES", "COMMANDS", "DTYPES", "GLUE_TASKS", "OBJECTIVES", "PROPAGATE",
           "QUANT_BITS", "QUANT_METHODS", "SOURCES_HELP", "SPACES", "STRATEGIES", "TASKS_HELP", "build_parser", "main"]


COMMANDS = {"eval": cmd_eval, "run": cmd_run, "report": cmd_report, "prune": cmd_prune, "remove-blocks": cmd_remove_blocks,
            "search": cmd_search, "extract": cmd_extract, "glue": cmd_glue, "quantize": cmd_quantize, "recover": cmd_recover,
            "upcycle": cmd_upcycle, "experts": cmd_experts, "export": cmd_export, "auto": cmd_auto}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="slimformer", description="Make Transformer models smaller and faster.")
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {verb: handler.__doc__ for verb, handler in COMMANDS.items()}
    options.add_eval_parser(sub, helps)
    options.add_prune_parser(sub, helps)
    options.add_remove_blocks_parser(sub, helps)
    options.add_search_parsers(sub, helps)
    options.add_run_parsers(sub, helps)
    options.add_glue_parser(sub, helps)
    options.add_quantize_parser(sub, helps)
    options.add_recover_parser(sub, helps)
    options.add_upcycle_parser(sub, helps)
    options.add_experts_parser(sub, helps)
    options.add_export_parser(sub, helps)
    options.add_auto_parser(sub, helps)
    assert set(sub.choices) == set(COMMANDS), "every verb needs a handler and a parser"
    return parser


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
