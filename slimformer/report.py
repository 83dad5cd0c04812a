"""The run report: a run folder's figures merged into ``report.json``, and a self-contained ``report.html`` with plots.

What is read (every field is optional; a section whose data is missing is left out):

- ``slimformer.json`` anywhere under the folder, one per compression step, in natural path
  order (``step2`` before ``step10``); identical copies (the dense and the sparse output of
  one run) count once. Fields: ``model``; ``ppl_before``, ``ppl_after``,
  ``ppl_after_finetune`` (or ``accuracy_*``); ``size_bytes`` {format: bytes} of the output
  and ``size_bytes_before``; ``result`` (a ``MethodResult``: ``method``, ``config``,
  ``seconds``, ``peak_rss_gib``, ``layers`` {module: {sparsity}}, ``summary`` with
  ``sparsity``, ``blocks_before``, ``blocks_after``, ``removed``, ``rounds``
  [{block: score}], ``dense_loss``); and ``costs`` (the output of
  :func:`slimformer.evaluation.cost.measure_costs`) or ``speed`` ({name: {prefill_s,
  decode_tok_s, ...}}), whose first model is the one before and last the one after.
- ``search.json``: ``objectives``, ``trials`` [{number, params, values}], ``pareto``
  (positions in ``trials``; computed when absent), ``hypervolume``, and ``baseline``
  {``points`` [[x, y]] in plot coordinates — the size-like objective, then ``error`` —, ``label``}.
- ``eval.json``: ``model``, ``perplexity`` {source: {perplexity, windows, seqlen,
  tokens_per_s}}, ``costs``.

A file that is not a JSON object, or holds none of these figures, is listed under
``skipped``; a folder where nothing is readable is an error. ``report.json`` holds ``read``,
``skipped``, ``model``, ``steps`` (one per compression step, with its sparsity grid and
block scores), ``before_after`` (rows from the first step's "before" to the last step's
"after"), ``quality_vs_size``, ``searches`` and ``evaluations`` — keys only where there is data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, PercentFormatter

from slimformer.errors import SlimformerError
from slimformer.files import write_text

_COST_KEYS = ("params", "nonzero_params", "flops_per_token", "size_bytes",
              "prefill_s", "decode_tok_s", "generate_tok_s")
_QUALITY = (("perplexity", "ppl"), ("accuracy", "accuracy"))  # (name, key prefix in slimformer.json)
_ROWS = {  # before/after rows: key -> label
    "nonzero_params": "parameters (non-zero)",
    "params": "parameters (all)",
    "size_bytes": "size on disk (smallest format)",
    "flops_per_token": "FLOPs per token",
    "prefill_s": "prefill latency (s)",
    "decode_tok_s": "decode tokens/s",
    "generate_tok_s": "generate tokens/s",
}
_SIZE_AXES = {  # quality-vs-size x axis, in order of preference
    "nonzero_params": "parameters (non-zero)",
    "size_bytes": "size on disk (smallest stored format)",
    "kept_fraction": "weights kept (targeted weights × blocks)",
}
_BLOCK_MODULE = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")  # "model.layers.3.self_attn.q_proj" -> 3, "self_attn.q_proj"


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Read a run folder and write ``report.json`` and ``report.html`` into it (atomically); return their paths."""
    run_dir = Path(run_dir)
    report = read_run(run_dir)
    page = render_html(report)  # before writing anything: a failing plot leaves the old pair untouched
    json_path, html_path = run_dir / "report.json", run_dir / "report.html"
    write_text(json_path, json.dumps(report, indent=2) + "\n")
    write_text(html_path, page)
    return json_path, html_path


# --- reading -------------------------------------------------------------------------------------


