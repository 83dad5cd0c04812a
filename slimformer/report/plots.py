"""The report's figures: quality against size, sparsity per layer, block scores, Pareto fronts (base64 PNGs)."""

from __future__ import annotations

import base64
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import EngFormatter, FuncFormatter, PercentFormatter

from slimformer.report.records import nondominated

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
    # sizes in MiB, as every table of the report states them
    formatter = {"kept_fraction": PercentFormatter(1.0), "size_bytes": FuncFormatter(lambda v, _: f"{v / 2**20:,.0f} MiB")}
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
    ax.set_ylabel(grid.get("block_label", "block"))
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
    """Which objectives are x and y: error (or perplexity) on y against the first size-like one, else the first two."""
    if "error" in objectives:
        y = objectives.index("error")
        return next(i for i in range(len(objectives)) if i != y), y
    if "ppl" in objectives and "size" in objectives:  # the cross-method search: quality against size
        return objectives.index("size"), objectives.index("ppl")
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
    if "chosen" in search:
        ax.scatter(values[search["chosen"], x], values[search["chosen"], y], s=90, marker="*", color="C1", zorder=4,
                   label="chosen")
    if "baseline" in search:
        points = np.array(search["baseline"]["points"], dtype=float)
        points = points[nondominated(points)]
        points = points[np.argsort(points[:, 0], kind="stable")]
        ax.step(points[:, 0], points[:, 1], where="post", color="C2", marker="s", markersize=4,
                label=search["baseline"]["label"])
    ax.set_xlabel(search["objectives"][x])
    ax.set_ylabel(search["objectives"][y])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)




def plot_training(training: dict) -> str:
    """Training loss (mean between held-out scores) and held-out loss against tokens, the kept step marked; PNG."""
    fig = _figure(7.0, 3.6)
    ax = fig.add_subplot()
    if training.get("train"):
        xs, ys = zip(*training["train"])
        ax.plot(xs, ys, marker=".", color="C0", label="training loss")
    if training.get("heldout"):
        xs, ys = zip(*training["heldout"])
        ax.plot(xs, ys, marker="o", color="C3", label="held-out loss")
    if training.get("best_tokens") is not None:
        ax.axvline(training["best_tokens"], color="0.4", linestyle="--", linewidth=1, label="kept")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_routing(routing: dict) -> str:
    """Heat map of the share of routing slots per expert, MoE blocks × experts (kept experts outlined); a base64 PNG."""
    values = np.array(routing["values"], dtype=float)
    fig = _figure(7.0, max(2.5, 0.22 * len(routing["blocks"]) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="magma", vmin=0.0, vmax=max(float(values.max()), 1e-9))
    ax.set_xticks(range(values.shape[1]), [str(e) for e in range(values.shape[1])], fontsize=8)
    ax.set_yticks(range(len(routing["blocks"])), [str(b) for b in routing["blocks"]], fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("block")
    for i, kept in enumerate(routing.get("kept") or []):
        for e in kept or []:
            ax.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="cyan", linewidth=1.2))
    fig.colorbar(image, ax=ax, label=f"share of routing slots ({routing.get('what', '')})")
    return _png(fig)
