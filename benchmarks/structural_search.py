"""Structural search benchmark: MiniLM-L6 on GLUE (two-stage search vs importance pruning) and SmolLM2 one-shot.

MiniLM-L6 (``minilm-l6``), for each of RTE, MRPC and SST-2: a seeded sample of the training
set (``--train-limit``, default 2000 examples; ``--search-valid`` 500 more held out for the search), 2 epochs
at lr 1e-4, batch 32, 128 tokens. The reference model is a standard fine-tune; stage 1
trains the super-network from it (``--supernet-init reference``, or from the pre-trained
weights as the paper) with the sandwich rule (largest + smallest + one random sub-network drawn
size first, ``--sampling sized``; in-place distillation, ``--distill``); stage 2 runs NSGA-II over
the ``--space`` space (default ``medium``: heads and units per block) for ``--trials`` trials,
objectives (1 − accuracy on the held-out examples, relative parameters). The baseline is plain
importance pruning of the reference (one global threshold on the normalised mask-gradient
importance, no search, no super-network), measured at 60, 65, …, 95% of the parameters — those
sub-networks are also among the search's first trials, measured there with the super-network's
weights — and at the sizes of the searched Pareto set. The searched Pareto set and the baseline
are measured on the full dev set. Hypervolume on dev: reference point (1.0 relative parameters,
0.5 error = chance). The closest gap is how many dev examples the searched front wins (or loses)
by at the baseline point it beats least.

SmolLM2-135M, one-shot (no training): the ``medium`` space (heads and units per block),
NSGA-II, objectives (calibration perplexity on 8 × 512 WikiText-2 valid windows, relative
parameters); importance from the same windows.

On a GPU the budget can be lifted: ``--device cuda``, ``--train-limit 0`` (whole training sets),
``--random-subnets 2``, and ``--select-schedule``, which fine-tunes a reference per (epochs, lr)
of ``SCHEDULE_GRID`` and keeps the schedule most accurate on the held-out examples (the dev
figure of each is reported, never used). ``--tag`` names the result files apart. ``--replot`` and
``--retable NAME`` redraw the figures and recompute the comparison of stored results, running nothing.

    python benchmarks/structural_search.py [--only rte,mrpc,sst2,smollm2] [--trials 50] [--space medium]
    python benchmarks/structural_search.py --only rte,mrpc --device cuda --select-schedule --random-subnets 2 \
        --trials 100 --train-limit 0 --tag gpu
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from common import RESULTS, dominance_margin, paired_margin, run_children, write_result

RUNS = ["rte", "mrpc", "sst2", "smollm2"]
# --select-schedule: (epochs, lr) of the fine-tunes, the reference's best on held-out training examples wins.
SCHEDULE_GRID = [(epochs, lr) for epochs in (3, 10) for lr in (2e-5, 5e-5, 1e-4)]
WORK = Path(__file__).resolve().parents[1] / "runs" / "bench-structural"
HV_REFERENCE = (1.0, 0.5)


def encoder_run(task: str, args: argparse.Namespace) -> dict:
    """The two-stage search on one GLUE task, and importance pruning at the sizes of its Pareto set."""
    import torch

    from slimformer import load_model
    from slimformer.data.glue import glue_task, load_glue
    from slimformer.search.encoder import encoder_search, select_schedule, train_stage1
    from slimformer.search.structural import SearchConfig

    torch.set_num_threads(2)
    loaded = load_model("minilm-l6", device=args.device)
    config = SearchConfig(space=args.space, objectives=("error", "params"), strategy="nsga2", trials=args.trials,
                          population=10, epochs=args.epochs, lr=args.lr, random_subnets=args.random_subnets,
                          train_limit=args.train_limit or None, search_valid=args.search_valid,
                          supernet_init=args.supernet_init, distill=args.distill, sampling=args.sampling)
    schedules, select_s, reference = [], 0.0, None
    if args.select_schedule:
        start = time.perf_counter()
        config, schedules, reference = select_schedule(loaded.model, loaded.tokenizer, task, config, SCHEDULE_GRID,
                                                       progress=False)
        select_s = time.perf_counter() - start
    start = time.perf_counter()
    stage1 = train_stage1(loaded.model, loaded.tokenizer, task, config, reference=reference, progress=False)
    stage1_s = time.perf_counter() - start
    if reference is not None:  # fine-tuned during the choice: its time is that schedule's
        chosen = next(s for s in schedules if (s["epochs"], s["lr"]) == (config.epochs, config.lr))
        stage1.timing["reference_finetune_s"] = chosen["seconds"]
    start = time.perf_counter()
    found = encoder_search(stage1, loaded.tokenizer, task, config, progress=False)
    search_s = time.perf_counter() - start
    labels = [e.label for e in load_glue(glue_task(task), "dev")]
    run = {
        "task": task, "trials": args.trials, "train_examples": args.train_limit or "all",
        "search_valid": args.search_valid, "supernet_init": args.supernet_init, "space": args.space,
        "distill": args.distill, "sampling": args.sampling, "random_subnets": args.random_subnets,
        "epochs": config.epochs, "lr": config.lr, "device": args.device,
        "schedules": schedules, "select_schedule_s": select_s, "reference_from_choice": reference is not None,
        "reference_dev": found["reference_dev"], "supernet_dev": found["supernet_dev"],
        "dev_front": found["dev_front"], "baseline": found["baseline"], "baseline_at_front": found["baseline_at_front"],
        "dev_examples": len(labels), "dev_majority": max(labels.count(c) for c in set(labels)) / len(labels),
        "search_trials": found["result"].trials,
        "stage1_s": stage1_s, "stage1_timing": stage1.timing, "search_s": search_s,
    }
    return {**run, **comparison(run)}


def errors(rows: list[dict]) -> list[tuple[float, float]]:
    """(relative parameters, 1 − dev accuracy) of measured sub-networks: the points the fronts compare."""
    return [(x["params"], 1 - x["dev"]["accuracy"]) for x in rows]


def comparison(r: dict) -> dict:
    """Hypervolumes, dominance and closest gaps of a run's searched front against importance pruning.

    On the fixed grid: weak dominance (``dominance_margin``). At the front's sizes: each searched
    point against pruning to its own size (``paired_margin``). Gaps are in dev examples.
    """
    from slimformer.search.pareto import hypervolume

    searched, baseline = errors(r["dev_front"]), errors(r["baseline"])
    margin, paired = dominance_margin(searched, baseline), paired_margin(r["dev_front"], r["baseline_at_front"])
    n = r["dev_examples"]
    return {
        "hypervolume_search": hypervolume(searched, HV_REFERENCE),
        "hypervolume_baseline": hypervolume(baseline, HV_REFERENCE),
        "search_dominates_baseline": margin >= 0, "dominance_margin_examples": margin * n,
        "hypervolume_baseline_at_front": hypervolume(errors(r["baseline_at_front"]), HV_REFERENCE),
        "search_wins_at_front_sizes": paired >= 0, "paired_margin_examples": paired * n,
    }


def decoder_run(trials: int, device: str = "cpu") -> dict:
    """The one-shot search of SmolLM2-135M's heads and units by calibration perplexity."""
    import torch

    from slimformer import load_model
    from slimformer.data import calibration_samples
    from slimformer.search.decoder import decoder_search
    from slimformer.search.structural import SearchConfig

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", device=device)
    samples = calibration_samples(loaded.tokenizer, "wikitext2:valid", n=8, seqlen=512, seed=0)
    config = SearchConfig(space="medium", objectives=("error", "params"), strategy="nsga2", trials=trials,
                          population=20, importance_batches=8)
    start = time.perf_counter()
    found = decoder_search(loaded.adapter, samples, config, progress=False)
    seconds = time.perf_counter() - start
    result = found["result"]
    points = [(t["values"][1], t["values"][0]) for t in result.trials]
    return {"task": "smollm2", "trials": trials, "seconds": seconds,
            "pareto": [{"number": result.trials[i]["number"], "values": result.trials[i]["values"]}
                       for i in result.pareto],
            "pareto_points": [points[i] for i in result.pareto], "points": points, "hypervolume": result.hypervolume,
            "reference": result.reference}


