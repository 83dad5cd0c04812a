"""The structural-search verbs: run or resume a search, cut a searched sub-network out."""

from __future__ import annotations

import argparse


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