def _num(value) -> float | None:
    """A finite number, or None for anything else (strings, booleans, NaN, missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _find(run_dir: Path, name: str) -> list[Path]:
    found = [p for p in run_dir.rglob(name)
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(run_dir).parts)]
    return sorted(found, key=lambda p: _natural(p.relative_to(run_dir).as_posix()))


def _load(path: Path, rel: str, skipped: list) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        skipped.append({"file": rel, "reason": f"not readable JSON ({str(e).splitlines()[0]})"})
        return None
    if not isinstance(doc, dict):
        skipped.append({"file": rel, "reason": "not a JSON object"})
        return None
    return doc


def _finite(value):
    """``value`` with non-finite numbers (NaN, ±inf) made None at any depth: report.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clean(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if v is not None and v != {} and v != []}


def _costs(doc: dict) -> dict[str, dict] | None:
    """{model name: cost figures} from ``costs.models`` (measure_costs) or a benchmark-style ``speed``."""
    models = _dict(_dict(doc.get("costs")).get("models")) or _dict(doc.get("speed"))
    table = {}
    for name, figures in models.items():
        row = {key: _num(_dict(figures).get(key)) for key in _COST_KEYS}
        if row := _clean(row):
            table[str(name)] = row
    return table or None


def _quality(doc: dict) -> dict | None:
    for name, prefix in _QUALITY:
        found = {stage: _num(doc.get(f"{prefix}_{stage}")) for stage in ("before", "after", "after_finetune")}
        if any(v is not None for v in found.values()):
            return _clean({"metric": name, **found})
    return None


def _sparsity_grid(layers: dict) -> dict | None:
    """Blocks × projections sparsity from ``result.layers``; modules outside the blocks are left out."""
    cells = {}
    for name, info in layers.items():
        value, match = _num(_dict(info).get("sparsity")), _BLOCK_MODULE.match(str(name))
        if value is not None and match:
            cells[(int(match[1]), match[2])] = value
    if not cells:
        return None
    blocks = sorted({b for b, _ in cells})
    projections = list(dict.fromkeys(p for _, p in cells))  # module order, as the method listed them
    return {"blocks": blocks, "projections": projections,
            "values": [[cells.get((b, p)) for p in projections] for b in blocks]}


def _block_scores(summary: dict, config: dict) -> dict | None:
    """Each round's score per candidate block, and which block(s) the round removed."""
    rounds = []
    for scores in _list(summary.get("rounds")):
        pairs = sorted((int(b), s) for b, s in _dict(scores).items() if str(b).isdigit() and _num(s) is not None)
        if pairs:
            rounds.append({"blocks": [b for b, _ in pairs], "scores": [v for _, v in pairs]})
    if not rounds:
        return None
    removed = [int(b) for b in _list(summary.get("removed")) if _num(b) is not None]
    for i, r in enumerate(rounds):  # one round (one-shot, influence) removes them all; else one each
        r["removed"] = removed if len(rounds) == 1 else removed[i : i + 1]
    influence = config.get("criterion") == "influence"
    score = "block influence (1 − cos)" if influence else "calibration loss without the block (nats)"
    return _clean({"score": score, "rounds": rounds, "dense_loss": _num(summary.get("dense_loss"))})


def _step(doc: dict, rel: str) -> dict | None:
    """One compression step of a ``slimformer.json``; None when it holds no figures."""
    result = _dict(doc.get("result"))
    summary, config = _dict(result.get("summary")), _dict(result.get("config"))
    sizes = _clean({str(k): _num(v) for k, v in _dict(doc.get("size_bytes")).items()})
    step = _clean({
        "method": next((m for m in (result.get("method"), config.get("method")) if isinstance(m, str)), None),
        "config": _finite(config),
        "seconds": _num(result.get("seconds")),
        "peak_rss_gib": _num(result.get("peak_rss_gib")),
        "quality": _quality(doc),
        "size_bytes": sizes,
        "size_bytes_before": _num(doc.get("size_bytes_before")),
        "sparsity": _num(summary.get("sparsity")),
        "blocks_before": _num(summary.get("blocks_before")),
        "blocks_after": _num(summary.get("blocks_after")),
        "removed": [int(b) for b in _list(summary.get("removed")) if _num(b) is not None],
        "costs": _costs(doc),
        "sparsity_grid": _sparsity_grid(_dict(result.get("layers"))),
        "block_scores": _block_scores(summary, config),
    })
    if not step:
        return None
    model = doc.get("model")
    return {"file": rel, **({"model": model} if isinstance(model, str) else {}), **step}


