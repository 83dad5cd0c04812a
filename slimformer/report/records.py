"""Reading a run folder: every step, search and evaluation record merged into the figures ``report.json`` holds."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from slimformer.errors import SlimformerError
from slimformer.records import EvalRecord, StepRecord
from slimformer.search.pareto import pareto_mask

_COST_KEYS = ("params", "nonzero_params", "flops_per_token", "size_bytes",
              "prefill_s", "decode_tok_s", "generate_tok_s")
_QUALITY = (("perplexity", "ppl"), ("accuracy", "accuracy"))  # (name, key prefix in slimformer.json)
ROWS = {  # before/after rows: key -> label
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


def _costs(record: StepRecord | EvalRecord) -> dict[str, dict] | None:
    """{model name: cost figures} from ``costs.models`` (measure_costs) or a benchmark-style ``speed``."""
    models = _dict(_dict(record.costs).get("models")) or _dict(getattr(record, "speed", None))
    table = {}
    for name, figures in models.items():
        row = {key: _num(_dict(figures).get(key)) for key in _COST_KEYS}
        if row := _clean(row):
            table[str(name)] = row
    return table or None


def _quality(record: StepRecord) -> dict | None:
    """Quality before and after a step, the metric named with its data (``perplexity (wikitext2:test, 8 × 2048)``)."""
    for name, prefix in _QUALITY:
        found = {stage: _num(getattr(record, f"{prefix}_{stage}")) for stage in ("before", "after", "after_finetune")}
        if any(v is not None for v in found.values()):
            source, windows, seqlen = (getattr(record, f"{prefix}_{k}", None) for k in ("source", "windows", "seqlen"))
            windows, seqlen = _num(windows), _num(seqlen)
            on = ", ".join(([source] if isinstance(source, str) else [])
                           + ([f"{windows:.0f} × {seqlen or 2048:.0f}-token windows"] if windows else []))
            return _clean({"metric": f"{name} ({on})" if on else name, **found})
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


def _bits_label(info: dict) -> str | None:
    bits = _num(info.get("bits"))
    if bits is None:
        return None
    group = _num(info.get("group_size"))
    return f"int{bits:.0f} " + (f"g{group:.0f}" if group else "per-channel") + ("" if info.get("symmetric", True) else " asym")


def _bits_grid(layers: dict) -> dict | None:
    """Blocks × projections quantization scheme (``int4 g64``) from ``result.layers``; modules outside blocks listed apart."""
    cells, outside = {}, {}
    for name, info in layers.items():
        label, match = _bits_label(_dict(info)), _BLOCK_MODULE.match(str(name))
        if label is None:
            continue
        if match:
            cells[(int(match[1]), match[2])] = label
        else:
            outside[str(name)] = label
    if not cells and not outside:
        return None
    blocks = sorted({b for b, _ in cells})
    projections = list(dict.fromkeys(p for _, p in cells))
    return {"blocks": blocks, "projections": projections, "outside": outside,
            "values": [[cells.get((b, p), "float") for p in projections] for b in blocks]}


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


def _training(summary: dict) -> dict | None:
    """A recovery step's training and held-out loss against tokens trained, and the step it kept."""
    points = [h for h in _list(summary.get("history")) if isinstance(h, dict) and _num(h.get("tokens")) is not None]
    if not points:
        return None
    train = [(h["tokens"], h["loss"]) for h in points if _num(h.get("loss")) is not None]
    held = [(h["tokens"], h["heldout"]) for h in points if _num(h.get("heldout")) is not None]
    best = next((h["tokens"] for h in points if h.get("step") == summary.get("best_step")), None)
    return _clean({"train": [list(p) for p in train], "heldout": [list(p) for p in held], "best_tokens": best,
                   "tokens_per_s": _num(summary.get("tokens_per_s")),
                   "heldout_before": _num(summary.get("heldout_before")),
                   "heldout_after": _num(summary.get("heldout_after"))})


