"""Helpers shared by the benchmark scripts: write a result as JSON and as a Markdown table."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from slimformer.machine import machine_info

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, payload: dict, rows: list[tuple[str, str]], machine: dict | None = None) -> None:
    """Write ``results/NAME.json`` (payload + machine) and ``results/NAME.md`` (a two-column table).

    ``machine`` is this one unless given (a result recomputed from one measured elsewhere keeps its own).
    """
    RESULTS.mkdir(exist_ok=True)
    payload = {**payload, "machine": machine or machine_info()}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    machine = payload["machine"]
    lines = [f"# {name}", "", f"Machine: {machine['processor']}, {machine['cpu_count']} cores, "
             f"{machine['torch_threads']} torch threads, torch {machine['torch']}, transformers {machine['transformers']}"
             + (f", GPU {machine['cuda']}." if machine.get("cuda") else "."),
             "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def run_children(script: str, runs: list, extra: list[str]) -> list[dict]:
    """Run ``script --child RUN`` once per run, each in a fresh process (so peak RSS is that run's own)."""
    results = []
    for run in runs:
        proc = subprocess.run([sys.executable, script, "--child", json.dumps(run), *extra],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"run {run} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))
        print({k: v for k, v in results[-1].items() if k not in ("rounds", "speed", "search_trials", "schedules")}, flush=True)
    return results


def dominates(front: list[tuple[float, float]], other: list[tuple[float, float]]) -> bool:
    """Whether every point of ``other`` is weakly dominated by some point of ``front`` (both minimised)."""
    return dominance_margin(front, other) >= 0


def dominance_margin(front: list[tuple[float, float]], other: list[tuple[float, float]]) -> float:
    """How far ``front`` is below ``other`` in the second objective, at worst: the minimum over points ``b``
    of ``other`` of ``b[1] - min(a[1] for a in front if a[0] <= b[0])``.

    Non-negative exactly when ``front`` weakly dominates ``other``; ``-inf`` when some point of
    ``other`` is smaller in the first objective than all of ``front``. With errors on a dev set
    of ``n`` examples, ``margin * n`` is the number of examples by which the front wins (or loses)
    where it is closest.
    """
    margins = []
    for b in other:
        below = [a[1] for a in front if a[0] <= b[0]]
        margins.append(b[1] - min(below) if below else -math.inf)
    return min(margins, default=math.inf)


def paired_margin(front: list[dict], at_sizes: list[dict], metric: str = "accuracy") -> float:
    """The least gain in dev ``metric`` of a searched point over importance pruning to that point's own size.

    ``front`` and ``at_sizes`` are :func:`encoder_search`'s ``dev_front`` and
    ``baseline_at_front``: each searched point below full size is paired with the pruned network
    whose ``target`` is its size rounded to 3 decimals. Pairing by size matters because the
    pruning threshold lands within about 0.001 of its target, sometimes just below it, and then
    :func:`dominance_margin` would compare it with the front's next smaller point. Non-negative
    when the search wins at every one of its sizes; ``inf`` when there is no pair.
    """
    pruned = {b["target"]: b["dev"][metric] for b in at_sizes}
    gains = [p["dev"][metric] - pruned[round(p["params"], 3)] for p in front
             if p["params"] < 0.999 and round(p["params"], 3) in pruned]
    return min(gains, default=math.inf)
