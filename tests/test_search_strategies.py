"""Search strategies on a synthetic problem with a known front; Pareto masks, hypervolumes, resuming, Ray, plots."""

import itertools
import json
import math
import sys

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage

from slimformer import SlimformerError
from slimformer.search.pareto import (default_reference, front_figure, hypervolume, pareto_front, pareto_mask,
                                      plot_front)
from slimformer.search.strategies import STRATEGIES, STUDY_NAME, SearchResult, neighbour, run_search

SPACE = {f"x{i}": IntDistribution(0, 10) for i in range(5)}
OBJECTIVES = ("f1", "f2")
REFERENCE = (1.1, 2.1)
LARGEST, SMALLEST = {f"x{i}": 10 for i in range(5)}, {f"x{i}": 0 for i in range(5)}


def synthetic(params):
    """Two objectives whose front is x1..x4 = 0: f1 = x0/10, f2 = 1 - sqrt(x0/10) + sum(x1..x4)/40."""
    x0 = params["x0"] / 10
    return x0, 1 - math.sqrt(x0) + sum(params[f"x{i}"] for i in range(1, 5)) / 40


TRUE_FRONT = [synthetic({**SMALLEST, "x0": k}) for k in range(11)]


def search(strategy, trials, **kw):
    kw.setdefault("population", 10 if strategy == "nsga2" else None)
    return run_search(SPACE, synthetic, objectives=OBJECTIVES, strategy=strategy, trials=trials, progress=False, **kw)


def journal(path):
    return JournalStorage(JournalFileBackend(str(path)))


def brute_force_mask(p):
    return np.array([not any(np.all(q <= x) and np.any(q < x) for q in p) for x in p])


def brute_force_hypervolume(p, ref):
    """Exact volume of the union of boxes [point, ref], on the grid of every coordinate."""
    axes = [np.unique(np.append(p[:, k], ref[k])) for k in range(len(ref))]
    volume = 0.0
    for cell in itertools.product(*(range(len(a) - 1) for a in axes)):
        lower = np.array([a[i] for a, i in zip(axes, cell)])
        if np.any(np.all(p <= lower, axis=1)):
            volume += np.prod([a[i + 1] - a[i] for a, i in zip(axes, cell)])
    return volume


@pytest.mark.parametrize("m", [2, 3])
def test_pareto_mask_matches_brute_force(m):
    p = np.random.default_rng(m).integers(0, 6, size=(60, m)).astype(float)  # small ints: many ties
    mask = pareto_mask(p)
    assert (mask == brute_force_mask(p)).all()
    assert 0 < mask.sum() < len(p)


def test_pareto_mask_keeps_equal_points_and_front_drops_them():
    p = [[1, 2], [1, 2], [2, 3], [0, 5], [0, 6]]
    assert pareto_mask(p).tolist() == [True, True, False, True, False]
    assert pareto_front(p).tolist() == [[0, 5], [1, 2]]
    with pytest.raises(SlimformerError, match="NaN"):
        pareto_mask([[0, float("nan")]])


def test_hypervolume_by_hand():
    # Staircase (1,3), (2,2), (3,1) under (4,4): 1*1 + 1*2 + 1*3; a dominated point and one beyond
    # the reference add nothing.
    assert hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0]], (4, 4)) == pytest.approx(6)
    assert hypervolume([[0, 0, 0]], (1, 2, 3)) == pytest.approx(6)
    # Two boxes of 4 and 2 overlapping in a unit cube.
    assert hypervolume([[0, 0, 1], [1, 1, 0]], (2, 2, 2)) == pytest.approx(5)
    assert hypervolume([[5, 5]], (4, 4)) == 0.0


@pytest.mark.parametrize("m", [2, 3, 4])
def test_hypervolume_matches_brute_force(m):
    rng = np.random.default_rng(m)
    p = rng.random((12, m)).round(2)
    ref = np.full(m, 0.9)  # some points lie beyond it
    assert hypervolume(p, ref) == pytest.approx(brute_force_hypervolume(p[np.all(p < ref, axis=1)], ref))