def plot_run(r: dict, suffix: str = "") -> None:
    """Draw one run's figure from its result: searched front vs importance pruning, or the decoder's front.

    ``suffix`` keeps a partial run's figures apart from the full benchmark's.
    """
    from slimformer.search.pareto import plot_front

    if r["task"] == "smollm2":
        plot_front({"one-shot search": r.get("points", r["pareto_points"])}, RESULTS / f"structural_smollm2{suffix}.png",
                   labels=("relative parameters", "calibration perplexity"),
                   title="SmolLM2-135M, one-shot: perplexity vs parameters")
        return
    fronts = {"two-stage search (dev)": errors(r["dev_front"]), "importance pruning, 60–95% (dev)": errors(r["baseline"])}
    if r.get("baseline_at_front"):
        fronts["importance pruning at the front's sizes (dev)"] = errors(r["baseline_at_front"])
    plot_front(fronts,
               RESULTS / f"structural_minilm_{r['task']}{suffix}.png", labels=("relative parameters", "1 − accuracy (dev)"),
               reference=HV_REFERENCE, title=f"MiniLM-L6 on {r['task'].upper()}: searched front vs importance pruning")


def table_rows(results: list[dict]) -> list[tuple[str, str]]:
    """The Markdown table's rows: for each run its accuracies, fronts, hypervolumes, dominance and wall times."""
    rows = []
    for r in results:
        if r["task"] == "smollm2":
            front = ", ".join(f"{p:.2f}→{e:.1f}" for p, e in sorted(r["pareto_points"]))
            rows.append(("SmolLM2 one-shot (params → calibration ppl)",
                         f"{r['trials']} trials in {r['seconds']:.0f} s; Pareto set: {front}"))
            continue
        front = ", ".join(f"{p['params']:.2f}→{p['dev']['accuracy']:.3f}" for p in sorted(r["dev_front"], key=lambda p: p["params"]))
        base = ", ".join(f"{b['params']:.2f}→{b['dev']['accuracy']:.3f}" for b in r["baseline"])
        n, ref_acc = r["dev_examples"], r["reference_dev"]["accuracy"]
        rows.append((f"{r['task'].upper()} reference / super-network (full) dev accuracy",
                     f"{ref_acc:.3f} / {r['supernet_dev']['accuracy']:.3f} ({n} dev examples, majority class "
                     f"{r['dev_majority']:.3f}, binomial 95% half-width ±{1.96 * math.sqrt(ref_acc * (1 - ref_acc) / n):.3f})"))
        schedule = f"{r.get('epochs', 2):g} epochs at lr {r.get('lr', 1e-4):g}, {r.get('random_subnets', 1)} random " \
                   f"sub-network(s) per step, {r['train_examples']} training examples"
        if r.get("schedules"):
            # results stored before the scores were named by the task's metric say "accuracy"
            grid = "; ".join(f"{g['epochs']:g} ep. lr {g['lr']:g}: "
                             f"{g.get('search_valid_score', g.get('search_valid_accuracy')):.3f} / "
                             f"{g.get('dev_score', g.get('dev_accuracy')):.3f}" for g in r["schedules"])
            schedule += f" — chosen on held-out accuracy in {r['select_schedule_s']:.0f} s (held-out / dev): {grid}"
        rows.append((f"{r['task'].upper()} fine-tuning", schedule))
        rows.append((f"{r['task'].upper()} searched Pareto set on dev (params → accuracy)", front))
        rows.append((f"{r['task'].upper()} importance pruning on dev (params → accuracy)", base))
        at_front = ", ".join(f"{b['params']:.2f}→{b['dev']['accuracy']:.3f}" for b in r["baseline_at_front"])
        rows.append((f"{r['task'].upper()} importance pruning at the front's sizes on dev", at_front))
        rows.append((f"{r['task'].upper()} hypervolume search / baseline; search dominates",
                     f"{r['hypervolume_search']:.4f} / {r['hypervolume_baseline']:.4f}; {r['search_dominates_baseline']} "
                     f"(closest gap: {r['dominance_margin_examples']:+.0f} dev examples)"))
        rows.append((f"{r['task'].upper()} at the front's sizes: hypervolume of pruning; every searched point "
                     "at least matches pruning to its own size",
                     f"{r['hypervolume_baseline_at_front']:.4f}; {r['search_wins_at_front_sizes']} "
                     f"(least gain: {r['paired_margin_examples']:+.0f} dev examples)"))
        timing = r["stage1_timing"]
        reference = (f"its reference fine-tuned during the choice in {timing['reference_finetune_s']:.0f} s"
                     if r.get("reference_from_choice") else f"reference {timing['reference_finetune_s']:.0f} s")
        rows.append((f"{r['task'].upper()} wall time", f"stage 1 {r['stage1_s']:.0f} s ({reference}, super-network "
                     f"{timing['supernet_finetune_s']:.0f} s), search + dev evaluation {r['search_s']:.0f} s"))
    return rows


