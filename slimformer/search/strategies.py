"""Multi-objective search (random, local search, NSGA-II) on optuna's ask-and-tell: resumable, in-process or on Ray.

This is the second stage of Klein et al. 2024 ("Structural Pruning of Pre-trained Language
Models via Neural Architecture Search", arXiv:2405.02267): given a space of sub-networks (a
dict of optuna distributions) and ``evaluate(params) -> (objective, ...)``, all minimised
(e.g. error and relative size), find the Pareto set. Nothing here knows about models.

Strategies: ``random`` is optuna's ``RandomSampler``; ``nsga2`` optuna's ``NSGAIISampler``;
``local`` is :class:`LocalSearchSampler`, the paper's local search: after a few random trials,
take a random Pareto-optimal trial and move one or a few of its parameters to a neighbouring
value.

Determinism and resuming: optuna's samplers draw from a numpy ``RandomState`` seeded once
(``RandomSampler`` keeps one, ``NSGAIISampler`` one for crossover and mutation plus its
``RandomSampler``), so a restarted process would replay the first trials' draws instead of
continuing them. Here each trial gets a fresh sampler seeded from ``(seed, slot)``, the slot
being the trial's position among the trials that did not fail. These samplers keep nothing
else between trials (NSGA-II's generations and parents live in the study), so what a trial
samples depends only on the seed, its slot and the history in the study. With ``storage``, the
study lives in an optuna journal file; trials that were running when a process died are marked
failed and their slots asked again. So a run stopped and resumed gives the same trials, in
order, as one that never stopped (on Ray: when stopped between batches).

Ray: each batch of asked trials runs as Ray tasks, and the results are told back in trial
order, so a run is deterministic for a given batch size. ``evaluate`` is put into Ray's
object store once per run (``ray.put``), not pickled into every task; each task deserialises
it there. It must be picklable and importable in the workers (defined in an installed package,
the driver script or the working directory, or registered with
``cloudpickle.register_pickle_by_value``).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)
from optuna.samplers import BaseSampler, NSGAIISampler, RandomSampler
from optuna.search_space import intersection_search_space
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState
from tqdm.auto import tqdm

from slimformer.errors import SlimformerError
from slimformer.files import write_text
from slimformer.search.pareto import default_reference, hypervolume, pareto_mask

STRATEGIES = ("random", "local", "nsga2")
BACKENDS = ("local", "ray")
STUDY_NAME = "slimformer-search"
DEFAULT_POPULATION = 20  # NSGA-II individuals per generation (optuna's default of 50 suits longer runs)

Space = Mapping[str, BaseDistribution]
Params = dict[str, Any]
Evaluate = Callable[[Params], Sequence[float]]


@dataclass
class SearchResult:
    """The completed trials of a search, which of them are Pareto-optimal, and their hypervolume."""

    objectives: list[str]
    trials: list[dict]  # {"number", "params", "values", "seconds"}, in trial order
    pareto: list[int]  # indices into ``trials`` of the non-dominated ones
    hypervolume: float
    reference: list[float]  # the reference point of ``hypervolume``
    strategy: str = ""
    seed: int = 0

    @classmethod
    def build(
        cls,
        objectives: Sequence[str],
        trials: list[dict],
        reference: Sequence[float] | None = None,
        *,
        strategy: str = "",
        seed: int = 0,
    ) -> SearchResult:
        """A result from trial rows: the Pareto set and its hypervolume (reference: :func:`default_reference`)."""
        points = np.array([t["values"] for t in trials], dtype=float).reshape(len(trials), len(objectives))
        if reference is None:
            reference = default_reference(points) if len(points) else [math.inf] * len(objectives)
        reference = [float(r) for r in reference]
        front = [int(i) for i in np.flatnonzero(pareto_mask(points))] if len(points) else []
        volume = hypervolume(points, reference) if len(points) and all(map(math.isfinite, reference)) else 0.0
        return cls(list(objectives), trials, front, volume, reference, strategy, seed)

    def points(self) -> np.ndarray:
        """The objective values of every trial, an ``(n, m)`` array."""
        return np.array([t["values"] for t in self.trials], dtype=float).reshape(len(self.trials), len(self.objectives))

    def pareto_trials(self) -> list[dict]:
        """The Pareto-optimal trials, in trial order."""
        return [self.trials[i] for i in self.pareto]

    def to_json(self) -> str:
        """The result as a JSON document."""
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SearchResult:
        """A result from :meth:`to_json`'s document."""
        try:
            return cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as e:
            raise SlimformerError(f"not a search result: {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` through a temporary file and a rename (never a half-written file)."""
        return write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> SearchResult:
        """Read a result written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise SlimformerError(f"no search result at {path}")
        return cls.from_json(path.read_text())


class LocalSearchSampler(BaseSampler):
    """Klein et al.'s local search: a random Pareto-optimal trial with one or a few parameters moved to a neighbour.

    The first ``warmup`` completed trials (initial points included) are random. Then each
    trial takes a random non-dominated completed trial and changes 1 to ``max_changes`` of its
    parameters: usually one step to a neighbouring value (:func:`neighbour`), and with
    probability ``jump`` to a uniformly drawn value, the move of Klein et al.'s own local
    search, which lets it leave a region that single steps improve slowly. A candidate already
    evaluated or running is drawn again, up to ``tries`` times, then a random point is taken.
    """

    def __init__(self, *, seed: int | None = None, warmup: int = 4, max_changes: int = 2, jump: float = 0.3,
                 tries: int = 20):
        if warmup < 1 or max_changes < 1 or tries < 1 or not 0 <= jump <= 1:
            raise SlimformerError("warmup, max_changes and tries must be at least 1, and jump in [0, 1]")
        self._rng = np.random.default_rng(seed)
        self._random = RandomSampler(seed=seed)
        self._warmup, self._max_changes, self._jump, self._tries = warmup, max_changes, jump, tries

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {name: d for name, d in intersection_search_space(done).items() if not d.single()}

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> Params:
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < self._warmup or not search_space:
            return {}
        signs = np.array([1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions])
        front = [done[i] for i in np.flatnonzero(pareto_mask(np.array([t.values for t in done]) * signs))]
        seen = {_key(t.params) for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
        names = list(search_space)
        for _ in range(self._tries):
            parent = front[self._rng.integers(len(front))]
            params = {name: parent.params[name] for name in names}
            changes = self._rng.integers(1, min(self._max_changes, len(names)) + 1)
            for name in (names[i] for i in self._rng.choice(len(names), size=changes, replace=False)):
                if self._rng.random() < self._jump:
                    params[name] = self._random.sample_independent(study, trial, name, search_space[name])
                else:
                    params[name] = neighbour(search_space[name], params[name], self._rng)
            if _key({**parent.params, **params}) not in seen:
                return params
        return {}

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)


def neighbour(distribution: BaseDistribution, value: Any, rng: np.random.Generator) -> Any:
    """A value next to ``value`` in ``distribution``, one step up or down (down or up at the bounds)."""
    sign = 1 if rng.random() < 0.5 else -1
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        i = choices.index(value)
        j = i + sign if 0 <= i + sign < len(choices) else i - sign
        return choices[min(max(j, 0), len(choices) - 1)]
    low, high = distribution.low, distribution.high
    if isinstance(distribution, IntDistribution):
        delta = max(1, round(value * 0.1)) if distribution.log else distribution.step
        moved = value + sign * delta if low <= value + sign * delta <= high else value - sign * delta
        return int(min(max(moved, low), high))
    if isinstance(distribution, FloatDistribution):
        if distribution.log:
            factor = math.exp((math.log(high) - math.log(low)) * 0.1)
            moved = value * factor**sign if low <= value * factor**sign <= high else value / factor**sign
        else:
            delta = (high - low) * 0.1
            if distribution.step is not None:  # stay on the grid, at least one step away
                delta = max(distribution.step, round(delta / distribution.step) * distribution.step)
            moved = value + sign * delta if low <= value + sign * delta <= high else value - sign * delta
        return float(min(max(moved, low), high))
    raise SlimformerError(f"unsupported distribution {type(distribution).__name__}")


def _key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def trial_seed(seed: int, slot: int) -> int:
    """The seed of the sampler for the trial in position ``slot`` of a search seeded with ``seed``."""
    return int(np.random.SeedSequence((seed, slot)).generate_state(1)[0])


class PerTrialSeedSampler(BaseSampler):
    """Runs a fresh ``factory(seed)`` sampler for each trial, seeded by :func:`trial_seed` from the trial's slot.

    The slot is the number of earlier trials that did not fail, so a trial asked again after a
    failure or a killed process samples as the lost one would have. Fit for samplers whose only
    state across trials is their RNG (random, NSGA-II, local search).
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int):
        self.factory, self.seed = factory, seed
        self.sampler = factory(seed)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        earlier = study.get_trials(deepcopy=False)
        slot = sum(1 for t in earlier if t.number < trial.number and t.state != TrialState.FAIL)
        self.sampler = self.factory(trial_seed(self.seed, slot))
        self.sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> Params:
        return self.sampler.sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self.sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.sampler.after_trial(study, trial, state, values)