def _nondominated(points: np.ndarray) -> list[int]:
    return [i for i, p in enumerate(points) if not np.any(np.all(points <= p, axis=1) & np.any(points < p, axis=1))]


def _search(doc: dict, rel: str) -> dict | None:
    """Trials with numeric values (failed ones dropped), the Pareto set among them and the baseline."""
    kept, trials = {}, []
    for i, trial in enumerate(map(_dict, _list(doc.get("trials")))):
        values = [_num(v) for v in _list(trial.get("values"))]
        if values and None not in values:
            kept[i] = len(trials)
            number = trial.get("number")
            trials.append({"number": number if isinstance(number, int) and not isinstance(number, bool) else i,
                           "params": _finite(_dict(trial.get("params"))), "values": values})
    if not trials or len({len(t["values"]) for t in trials}) != 1:
        return None
    m = len(trials[0]["values"])
    objectives = [str(o) for o in _list(doc.get("objectives"))]
    objectives = objectives if len(objectives) == m else [f"objective {j + 1}" for j in range(m)]
    given = [kept[i] for i in _list(doc.get("pareto")) if isinstance(i, int) and i in kept]
    pareto = given if "pareto" in doc else _nondominated(np.array([t["values"] for t in trials]))
    baseline = _dict(doc.get("baseline"))
    points = [[float(v) for v in p] for p in map(_list, _list(baseline.get("points")))
              if len(p) == 2 and None not in map(_num, p)]
    return _clean({
        "file": rel, "objectives": objectives, "trials": trials, "pareto": pareto,
        "hypervolume": _num(doc.get("hypervolume")),
        **{k: doc[k] for k in ("model", "task", "strategy") if isinstance(doc.get(k), str)},
        "baseline": _clean({"label": str(baseline.get("label") or "baseline"), "points": points}) if points else None,
    })


def _evaluation(doc: dict, rel: str) -> dict | None:
    ppl = {}
    for source, r in _dict(doc.get("perplexity")).items():
        figures = _clean({k: _num(_dict(r).get(k)) for k in ("perplexity", "windows", "seqlen", "tokens_per_s")})
        if "perplexity" in figures:
            ppl[str(source)] = figures
    entry = _clean({"perplexity": ppl, "costs": _costs(doc)})
    if not entry:
        return None
    model = doc.get("model")
    return {"file": rel, **({"model": model} if isinstance(model, str) else {}), **entry}