def test_default_reference_is_just_worse_than_every_point():
    assert default_reference([[0, 1], [1, 3], [2, math.inf]]) == pytest.approx([2.2, 3.2])


# Trials and the share of the true front's hypervolume each strategy reaches. Random search
# cannot come within a few % on 11^5 points (0.83-0.90 over seeds, at 60 to 150 trials);
# NSGA-II needs a few generations (0.93-0.99 at 150 trials); local search gets there in 60.
QUALITY = {"random": (60, 0.80), "local": (60, 0.95), "nsga2": (150, 0.93)}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_approaches_the_known_front(strategy):
    trials, share = QUALITY[strategy]
    result = search(strategy, trials, initial=[LARGEST, SMALLEST])
    assert hypervolume(result.points(), REFERENCE) >= share * hypervolume(TRUE_FRONT, REFERENCE)
    assert len(result.trials) == trials
    assert [t["params"] for t in result.trials[:2]] == [LARGEST, SMALLEST]
    assert result.pareto == np.flatnonzero(pareto_mask(result.points())).tolist()
    assert result.hypervolume == pytest.approx(hypervolume(result.points(), result.reference))
    assert all(t["seconds"] >= 0 for t in result.trials)


def test_guided_strategies_beat_random_search():
    volume = {s: hypervolume(search(s, 150, initial=[LARGEST, SMALLEST]).points(), REFERENCE) for s in STRATEGIES}
    assert volume["local"] > volume["random"] * 1.03 and volume["nsga2"] > volume["random"] * 1.03


def test_nsga2_runs_optuna_nsga2_generations(tmp_path):
    run_search(SPACE, synthetic, objectives=OBJECTIVES, strategy="nsga2", trials=40, population=10,
               storage=tmp_path / "s.journal", progress=False)
    study = optuna.load_study(study_name=STUDY_NAME, storage=journal(tmp_path / "s.journal"))
    generations = [t.system_attrs["NSGAIISampler:generation"] for t in study.trials]
    assert generations == sorted(generations) and max(generations) >= 3


def comparable(result):
    return [(t["params"], t["values"]) for t in result.trials]


@pytest.mark.parametrize("stop", [1, 5])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_stopped_search_resumes_to_the_same_trials(tmp_path, strategy, stop):
    kw = dict(seed=3, initial=[LARGEST, SMALLEST], population=4 if strategy == "nsga2" else None)
    whole = search(strategy, 12, **kw)
    calls = []

    def interrupted(params):
        calls.append(params)
        if len(calls) == stop + 1:
            raise KeyboardInterrupt
        return synthetic(params)

    path = tmp_path / "s.journal"
    with pytest.raises(KeyboardInterrupt):
        run_search(SPACE, interrupted, objectives=OBJECTIVES, strategy=strategy, trials=12, storage=path,
                   progress=False, **kw)
    # A process killed mid-trial leaves a running trial behind.
    optuna.load_study(study_name=STUDY_NAME, storage=journal(path), sampler=optuna.samplers.RandomSampler()).ask(SPACE)
    resumed = search(strategy, 12, storage=path, **kw)
    assert comparable(resumed) == comparable(whole)
    assert len(calls) == stop + 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_shorter_search_continues_to_the_same_trials(tmp_path, strategy):
    kw = dict(seed=1, population=4 if strategy == "nsga2" else None)
    whole = search(strategy, 12, **kw)
    first = search(strategy, 5, storage=tmp_path / "s.journal", **kw)
    resumed = search(strategy, 12, storage=tmp_path / "s.journal", **kw)
    assert comparable(first) == comparable(whole)[:5]
    assert comparable(resumed) == comparable(whole)
    assert comparable(search(strategy, 12, seed=2, population=kw["population"])) != comparable(whole)