def make_sampler(strategy: str, seed: int = 0, population: int | None = None) -> BaseSampler:
    """The optuna sampler of ``strategy``, reseeded per trial (``population``: NSGA-II's generation size)."""
    if strategy not in STRATEGIES:
        raise SlimformerError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if population is not None and strategy != "nsga2":
        raise SlimformerError(f"population applies to the nsga2 strategy, not {strategy}")
    if strategy == "random":
        factory: Callable[..., BaseSampler] = RandomSampler
    elif strategy == "local":
        factory = LocalSearchSampler
    else:
        population = DEFAULT_POPULATION if population is None else population
        if population < 2:
            raise SlimformerError(f"population must be at least 2, not {population}")
        factory = functools.partial(NSGAIISampler, population_size=population)
    return PerTrialSeedSampler(lambda s: factory(seed=s), seed)


def run_search(
    space: Space,
    evaluate: Evaluate,
    *,
    objectives: Sequence[str],
    strategy: str = "nsga2",
    trials: int = 100,
    seed: int = 0,
    storage: Path | str | None = None,
    backend: str = "local",
    batch: int | None = None,
    population: int | None = None,
    progress: bool = True,
    initial: list[Params] | None = None,
    reference: Sequence[float] | None = None,
    seconds: float | None = None,
) -> SearchResult:
    """Search ``space`` for the Pareto set of ``evaluate``'s objectives (all minimised) until ``trials`` are complete.

    With ``seconds``, no trial starts once that much wall-clock time has passed (the trial
    running then finishes), so a search with a time budget may end with fewer trials.

    ``initial`` points (e.g. the largest and smallest sub-network) are the first trials.
    With ``storage`` (a journal file) the search resumes where a previous call stopped; one
    process at a time per file. ``backend="ray"`` evaluates ``batch`` trials at a time as Ray
    tasks (default: the CPUs Ray sees), starting and stopping a local Ray when none is running.
    ``reference`` is the hypervolume's reference point (default: :func:`default_reference`).
    An exception from ``evaluate`` fails its trial and stops the search.
    """
    _check_space(space)
    objectives = list(objectives)
    if not objectives or len(set(objectives)) != len(objectives):
        raise SlimformerError(f"objectives must be distinct names, at least one, not {objectives}")
    if backend not in BACKENDS:
        raise SlimformerError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if trials < 1:
        raise SlimformerError(f"trials must be at least 1, not {trials}")
    if not isinstance(seed, int) or seed < 0:
        raise SlimformerError(f"seed must be a non-negative integer, not {seed!r}")
    if batch is not None and (backend != "ray" or batch < 1):
        raise SlimformerError(f"batch must be at least 1 and applies to the ray backend only, not {batch}")
    if reference is not None and len(reference) != len(objectives):
        raise SlimformerError(f"reference has {len(reference)} values for {len(objectives)} objectives")
    initial = [dict(p) for p in initial or []]
    for params in initial:
        _check_params(space, params)
    sampler = make_sampler(strategy, seed, population)
    if strategy == "nsga2" and population is None:
        population = DEFAULT_POPULATION  # stored with the settings, so a resumed run uses the same
    settings = {"strategy": strategy, "seed": seed, "objectives": objectives, "population": population,
                "space": {name: distribution_to_json(d) for name, d in space.items()}}
    with _quiet_optuna():
        study = _open_study(storage, sampler, settings)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)  # left running by a process that died
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        with tqdm(total=trials, initial=min(done, trials), desc=f"search ({strategy})", unit="trial",
                  disable=not progress) as bar:
            loop = _run_local if backend == "local" else _run_ray
            deadline = None if seconds is None else time.monotonic() + seconds
            loop(study, dict(space), evaluate, trials, initial, len(objectives), bar, batch, deadline)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [{"number": t.number, "params": dict(t.params), "values": list(t.values),
             "seconds": t.user_attrs.get("seconds")} for t in complete]
    return SearchResult.build(objectives, rows, reference, strategy=strategy, seed=seed)


