"""The report as one self-contained HTML page: tables and inline plots, nothing fetched."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from slimformer.report.plots import (plot_block_scores, plot_pareto, plot_quality_vs_size, plot_routing,
                                     plot_sparsity, plot_training)
from slimformer.report.records import ROWS, step_label

_CSS = """
body { font-family: system-ui, sans-serif; color: #222; max-width: 1080px; margin: 2rem auto; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; display: block; margin: .6rem 0; }
.note { color: #666; font-size: .85rem; }
"""


_NUMERIC = re.compile(r"^[-−—\d]")  # cells right-aligned in tables


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if key == "size_bytes":
        return f"{value / 2**20:,.1f} MiB"
    if key in ("nonzero_params", "params", "flops_per_token", "blocks") or (value == int(value) and abs(value) >= 1e4):
        return f"{value:,.0f}"
    if key == "sparsity":
        return f"{value:.1%}"
    return f"{value:.4g}"


def _td(text: str) -> str:
    return f'<td class="n">{html.escape(text)}</td>' if _NUMERIC.match(text) else f"<td>{html.escape(text)}</td>"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(map(_td, row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _steps_html(steps: list[dict]) -> str:
    rows = []
    for i, s in enumerate(steps, 1):
        q = s.get("quality", {})
        rows.append([str(i), step_label(s), s["file"], _fmt(s.get("seconds")), _fmt(s.get("peak_rss_gib")),
                     f"{_fmt(q.get('before'))} → {_fmt(q.get('after'))}" if q else "—",
                     ", ".join(map(str, s.get("removed", []))) or "—"])
    headers = ["#", "step", "file", "seconds", "peak RSS (GiB)", "quality before → after", "removed blocks"]
    return _table(headers, rows)


def _search_html(search: dict) -> str:
    body = f'<p class="note">{html.escape(search["file"])}: {len(search["trials"])} trials, ' \
           f'{len(search.get("pareto", []))} Pareto-optimal; hypervolume {_fmt(search.get("hypervolume"))}.</p>'
    if len(search["objectives"]) >= 2:
        body += _img(plot_pareto(search), "Pareto front")
    front = [search["trials"][i] for i in search.get("pareto", [])]
    rows = [[str(t["number"]), *(_fmt(v) for v in t["values"]), json.dumps(t["params"])[:120]] for t in front]
    body += _table(["trial", *search["objectives"], "params"], rows)
    if checks := search.get("speed_checks"):
        body += "<h3>Decode speed-up: the cost model against a measurement</h3>" + _table(
            ["candidate", "predicted", "measured"],
            [[c["describe"] + (" (chosen)" if c["chosen"] else ""), _fmt(c["predicted"]), _fmt(c["measured"])]
             for c in checks])
    return body


def _evaluations_html(evaluations: list[dict]) -> str:
    rows = [[e.get("model", e["file"]), source, _fmt(r["perplexity"]),
             f"{_fmt(r.get('windows'))} × {_fmt(r.get('seqlen'))}", _fmt(r.get("tokens_per_s"))]
            for e in evaluations for source, r in e.get("perplexity", {}).items()]
    costs = [[e.get("model", e["file"]), name, *(_fmt(c.get(k), k) for k in ROWS)]
             for e in evaluations for name, c in e.get("costs", {}).items()]
    generations = [g for e in evaluations for g in e.get("generations", [])]
    names = [k for k in (generations[0] if generations else {}) if k != "prompt"]
    texts = [[g["prompt"], *(g.get(n, "") for n in names)] for g in generations]
    return (_table(["model", "source", "perplexity", "windows × seqlen", "tokens/s"], rows) if rows else "") + \
           (_table(["model", "measured", *ROWS.values()], costs) if costs else "") + \
           ("<h3>Greedy generations side by side</h3>" + _table(["prompt", *names], texts) if texts else "")


def _bits_html(i: int, step: dict, grid: dict) -> str:
    """One quantization step's scheme per block and projection, the modules outside the blocks, and the size."""
    rows = [[str(b), *row] for b, row in zip(grid["blocks"], grid["values"])]
    rows += [[name, label, *[""] * (len(grid["projections"]) - 1)] for name, label in grid["outside"].items()]
    sizes = step.get("size_bytes") or {}
    note = []
    if step.get("mean_bits") is not None:
        note.append(f"mean {step['mean_bits']:.2f} bits per quantized weight")
    if sizes:
        note.append("size on disk " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items()))
    if step.get("size_bytes_before"):
        note.append(f"before {step['size_bytes_before'] / 2**20:.1f} MiB")
    return (f"<h3>Step {i}: {html.escape(step_label(step))}</h3><p>{html.escape('; '.join(note))}</p>"
            + _table(["block", *grid["projections"]], rows))


def _training_html(i: int, step: dict, training: dict) -> str:
    """One recovery step's loss curves with its held-out loss before and after and its training speed."""
    note = []
    if training.get("heldout_before") is not None and training.get("heldout_after") is not None:
        note.append(f"held-out loss {training['heldout_before']:.3f} → {training['heldout_after']:.3f}")
    if training.get("tokens_per_s"):
        note.append(f"{training['tokens_per_s']:.0f} training tokens/s")
    return (f"<h3>Step {i}: {html.escape(step_label(step))}</h3><p>{html.escape('; '.join(note))}</p>"
            + _img(plot_training(training), "training and held-out loss"))


def render_html(report: dict) -> str:
    """The report as one HTML page: CSS and plots (base64 PNG) inline, nothing fetched."""
    steps = report.get("steps", [])
    parts = [_section("summary", "Run", f'<p>Folder <code>{html.escape(report["run_dir"])}</code>; read '
                      f'{html.escape(", ".join(report["read"]))}.</p>' + (_steps_html(steps) if steps else ""))]
    if rows := report.get("before_after"):
        table = _table(["", "before", "after", "after / before"],
                       [[r["metric"], _fmt(r.get("before"), r["key"]), _fmt(r.get("after"), r["key"]),
                         _fmt(r.get("change"))] for r in rows])
        parts.append(_section("before-after", "Before → after", table))
    if qvs := report.get("quality_vs_size"):
        parts.append(_section("quality-vs-size", "Quality vs size", _img(plot_quality_vs_size(qvs), "quality vs size")))
    if grids := [(i, s["sparsity_grid"]) for i, s in enumerate(steps, 1) if "sparsity_grid" in s]:
        body = "".join(f"<h3>Step {i}: {html.escape(step_label(steps[i - 1]))}</h3>"
                       f"{_img(plot_sparsity(g), 'sparsity')}" for i, g in grids)
        parts.append(_section("sparsity", "Sparsity per layer", body))
    if bits := [(i, s["bits_grid"]) for i, s in enumerate(steps, 1) if "bits_grid" in s]:
        body = "".join(_bits_html(i, steps[i - 1], g) for i, g in bits)
        parts.append(_section("bits", "Bits per layer", body))
    if scored := [(i, s["block_scores"]) for i, s in enumerate(steps, 1) if "block_scores" in s]:
        body = "".join(f"<h3>Step {i}: {html.escape(step_label(steps[i - 1]))}</h3>"
                       f"{_img(plot_block_scores(b), 'block scores')}" for i, b in scored)
        parts.append(_section("block-scores", "Block scores per round", body))
    if trained := [(i, s["training"]) for i, s in enumerate(steps, 1) if "training" in s]:
        body = "".join(_training_html(i, steps[i - 1], t) for i, t in trained)
        parts.append(_section("training", "Recovery training", body))
    if routed := [(i, s["routing"]) for i, s in enumerate(steps, 1) if "routing" in s]:
        body = "".join(f"<h3>Step {i}: {html.escape(step_label(steps[i - 1]))}</h3>"
                       f"{_img(plot_routing(r), 'routing per expert')}" for i, r in routed)
        parts.append(_section("routing", "Routing per expert", body))
    for n, search in enumerate(report.get("searches", []), 1):
        anchor = "pareto" if n == 1 else f"pareto-{n}"
        title = "Cross-method search: Pareto front" if search.get("kind") == "auto" else "Structural search: Pareto front"
        parts.append(_section(anchor, title, _search_html(search)))
    if evaluations := report.get("evaluations"):
        parts.append(_section("evaluations", "Evaluations", _evaluations_html(evaluations)))
    if skipped := report.get("skipped"):
        table = _table(["file", "reason"], [[s["file"], s["reason"]] for s in skipped])
        parts.append(_section("skipped", "Files not used", table))
    title = html.escape(f"slimformer report — {report.get('model', Path(report['run_dir']).name)}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>{''.join(parts)}</body></html>\n")