def read_run(run_dir: str | Path) -> dict:
    """The merged figures of a run folder (what ``report.json`` holds); see the module docstring for what is read."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SlimformerError(f"run folder {run_dir} does not exist or is not a folder")
    read, skipped, found = [], [], {"slimformer.json": [], "search.json": [], "eval.json": []}
    parsers = {"slimformer.json": _step, "search.json": _search, "eval.json": _evaluation}
    seen: list[dict] = []
    for name, parse in parsers.items():
        for path in _find(run_dir, name):
            rel = path.relative_to(run_dir).as_posix()
            doc = _load(path, rel, skipped)
            if doc is None:
                continue
            if doc in seen:  # the same run saved twice (dense and sparse outputs)
                read.append(rel)
                continue
            entry = parse(doc, rel)
            if entry is None:
                skipped.append({"file": rel, "reason": f"no figures that a {name} holds"})
                continue
            seen.append(doc)
            read.append(rel)
            found[name].append(entry)
    steps, searches, evaluations = found.values()
    if not (steps or searches or evaluations):
        raise SlimformerError(f"nothing readable in run folder {run_dir}: no slimformer.json, search.json or eval.json "
                              "with figures" + (f" ({len(skipped)} skipped)" if skipped else ""))
    model = next((e["model"] for e in steps + evaluations + searches if "model" in e), None)
    return _clean({
        "run_dir": str(run_dir), "model": model, "read": read, "skipped": skipped, "steps": steps,
        "before_after": _before_after(steps, evaluations), "quality_vs_size": _quality_vs_size(steps),
        "searches": searches, "evaluations": evaluations,
    })


# --- merging -------------------------------------------------------------------------------------


def _row(key: str, metric: str, before, after) -> dict | None:
    if before is None and after is None:
        return None
    change = after / before if before not in (None, 0) and after is not None else None
    return _clean({"key": key, "metric": metric, "before": before, "after": after, "change": change})


def _smallest(sizes: dict | None) -> float | None:
    return min(sizes.values()) if sizes else None


def _known(steps: list[dict], key: str) -> list:
    return [s[key] for s in steps if key in s]


def _before_after(steps: list[dict], evaluations: list[dict]) -> list[dict]:
    """Rows from the first step's "before" to the last step's "after"; costs fall back to an eval's.

    Blocks and sparsity take the latest step that reports them: a later step that does not
    touch them leaves them as they were.
    """
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    measured = [row for entry in steps + evaluations for row in entry.get("costs", {}).values()]
    start, end = (measured[0] if measured else {}), (measured[-1] if len(measured) > 1 else {})
    q0, q1 = first.get("quality", {}), last.get("quality", {})
    rows = []
    if q0.get("metric") == q1.get("metric"):
        rows.append(_row("quality", q1.get("metric", ""), q0.get("before"), q1.get("after")))
        if "after_finetune" in q1:
            rows.append(_row("quality", f"{q1['metric']} after fine-tune", q0.get("before"), q1["after_finetune"]))
    for key, label in _ROWS.items():
        before, after = start.get(key), end.get(key)
        if key == "size_bytes":
            before = first.get("size_bytes_before", before)
            after = _smallest(last.get("size_bytes")) or after
        rows.append(_row(key, label, before, after))
        if key == "size_bytes" and len(sizes := last.get("size_bytes", {})) > 1:  # each stored format
            rows += [_row(key, f"size on disk ({name})", None, size) for name, size in sizes.items()]
    first_blocks = next(iter(_known(steps, "blocks_before")), None)
    rows.append(_row("blocks", "blocks", first_blocks, next(reversed(_known(steps, "blocks_after")), None)))
    last_sparsity = next(reversed(_known(steps, "sparsity")), None)
    rows.append(_row("sparsity", "sparsity of the targeted weights", None, last_sparsity))
    return [r for r in rows if r]


def _step_label(step: dict) -> str:
    """A short name of a compression step, e.g. ``wanda 50% 2:4`` or ``sleb −6 blocks``."""
    config = step.get("config", {})
    parts = [str(step.get("method", "step"))]
    if "sparsity" in step:
        parts.append(f"{step['sparsity']:.0%}")
    if isinstance(config.get("pattern"), str) and config["pattern"] != "unstructured":
        parts.append(config["pattern"])
    if step.get("removed"):
        parts.append(f"−{len(step['removed'])} blocks")
    return " ".join(parts)


def _quality_vs_size(steps: list[dict]) -> dict | None:
    """The chain before → after each step, placed by the first size measure that every point has.

    ``kept_fraction`` is the product of the blocks kept so far and the non-zero fraction of
    the targeted weights after the latest pruning (its sparsity is of the current model).
    """
    if not steps or "quality" not in steps[0]:
        return None
    first = steps[0]
    start_costs = next(iter(first.get("costs", {}).values()), {})
    points = [{"label": "before", "y": first["quality"].get("before"), "kept_fraction": 1.0,
               "nonzero_params": start_costs.get("nonzero_params"),
               "size_bytes": first.get("size_bytes_before", start_costs.get("size_bytes"))}]
    blocks, weights = 1.0, 1.0
    for step in steps:
        known = "sparsity" in step or "blocks_after" in step
        if "blocks_after" in step and step.get("blocks_before"):
            blocks *= step["blocks_after"] / step["blocks_before"]
        weights = 1 - step["sparsity"] if "sparsity" in step else weights
        end_costs = list(step.get("costs", {}).values())[-1:] or [{}]
        point = {"label": _step_label(step), "y": step.get("quality", {}).get("after"),
                 "kept_fraction": blocks * weights if known and points[-1]["kept_fraction"] is not None else None,
                 "nonzero_params": end_costs[0].get("nonzero_params"),
                 "size_bytes": _smallest(step.get("size_bytes")) or end_costs[0].get("size_bytes")}
        points.append(point)
        if "after_finetune" in step.get("quality", {}):
            points.append({**point, "label": f"{point['label']} + fine-tune", "y": step["quality"]["after_finetune"]})
    points = [p for p in points if p["y"] is not None]
    axis = next((k for k in _SIZE_AXES if all(p[k] is not None for p in points)), None)
    if len(points) < 2 or axis is None:
        return None
    return {"metric": first["quality"]["metric"], "x": axis, "x_label": _SIZE_AXES[axis],
            "points": [{"label": p["label"], "x": p[axis], "y": p["y"]} for p in points]}


# --- plots ---------------------------------------------------------------------------------------


def _figure(width: float = 7.0, height: float = 4.2) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    return fig


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_quality_vs_size(figures: dict) -> str:
    """Quality against size, an arrow from each point to the next; a base64 PNG."""
    fig = _figure()
    ax = fig.add_subplot()
    xs, ys = [p["x"] for p in figures["points"]], [p["y"] for p in figures["points"]]
    ax.plot(xs, ys, color="0.6", zorder=1)
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "0.4"})
    ax.scatter(xs, ys, color=[f"C{i % 10}" for i in range(len(xs))], zorder=2)
    for p in figures["points"]:
        ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax.set_yscale("log")
    formatter = {"kept_fraction": PercentFormatter(1.0), "size_bytes": EngFormatter(unit="B")}
    ax.xaxis.set_major_formatter(formatter.get(figures["x"], EngFormatter()))
    ax.set_xlabel(figures["x_label"])
    ax.set_ylabel(figures["metric"])
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_sparsity(grid: dict) -> str:
    """Heat map of sparsity, blocks × projections; a base64 PNG."""
    values = np.array([[np.nan if v is None else v for v in row] for row in grid["values"]], dtype=float)
    fig = _figure(7.0, max(2.5, 0.22 * len(grid["blocks"]) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(grid["projections"])), grid["projections"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid["blocks"])), [str(b) for b in grid["blocks"]], fontsize=8)
    ax.set_ylabel("block")
    if values.size <= 200:
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="sparsity")
    return _png(fig)


def plot_block_scores(scores: dict) -> str:
    """One line per round of block removal, the removed block(s) ringed; a base64 PNG."""
    fig = _figure()
    ax = fig.add_subplot()
    for i, r in enumerate(scores["rounds"]):
        color = f"C{i % 10}"
        ax.plot(r["blocks"], r["scores"], marker=".", color=color, label=f"round {i + 1}")
        at = {b: s for b, s in zip(r["blocks"], r["scores"])}
        hits = [b for b in r["removed"] if b in at]
        ax.scatter(hits, [at[b] for b in hits], s=90, facecolors="none", edgecolors=color, linewidths=1.5, zorder=3)
    if "dense_loss" in scores:
        ax.axhline(scores["dense_loss"], color="0.3", linestyle="--", linewidth=1, label="dense model")
    ax.set_xlabel("candidate block (o = removed)")
    ax.set_ylabel(scores["score"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(scores["rounds"]) > 8 else 1)
    return _png(fig)


def _pareto_axes(objectives: list[str]) -> tuple[int, int]:
    """Which objectives are x and y: error on y against the first size-like one, else the first two."""
    if "error" in objectives:
        y = objectives.index("error")
        return next(i for i in range(len(objectives)) if i != y), y
    return 0, 1


def plot_pareto(search: dict) -> str:
    """Every trial faint, the Pareto set highlighted (a step line for two objectives), the baseline's front; PNG."""
    x, y = _pareto_axes(search["objectives"])
    values = np.array([t["values"] for t in search["trials"]], dtype=float)
    front = values[search.get("pareto", [])]
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter(values[:, x], values[:, y], s=14, color="C0", alpha=0.4, linewidths=0, label="trials")
    if len(front):
        ordered = front[np.argsort(front[:, x], kind="stable")]
        ax.scatter(ordered[:, x], ordered[:, y], s=30, color="C3", zorder=3, label="Pareto set")
        if values.shape[1] == 2:
            ax.step(ordered[:, x], ordered[:, y], where="post", color="C3")
    if "baseline" in search:
        points = np.array(search["baseline"]["points"], dtype=float)
        points = points[_nondominated(points)]
        points = points[np.argsort(points[:, 0], kind="stable")]
        ax.step(points[:, 0], points[:, 1], where="post", color="C2", marker="s", markersize=4,
                label=search["baseline"]["label"])
    ax.set_xlabel(search["objectives"][x])
    ax.set_ylabel(search["objectives"][y])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