def _check_space(space: Space) -> None:
    if not isinstance(space, Mapping) or not space:
        raise SlimformerError("the search space must be a non-empty dict of optuna distributions")
    for name, d in space.items():
        if not isinstance(d, (IntDistribution, FloatDistribution, CategoricalDistribution)):
            raise SlimformerError(f"search space entry '{name}' is not an optuna Int/Float/Categorical distribution")


def _check_params(space: Space, params: Params) -> None:
    """Raise unless ``params`` gives every parameter of ``space`` a value it contains."""
    if set(params) != set(space):
        raise SlimformerError(f"initial point {params} must give exactly the parameters {', '.join(space)}")
    for name, value in params.items():
        d = space[name]
        if isinstance(d, CategoricalDistribution):
            ok = value in d.choices
        elif isinstance(d, IntDistribution):
            ok = isinstance(value, (int, np.integer)) and d.low <= value <= d.high and (value - d.low) % d.step == 0
        else:
            ok = isinstance(value, (int, float, np.number)) and d.low <= value <= d.high
        if not ok:
            raise SlimformerError(f"initial value {name}={value!r} is not in its distribution {d}")


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Silence optuna's line per trial (the progress bar says it), restoring its verbosity after."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def _open_study(storage: Path | str | None, sampler: BaseSampler, settings: dict) -> Study:
    """A new in-memory study, or the journal file's study (created if new) after checking it has the same settings."""
    directions = ["minimize"] * len(settings["objectives"])
    if storage is None:
        return optuna.create_study(directions=directions, sampler=sampler, study_name=STUDY_NAME)
    path = Path(storage)
    if path.is_dir():
        raise SlimformerError(f"storage {path} is a directory; give a file for the search journal")
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = JournalStorage(JournalFileBackend(str(path)))
    study = optuna.create_study(storage=journal, study_name=STUDY_NAME, directions=directions, sampler=sampler,
                                load_if_exists=True)
    settings = json.loads(json.dumps(settings))  # as the journal stores it: tuples become lists
    stored = study.user_attrs.get("slimformer")
    if stored is None:
        study.set_user_attr("slimformer", settings)
    elif stored != settings:
        changed = ", ".join(k for k in settings if stored.get(k) != settings[k])
        raise SlimformerError(f"{path} holds a search with other settings ({changed}); resume with the same ones "
                              "or use another file")
    return study


