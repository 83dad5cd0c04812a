"""Pareto fronts of minimised objectives: the non-dominated points, their hypervolume, and a plot.

Every objective is minimised (negate one to maximise it). Points are an ``(n, m)`` array-like of
``n`` points with ``m`` objectives. These are pure functions of the points; the search that
produces them is :mod:`slimformer.search.strategies`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from slimformer.errors import SlimformerError


def as_points(points: ArrayLike, dims: int | None = None) -> np.ndarray:
    """``points`` as a float ``(n, m)`` array, checked: no NaN, and ``m == dims`` when given."""
    p = np.asarray(points, dtype=float)
    if p.ndim == 1 and p.size == 0:
        p = p.reshape(0, dims or 1)
    if p.ndim != 2 or p.shape[1] == 0:
        raise SlimformerError(f"points must be an (n, m) array of objective values, not shape {p.shape}")
    if dims is not None and p.shape[1] != dims:
        raise SlimformerError(f"points have {p.shape[1]} objectives, expected {dims}")
    if np.isnan(p).any():
        raise SlimformerError("points contain NaN: every objective value must be a number")
    return p


def pareto_mask(points: ArrayLike) -> np.ndarray:
    """Which points are non-dominated (minimisation): no other point is as good in all objectives and better in one.

    Equal points do not dominate each other, so duplicates of a Pareto-optimal point are all kept.
    """
    p = as_points(points)
    mask = np.ones(len(p), dtype=bool)
    for i in range(len(p)):
        # Dominance is transitive: whatever a dominated point dominates, its dominator does too.
        if mask[i]:
            dominated = np.all(p[i] <= p, axis=1) & np.any(p[i] < p, axis=1)
            mask[dominated] = False
    return mask


def pareto_front(points: ArrayLike) -> np.ndarray:
    """The distinct non-dominated points, sorted by the first objective (then the next ones)."""
    p = as_points(points)
    return np.unique(p[pareto_mask(p)], axis=0)  # np.unique sorts rows lexicographically


def hypervolume(points: ArrayLike, reference: Sequence[float]) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (minimisation).

    Points not strictly better than the reference in every objective add nothing. Exact: a
    sweep for two objectives, recursive slicing along the last objective for more (fine for
    fronts of a few hundred points).
    """
    ref = np.asarray(reference, dtype=float)
    if ref.ndim != 1 or not np.isfinite(ref).all():
        raise SlimformerError(f"reference must be a finite point, not {reference!r}")
    p = as_points(points, dims=len(ref))
    p = p[np.all(p < ref, axis=1)]
    if len(p) == 0:
        return 0.0
    return float(_hypervolume(p[pareto_mask(p)], ref))


def _hypervolume(p: np.ndarray, ref: np.ndarray) -> float:
    """The hypervolume of non-dominated points ``p``, all strictly better than ``ref``."""
    if p.shape[1] == 1:
        return float(ref[0] - p[:, 0].min())
    if p.shape[1] == 2:
        # Sorted by the first objective, the second one falls: sum the rectangles between steps.
        p = p[np.lexsort((p[:, 1], p[:, 0]))]
        right = np.append(p[1:, 0], ref[0])
        return float(np.sum((right - p[:, 0]) * (ref[1] - p[:, 1])))
    # Slice along the last objective: between two consecutive values, the cross-section is the
    # (m-1)-dimensional hypervolume of the points at or below the slice.
    p = p[np.argsort(p[:, -1], kind="stable")]
    volume = 0.0
    for i in range(len(p)):
        top = p[i + 1, -1] if i + 1 < len(p) else ref[-1]
        if top > p[i, -1]:
            section = p[: i + 1, :-1]
            volume += (top - p[i, -1]) * _hypervolume(section[pareto_mask(section)], ref[:-1])
    return volume


def default_reference(points: ArrayLike, margin: float = 0.1) -> list[float]:
    """A reference point just worse than every point: each objective's worst finite value plus ``margin`` of its range.

    The margin lets the extreme points of the front add volume. An objective with a single
    value gets ``margin`` of its magnitude (or of 1).
    """
    p = as_points(points)
    ref = []
    for column in p.T:
        finite = column[np.isfinite(column)]
        if len(finite) == 0:
            raise SlimformerError("no finite objective values to place a reference point by")
        worst, span = finite.max(), finite.max() - finite.min()
        ref.append(float(worst + margin * (span if span > 0 else max(abs(worst), 1.0))))
    return ref


def front_figure(
    series: Mapping[str, ArrayLike],
    labels: tuple[str, str] = ("objective 1", "objective 2"),
    reference: Sequence[float] | None = None,
    title: str | None = None,
    log_y: bool | None = None,
):
    """The matplotlib ``Figure`` that :func:`plot_front` saves (same arguments, no path)."""
    # The object-oriented API draws with Agg (or the file format's own backend) without
    # touching pyplot's global figure state.
    from matplotlib.figure import Figure

    if not series:
        raise SlimformerError("a front plot needs at least one series of points")
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        p = as_points(points, dims=2)
        color = f"C{i % 10}"
        ax.scatter(p[:, 0], p[:, 1], s=12, color=color, alpha=0.25, linewidths=0)
        front = pareto_front(p[np.isfinite(p).all(axis=1)])
        if len(front):
            ax.step(front[:, 0], front[:, 1], where="post", color=color, marker="o", markersize=4, label=name)
    if reference is not None:
        ax.scatter([reference[0]], [reference[1]], marker="x", color="0.4", label="hypervolume reference point")
    if log_y is None:
        ys = np.concatenate([as_points(points, dims=2)[:, 1] for points in series.values()])
        ys = ys[np.isfinite(ys)]
        log_y = bool(len(ys)) and ys.min() > 0 and ys.max() / ys.min() > 1e3
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_front(
    series: Mapping[str, ArrayLike],
    path: str | Path,
    labels: tuple[str, str] = ("objective 1", "objective 2"),
    reference: Sequence[float] | None = None,
    title: str | None = None,
    log_y: bool | None = None,
) -> Path:
    """Plot two-objective points: every point faint, each series' Pareto front as a step line with markers.

    ``series`` maps a name (e.g. ``"search"``, ``"importance pruning"``) to its points, so
    several fronts share one plot. The format follows the suffix of ``path`` (``.png``,
    ``.svg``, ``.pdf``). ``log_y`` puts the second objective on a log scale; by default it
    does so when that objective is positive and spans more than three orders of magnitude
    (perplexities of heavily pruned models), where a linear axis would flatten the front.
    Returns ``path``.
    """
    path = Path(path)
    fig = front_figure(series, labels=labels, reference=reference, title=title, log_y=log_y)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path