# --- HTML ----------------------------------------------------------------------------------------

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
        rows.append([str(i), _step_label(s), s["file"], _fmt(s.get("seconds")), _fmt(s.get("peak_rss_gib")),
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
    return body + _table(["trial", *search["objectives"], "params"], rows)


def _evaluations_html(evaluations: list[dict]) -> str:
    rows = [[e.get("model", e["file"]), source, _fmt(r["perplexity"]),
             f"{_fmt(r.get('windows'))} × {_fmt(r.get('seqlen'))}", _fmt(r.get("tokens_per_s"))]
            for e in evaluations for source, r in e.get("perplexity", {}).items()]
    costs = [[e.get("model", e["file"]), name, *(_fmt(c.get(k), k) for k in _ROWS)]
             for e in evaluations for name, c in e.get("costs", {}).items()]
    return (_table(["model", "source", "perplexity", "windows × seqlen", "tokens/s"], rows) if rows else "") + \
           (_table(["model", "measured", *_ROWS.values()], costs) if costs else "")


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
        body = "".join(f"<h3>Step {i}: {html.escape(_step_label(steps[i - 1]))}</h3>"
                       f"{_img(plot_sparsity(g), 'sparsity')}" for i, g in grids)
        parts.append(_section("sparsity", "Sparsity per layer", body))
    if scored := [(i, s["block_scores"]) for i, s in enumerate(steps, 1) if "block_scores" in s]:
        body = "".join(f"<h3>Step {i}: {html.escape(_step_label(steps[i - 1]))}</h3>"
                       f"{_img(plot_block_scores(b), 'block scores')}" for i, b in scored)
        parts.append(_section("block-scores", "Block scores per round", body))
    for n, search in enumerate(report.get("searches", []), 1):
        anchor = "pareto" if n == 1 else f"pareto-{n}"
        parts.append(_section(anchor, "Structural search: Pareto front", _search_html(search)))
    if evaluations := report.get("evaluations"):
        parts.append(_section("evaluations", "Evaluations", _evaluations_html(evaluations)))
    if skipped := report.get("skipped"):
        table = _table(["file", "reason"], [[s["file"], s["reason"]] for s in skipped])
        parts.append(_section("skipped", "Files not used", table))
    title = html.escape(f"slimformer report — {report.get('model', Path(report['run_dir']).name)}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body><h1>{title}</h1>{''.join(parts)}</body></html>\n")