def _ask(study: Study, space: Space, initial: list[Params]) -> Trial:
    """The next trial: the initial point of its slot if there is one, else the sampler's."""
    slot = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)))
    # An initial point enqueued by a process that died before asking it is still waiting.
    if slot < len(initial) and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial(initial[slot])
    return study.ask(space)


def _tell(study: Study, trial: Trial, result: Any, seconds: float, count: int) -> None:
    """Tell ``evaluate``'s ``result`` for ``trial``; a malformed result fails the trial and raises."""
    try:
        values = [float(v) for v in result]
    except (TypeError, ValueError):
        values = []
    if len(values) != count or any(math.isnan(v) for v in values):
        study.tell(trial, state=TrialState.FAIL)
        raise SlimformerError(f"evaluate must return {count} numbers (not NaN), one per objective; "
                              f"it returned {result!r} for {trial.params}")
    trial.set_user_attr("seconds", seconds)
    study.tell(trial, values)


def _in_time(deadline: float | None) -> bool:
    return deadline is None or time.monotonic() < deadline


def _run_local(study: Study, space: Space, evaluate: Evaluate, trials: int, initial: list[Params], count: int,
               bar: tqdm, batch: int | None, deadline: float | None = None) -> None:
    """Ask, evaluate in this process and tell, one trial at a time."""
    while len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < trials and _in_time(deadline):
        trial = _ask(study, space, initial)
        start = time.perf_counter()
        try:
            result = evaluate(dict(trial.params))
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        _tell(study, trial, result, time.perf_counter() - start, count)
        bar.update()


def _run_ray(study: Study, space: Space, evaluate: Evaluate, trials: int, initial: list[Params], count: int,
             bar: tqdm, batch: int | None, deadline: float | None = None) -> None:
    """Ask a batch, evaluate it as Ray tasks, and tell the results in trial order."""
    import logging

    try:
        import ray
    except ImportError:
        raise SlimformerError("--backend ray needs the 'ray' extra: pip install 'slimformer[ray]'") from None

    def timed(evaluate: Evaluate, params: Params) -> tuple[Any, float]:
        # Defined here so that Ray ships it by value: a worker need not import slimformer (and torch).
        start = time.perf_counter()
        result = evaluate(params)
        return result, time.perf_counter() - start

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=batch or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    try:
        size = batch or max(1, int(ray.cluster_resources().get("CPU", 1)))
        task = ray.remote(num_cpus=1)(timed)
        shared = ray.put(evaluate)  # once per run; each task reads it from the object store
        while (done := len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))) < trials and \
                _in_time(deadline):
            asked = [_ask(study, space, initial) for _ in range(min(size, trials - done))]
            futures = [task.remote(shared, dict(t.params)) for t in asked]
            try:
                for trial, future in zip(asked, futures):
                    result, seconds = ray.get(future)
                    _tell(study, trial, result, seconds, count)
                    bar.update()
            except BaseException:
                for future in futures:
                    ray.cancel(future)  # a no-op for the finished ones
                for trial in asked:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
    finally:
        if started:
            ray.shutdown()
