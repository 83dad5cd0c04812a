"""The benchmarks' comparison of a searched front with a baseline: dominance and the paired margin."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import dominance_margin, dominates, paired_margin  # noqa: E402


def test_dominance():
    assert dominates([(0.5, 0.2), (1.0, 0.1)], [(0.5, 0.3), (1.0, 0.1)])
    assert not dominates([(0.5, 0.2)], [(0.4, 0.3)])


def test_dominance_margin_is_the_closest_gap_and_its_sign_is_dominance():
    import math

    front = [(0.5, 0.2), (1.0, 0.1)]
    assert dominance_margin(front, [(0.5, 0.3), (1.0, 0.1)]) == pytest.approx(0.0)
    assert dominance_margin(front, [(0.6, 0.25), (0.9, 0.3)]) == pytest.approx(0.05)
    assert dominance_margin(front, [(0.6, 0.15)]) == pytest.approx(-0.05)
    assert not dominates(front, [(0.6, 0.15)])
    assert dominance_margin(front, [(0.4, 0.9)]) == -math.inf


def test_paired_margin_compares_each_point_with_pruning_to_its_own_size():
    point = lambda size, acc: {"params": size, "dev": {"accuracy": acc}}  # noqa: E731
    pruned = lambda size, got, acc: {"target": size, "params": got, "dev": {"accuracy": acc}}  # noqa: E731
    front = [point(0.5502, 0.70), point(0.6801, 0.80), point(1.0, 0.85)]
    at_sizes = [pruned(0.55, 0.551, 0.60), pruned(0.68, 0.6797, 0.78)]
    assert paired_margin(front, at_sizes) == pytest.approx(0.02)  # the full model has no pair
    # pruning landed just below 0.68, so weak dominance compares it with the 0.55 point instead
    errors = lambda rows: [(r["params"], 1 - r["dev"]["accuracy"]) for r in rows]  # noqa: E731
    assert dominance_margin(errors(front), errors(at_sizes)) == pytest.approx(-0.08)
    assert paired_margin(front, [pruned(0.68, 0.6797, 0.81)]) == pytest.approx(-0.01)
    assert paired_margin(front, []) == float("inf")