def _routing(summary: dict, layers: dict) -> dict | None:
    """Share of routing slots per expert per MoE block: a tuned model's (held-out) or what expert pruning counted."""
    shares = _dict(summary.get("routing_shares")) or {n: _dict(v).get("frequency") for n, v in layers.items()}
    rows = {str(n): [_num(x) for x in _list(v)] for n, v in shares.items() if _list(v)}
    rows = {n: v for n, v in rows.items() if None not in v}
    if not rows or len({len(v) for v in rows.values()}) != 1:
        return None
    names = sorted(rows, key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
    kept = {n: _list(_dict(layers.get(n)).get("kept")) or None for n in names} if layers else {}
    return _clean({"blocks": [next((t for t in n.split(".") if t.isdigit()), n) for n in names],
                   "values": [rows[n] for n in names], "kept": [kept.get(n) for n in names] if kept else None,
                   "what": "held-out windows after tuning" if summary.get("routing_shares") else "calibration tokens"})


def _step(doc: dict, rel: str) -> dict | None:
    """One compression step of a ``slimformer.json``; None when it holds no figures."""
    record = StepRecord.from_dict(doc)
    result = _dict(record.result)
    summary, config = _dict(result.get("summary")), _dict(result.get("config"))
    sizes = _clean({str(k): _num(v) for k, v in _dict(record.size_bytes).items()})
    step = _clean({
        "method": next((m for m in (result.get("method"), config.get("method")) if isinstance(m, str)), None),
        "config": _finite(config),
        "seconds": _num(result.get("seconds")),
        "peak_rss_gib": _num(result.get("peak_rss_gib")),
        "quality": _quality(record),
        "size_bytes": sizes,
        "size_bytes_before": _num(record.size_bytes_before),
        "sparsity": _num(summary.get("sparsity")),
        "blocks_before": _num(summary.get("blocks_before")),
        "blocks_after": _num(summary.get("blocks_after")),
        "removed": [int(b) for b in _list(summary.get("removed")) if _num(b) is not None],
        "costs": _costs(record),
        "sparsity_grid": _sparsity_grid(_dict(result.get("layers"))),
        "bits_grid": _bits_grid(_dict(result.get("layers"))),
        "mean_bits": _num(summary.get("mean_bits")),
        "block_scores": _block_scores(summary, config),
        "training": _training(summary),
        "routing": _routing(summary, _dict(result.get("layers"))),
    })
    if not step:
        return None
    model = record.model
    return {"file": rel, **({"model": model} if isinstance(model, str) else {}), **step}


def nondominated(points: np.ndarray) -> list[int]:
    """Positions of the Pareto-optimal points (all objectives minimised)."""
    return np.flatnonzero(pareto_mask(points)).tolist()


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
    pareto = given if "pareto" in doc else nondominated(np.array([t["values"] for t in trials]))
    baseline = _dict(doc.get("baseline"))
    points = [[float(v) for v in p] for p in map(_list, _list(baseline.get("points")))
              if len(p) == 2 and None not in map(_num, p)]
    return _clean({
        "file": rel, "objectives": objectives, "trials": trials, "pareto": pareto,
        "hypervolume": _num(doc.get("hypervolume")),
        **{k: doc[k] for k in ("model", "task", "strategy", "kind") if isinstance(doc.get(k), str)},
        **({"chosen": kept[doc["chosen"]]} if isinstance(doc.get("chosen"), int) and doc["chosen"] in kept else {}),
        "baseline": _clean({"label": str(baseline.get("label") or "baseline"), "points": points}) if points else None,
        "speed_checks": [{"describe": str(c.get("describe", "")), "chosen": c.get("chosen") is True,
                          "predicted": _num(c.get("predicted_speed")), "measured": _num(c.get("measured_speed"))}
                         for c in map(_dict, _list(doc.get("speed_checks")))] or None,
    })


def _evaluation(doc: dict, rel: str) -> dict | None:
    """The perplexities and cost comparison of an ``eval.json``; None when it holds neither."""
    record = EvalRecord.from_dict(doc)
    ppl = {}
    for source, r in _dict(record.perplexity).items():
        figures = _clean({k: _num(_dict(r).get(k)) for k in ("perplexity", "windows", "seqlen", "tokens_per_s")})
        if "perplexity" in figures:
            ppl[str(source)] = figures
    generations = [{str(k): str(v) for k, v in g.items()} for g in map(_dict, _list(record.generations)) if "prompt" in g]
    entry = _clean({"perplexity": ppl, "costs": _costs(record), "generations": generations})
    if not entry:
        return None
    model = record.model
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
    _number_blocks_as_originally(steps)
    if not (steps or searches or evaluations):
        raise SlimformerError(f"nothing readable in run folder {run_dir}: no slimformer.json, search.json or eval.json "
                              "with figures" + (f" ({len(skipped)} skipped)" if skipped else ""))
    model = next((e["model"] for e in steps + evaluations + searches if "model" in e), None)
    return _clean({
        "run_dir": str(run_dir), "model": model, "read": read, "skipped": skipped, "steps": steps,
        "before_after": _before_after(steps, evaluations), "quality_vs_size": _quality_vs_size(steps),
        "searches": searches, "evaluations": evaluations,
    })


# -- merging ------------------------------------------------------------------------------------


def _number_blocks_as_originally(steps: list[dict]) -> None:
    """Label each sparsity grid's blocks with their numbers in the model before any block was removed.

    A step after block removal numbers the blocks of the shallower model; the block charts
    use the original numbers, so the grids follow them and say so.
    """
    kept: list[int] | None = None
    for step in steps:
        grid = step.get("sparsity_grid")
        if grid and kept is not None:
            grid["blocks"] = [kept[b] if b < len(kept) else b for b in grid["blocks"]]
            grid["block_label"] = "block (numbered as in the original model)"
        if step.get("removed") and step.get("blocks_before"):
            kept = kept if kept is not None else list(range(int(step["blocks_before"])))
            kept = [k for i, k in enumerate(kept) if i not in set(step["removed"])]


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
    for key, label in ROWS.items():
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


def step_label(step: dict) -> str:
    """A short name of a compression step, e.g. ``wanda 50% 2:4`` or ``sleb −6 blocks``."""
    config = step.get("config", {})
    parts = [str(step.get("method", "step"))]
    if "sparsity" in step:
        parts.append(f"{step['sparsity']:.0%}")
    if isinstance(config.get("pattern"), str) and config["pattern"] != "unstructured":
        parts.append(config["pattern"])
    if step.get("removed"):
        parts.append(f"−{len(step['removed'])} blocks")
    if isinstance(config.get("bits"), int):
        parts.append(f"int{config['bits']}" + (f" g{config['group_size']}" if config.get("group_size") else ""))
    if config.get("kd_weight") and step.get("method") != "distill":
        parts.append("KD")
    if config.get("lora_rank"):
        parts.append(f"LoRA r{config['lora_rank']}")
    if isinstance(config.get("tokens"), int) and "training" in step:
        parts.append(f"{config['tokens'] / 1000:g}k tokens")
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
        point = {"label": step_label(step), "y": step.get("quality", {}).get("after"),
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


