"""Helpers shared by the benchmark scripts: write a result as JSON and as a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from slimformer.machine import machine_info

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, payload: dict, rows: list[tuple[str, str]]) -> None:
    """Write ``results/NAME.json`` (payload + machine) and ``results/NAME.md`` (a two-column table)."""
    RESULTS.mkdir(exist_ok=True)
    payload = {**payload, "machine": machine_info()}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    machine = payload["machine"]
    lines = [f"# {name}", "", f"Machine: {machine['processor']}, {machine['cpu_count']} cores, "
             f"{machine['torch_threads']} torch threads, torch {machine['torch']}, transformers {machine['transformers']}.",
             "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