def test_resuming_with_other_settings_is_refused(tmp_path):
    search("random", 3, storage=tmp_path / "s.journal")
    with pytest.raises(SlimformerError, match="strategy"):
        search("nsga2", 3, storage=tmp_path / "s.journal")


def test_ray_backend_is_as_good_and_deterministic():
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    trials, share = QUALITY["local"]
    first = search("local", trials, backend="ray", batch=2, initial=[LARGEST, SMALLEST])
    assert not ray.is_initialized()  # started for the search and stopped after it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        second = search("local", trials, backend="ray", batch=2, initial=[LARGEST, SMALLEST])
        assert ray.is_initialized()  # the caller's Ray is left running
    finally:
        ray.shutdown()
    assert comparable(first) == comparable(second)
    assert hypervolume(first.points(), REFERENCE) >= share * hypervolume(TRUE_FRONT, REFERENCE)
    assert comparable(first) != comparable(search("local", trials, initial=[LARGEST, SMALLEST]))  # batches of 2


def test_result_saves_and_loads(tmp_path):
    result = search("random", 6, reference=REFERENCE)
    assert result.reference == list(REFERENCE)
    path = result.save(tmp_path / "out" / "search.json")
    assert SearchResult.load(path) == result
    assert json.loads(path.read_text())["objectives"] == list(OBJECTIVES)
    assert sorted(p.name for p in path.parent.iterdir()) == ["search.json"]
    with pytest.raises(SlimformerError, match="not a search result"):
        SearchResult.from_json('{"objectives": []}')


def test_plot_front_writes_a_png(tmp_path):
    result = search("random", 20)
    path = plot_front({"search": result.points(), "true front": TRUE_FRONT}, tmp_path / "front.png",
                      labels=("relative size", "error"), reference=REFERENCE, title="synthetic")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5000
    with pytest.raises(SlimformerError, match="2"):
        plot_front({"3d": [[0, 1, 2]]}, tmp_path / "bad.png")


def test_front_plot_goes_logarithmic_when_the_error_spans_orders_of_magnitude():
    perplexities = [(1.0, 27.5), (0.8, 73.7), (0.6, 1470.0), (0.31, 4.0e9)]
    assert front_figure({"one-shot": perplexities}).axes[0].get_yscale() == "log"
    assert front_figure({"search": [(1.0, 0.2), (0.6, 0.35)]}).axes[0].get_yscale() == "linear"
    assert front_figure({"search": [(1.0, 0.2), (0.6, 0.35)]}, log_y=True).axes[0].get_yscale() == "log"
    assert front_figure({"signed": [(1.0, -5.0), (0.5, 1e6)]}).axes[0].get_yscale() == "linear"


def test_neighbours_are_one_step_away():
    rng = np.random.default_rng(0)
    assert {neighbour(IntDistribution(0, 10), 0, rng) for _ in range(20)} == {1}
    assert {neighbour(IntDistribution(0, 12, step=4), 4, rng) for _ in range(20)} == {0, 8}
    assert {neighbour(CategoricalDistribution(["a", "b", "c"]), "b", rng) for _ in range(20)} == {"a", "c"}
    assert {neighbour(FloatDistribution(0, 1, step=0.25), 1.0, rng) for _ in range(20)} == {0.75}


def test_bad_input_is_refused():
    with pytest.raises(SlimformerError, match="random, local, nsga2"):
        search("grid", 3)
    with pytest.raises(SlimformerError, match="local, ray"):
        search("random", 3, backend="dask")
    with pytest.raises(SlimformerError, match="x0"):
        search("random", 3, initial=[{"x0": 11, **{f"x{i}": 0 for i in range(1, 5)}}])
    with pytest.raises(SlimformerError, match="2 numbers"):
        run_search(SPACE, lambda p: (1.0,), objectives=OBJECTIVES, strategy="random", trials=3, progress=False)
    with pytest.raises(SlimformerError, match="population"):
        search("random", 3, population=10)