def retable(name: str) -> None:
    """Recompute the comparison of every encoder run in ``results/NAME.json`` from its stored points; rewrite it."""
    payload = json.loads((RESULTS / f"{name}.json").read_text())
    stale = ("search_dominates_baseline_at_front", "dominance_margin_at_front_examples")
    runs = [r if r["task"] == "smollm2" else {**{k: v for k, v in r.items() if k not in stale}, **comparison(r)}
            for r in payload["runs"]]
    write_result(name, {**payload, "runs": runs}, table_rows(runs), machine=payload["machine"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--trials", type=int, default=50, help="trials of each encoder search")
    parser.add_argument("--decoder-trials", type=int, default=80, help="trials of the SmolLM2 one-shot search")
    parser.add_argument("--train-limit", type=int, default=2000, help="training examples (0: the whole training set)")
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs (reference and super-network)")
    parser.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    parser.add_argument("--select-schedule", action="store_true",
                        help="choose epochs and lr per task from SCHEDULE_GRID by the reference's held-out accuracy")
    parser.add_argument("--random-subnets", type=int, default=1, help="stage 1: random sub-networks per step")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--tag", default="", help="suffix of the result files (e.g. the machine)")
    parser.add_argument("--search-valid", type=int, default=500, help="training examples held out for the search")
    parser.add_argument("--supernet-init", default="reference", choices=["reference", "pretrained"])
    parser.add_argument("--distill", default="inplace", choices=["inplace", "reference", "none"],
                        help="what stage 1's smaller sub-networks learn from")
    parser.add_argument("--sampling", default="sized", choices=["sized", "uniform"],
                        help="how stage 1 draws its random sub-networks")
    parser.add_argument("--space", default="medium", choices=["small", "medium", "layer", "large"],
                        help="search space of the encoder runs")
    parser.add_argument("--replot", action="store_true",
                        help="redraw the figures from results/structural_search.json, running nothing")
    parser.add_argument("--retable", nargs="+", metavar="NAME", default=None,
                        help="recompute the comparison figures and tables of results/NAME.json, running nothing")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.retable:
        for name in args.retable:
            retable(name)
        return
    if args.replot:
        for r in json.loads((RESULTS / "structural_search.json").read_text())["runs"]:
            plot_run(r)
        return
    if args.child:
        run = json.loads(args.child)
        out = decoder_run(args.decoder_trials, args.device) if run == "smollm2" else encoder_run(run, args)
        print("RESULT " + json.dumps(out, default=float))
        return
    runs = [r for r in RUNS if r in args.only.split(",")]
    shutil.rmtree(WORK, ignore_errors=True)
    results = run_children(__file__, runs, ["--trials", str(args.trials), "--decoder-trials", str(args.decoder_trials),
                                            "--train-limit", str(args.train_limit), "--search-valid", str(args.search_valid),
                                            "--supernet-init", args.supernet_init, "--space", args.space,
                                            "--distill", args.distill, "--sampling", args.sampling,
                                            "--epochs", str(args.epochs), "--lr", str(args.lr),
                                            "--random-subnets", str(args.random_subnets), "--device", args.device,
                                            *(["--select-schedule"] if args.select_schedule else [])])
    partial = len(runs) < len(RUNS)
    tag = f"_{args.tag}" if args.tag else ""
    for r in results:
        plot_run(r, tag or ("_partial" if partial else ""))  # a tagged run is named by its tag
    name = ("structural_search_" + "_".join(runs) if partial else "structural_search") + tag
    write_result(name, {"runs": results}, table_rows(results))


if __name__ == "__main__":
    main()
