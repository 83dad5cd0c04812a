"""Helpers shared by the benchmark scripts: write a result as JSON and as a Markdown table."""

from __future__ import annotations

import json
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
