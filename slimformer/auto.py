"""Cross-method search to a budget: the recipe whose model is best under a size, speed or perplexity target (``slimformer auto``).

Users ask for an outcome, not a method: "the best model 4× smaller" (``size=0.25``), "the best
model that decodes twice as fast" (``speed=2``), "the smallest model within 10% perplexity"
(``ppl=+10%``). :func:`auto` searches recipes that combine every family (blocks removed by
block influence, sparsity and its pattern, bits and group size with RTN, GPTQ or AWQ, the head
quantized or not, distillation to recover or not; :class:`AutoSpace`) with optuna's
multi-objective samplers (``slimformer.search.strategies``). Each candidate is scored cheaply:

- quality: perplexity on a few windows of the calibration text after the candidate's steps
  ran with a small calibration set, divided by the dense model's;
- size: bytes of the candidate as saved, divided by the dense model's;
- speed: the dense model's decode step divided by the candidate's, both predicted by
  :class:`~slimformer.evaluation.cost.DecodeCost` (the candidate's own layers timed on this
  machine, plus a per-block overhead calibrated on the dense model's measured decode step).

The result is the Pareto front of all three. The best candidate under the target (lowest
perplexity for a size or speed target; smallest for a perplexity target) is then run as a full
recipe (the recipe runner, with the full calibration set, a larger recovery budget and the
recipe's own measurement), whose measured figures are reported beside the predicted ones. The
output folder holds the model, ``recipe.yaml`` (rerun it with ``slimformer run``), ``auto.json``
(every candidate, the front, the choice, predicted and measured figures) and a report with the
front. A target no candidate meets fails with the closest candidate named.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optuna.distributions import CategoricalDistribution, IntDistribution

from slimformer.data import load_text, tokenize
from slimformer.errors import SlimformerError
from slimformer.evaluation import DecodeCost, measure_costs, size_on_disk
from slimformer.files import write_json, write_text
from slimformer.methods import (AWQConfig, DistillConfig, GPTQConfig, RTNConfig, SLEBConfig, WandaConfig, WidthConfig,
                                config_dict)
from slimformer.models import LoadedModel, load_model, save_model
from slimformer.models.adapters import get_adapter, weight_shape
from slimformer.recipes import Calibration, Measure, Recipe, apply_steps, run_recipe
from slimformer.search.decoder import calibration_perplexity
from slimformer.search.pareto import pareto_mask
from slimformer.search.strategies import run_search

AXES = ("size", "speed", "ppl")
OBJECTIVES = ("ppl", "size", "latency")  # all minimised: perplexity and size relative to dense, 1 / speed-up
_TARGET_HELP = "give size=FRACTION, speed=FACTOR or ppl=+PERCENT (for example size=0.25, speed=2, ppl=+10%)"


@dataclass(frozen=True)
class Target:
    """What the user asks for: ``size`` ≤ a fraction of the dense bytes, ``speed`` ≥ a decode speed-up, or ``ppl`` ≤ dense × (1 + value)."""

    axis: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Target:
        """``size=0.25``, ``speed=2`` (or ``2x``), ``ppl=+10%``; anything else fails in one line."""
        axis, sep, raw = str(text).strip().lower().replace(" ", "").partition("=")
        if not sep or axis not in AXES:
            raise SlimformerError(f"cannot read the target '{text}': {_TARGET_HELP}")
        number = raw.lstrip("+").removesuffix("%" if axis == "ppl" else "x")
        try:
            value = float(number)
        except ValueError:
            raise SlimformerError(f"cannot read the target '{text}': {_TARGET_HELP}") from None
        if axis == "ppl":
            if not raw.endswith("%"):
                raise SlimformerError(f"a perplexity target is a percentage over the dense model, such as ppl=+10%, "
                                      f"not '{text}'")
            value /= 100
        if not math.isfinite(value) or (axis == "size" and not 0 < value < 1) or (axis == "speed" and value <= 1) \
                or (axis == "ppl" and value < 0):
            bounds = {"size": "between 0 and 1 (a fraction of the dense size)", "speed": "above 1 (a speed-up)",
                      "ppl": "a non-negative percentage"}[axis]
            raise SlimformerError(f"the {axis} target must be {bounds}, not '{raw}'")
        return cls(axis, value)

    def describe(self) -> str:
        """The target as a user would write it."""
        return {"size": f"size ≤ {self.value:g} of dense", "speed": f"decode ≥ {self.value:g}× dense",
                "ppl": f"perplexity ≤ dense + {100 * self.value:g}%"}[self.axis]

    def shortfall(self, point: dict) -> float:
        """How far ``point`` is from the target, as a ratio: at most 1 when it meets it."""
        if self.axis == "size":
            return point["size"] / self.value
        if self.axis == "speed":
            return self.value / point["speed"]
        return point["ppl"] / (1 + self.value)

    def meets(self, point: dict) -> bool:
        """Whether ``point`` (``ppl``, ``size`` relative to dense, ``speed`` a speed-up) meets the target."""
        return self.shortfall(point) <= 1 + 1e-9

    def rank(self, point: dict) -> tuple[float, ...]:
        """Sort key among the points that meet the target: lowest perplexity first, or the smallest for ``ppl``."""
        if self.axis == "ppl":
            return point["size"], point["ppl"], -point["speed"]
        return point["ppl"], point["size"], -point["speed"]


def choose(points: Sequence[dict], target: Target) -> dict:
    """The best of ``points`` under ``target``; none meeting it fails with the closest one named."""
    if not points:
        raise SlimformerError("no candidate was scored: give the search more time (--budget) or trials")
    meeting = [p for p in points if target.meets(p)]
    if meeting:
        return min(meeting, key=target.rank)
    closest = min(points, key=lambda p: (target.shortfall(p), target.rank(p)))
    raise SlimformerError(f"no candidate meets {target.describe()}; the closest is {describe_point(closest)} "
                          f"({describe_params(closest['params'])})")


def describe_point(point: dict) -> str:
    """``ppl ×1.04, size 0.31, decode 1.6×`` of a scored candidate."""
    return f"ppl ×{point['ppl']:.3f}, size {point['size']:.3f} of dense, decode {point['speed']:.2f}×"


def describe_params(params: dict) -> str:
    """A candidate's recipe in a few words."""
    parts = []
    removed = params.get("blocks") or params.get("width", 1.0) < 1 or params.get("sparsity", "none") != "none"
    if params.get("blocks"):
        parts.append(f"{params['blocks']} blocks removed")
    if params.get("width", 1.0) < 1:
        parts.append(f"FFN width cut to {params['width']:.0%} of the parameters")
    if params.get("sparsity", "none") != "none":
        parts.append(f"Wanda {params['sparsity']}")
    if params.get("recovery") and removed:
        parts.append("distilled")
    if params.get("bits"):
        group = "" if params["bits"] == 8 or params.get("group", -1) == -1 else f" g{params['group']}"
        parts.append(f"{params.get('quantizer', 'rtn').upper()} int{params['bits']}{group}"
                     + (f", head int{params['head']}" if params.get("head") else ""))
    return ", ".join(parts) or "dense"


@dataclass(frozen=True)
class AutoSpace:
    """The recipes :func:`auto` searches, one optuna parameter per family.

    ``blocks``: 0 to ``max_block_ratio`` of the blocks removed by block influence (ShortGPT's
    criterion: one calibration pass, no loss-verified search); ``width``: the fraction of the
    parameters kept by cutting the least important FFN units (the ``width`` step; unit counts in
    multiples of ``width_align``, so every group size offered still divides every width); ``sparsity``: Wanda at a ratio or
    N:M pattern; ``bits`` (0: float) with ``group`` columns per scale for fewer than 8 bits (the
    sizes that divide every projection's input width) by ``quantizer``; ``head``: the head (and a
    tied embedding) quantized to that many bits with the body; ``recovery``: distillation from
    the original model after blocks or weights were removed, before quantization. Parameters a
    candidate does not use (the group of an 8-bit or float model) are ignored, and candidates
    that build the same recipe are scored once.
    """

    max_block_ratio: float = 0.2
    width: tuple[float, ...] = (1.0, 0.9, 0.8)
    width_align: int = 128
    sparsity: tuple[str, ...] = ("none", "2:4", "0.5")
    bits: tuple[int, ...] = (0, 8, 4)
    groups: tuple[int, ...] = (-1, 128, 64, 32)
    quantizers: tuple[str, ...] = ("rtn", "gptq", "awq")
    head: tuple[int, ...] = (0, 8)
    recovery: tuple[bool, ...] = (False, True)

    def distributions(self, adapter) -> dict:
        """The optuna search space for a model (its block count and projection widths)."""
        widths = {weight_shape(m)[1] for block in adapter.blocks for m in adapter.linears(block).values()}
        groups = [g for g in self.groups if g == -1 or all(w % g == 0 for w in widths)]
        return {
            "blocks": IntDistribution(0, int(self.max_block_ratio * len(adapter.blocks))),
            "width": CategoricalDistribution(list(self.width)),
            "sparsity": CategoricalDistribution(list(self.sparsity)),
            "bits": CategoricalDistribution(list(self.bits)),
            "group": CategoricalDistribution(groups),
            "quantizer": CategoricalDistribution(list(self.quantizers)),
            "head": CategoricalDistribution(list(self.head)),
            "recovery": CategoricalDistribution(list(self.recovery)),
        }

    def steps(self, params: dict, recovery_tokens: int, recovery_seqlen: int = 512) -> tuple:
        """The recipe steps of a candidate, in order: blocks, width, sparsity, recovery, quantization."""
        steps: list = []
        if params.get("blocks"):
            steps.append(SLEBConfig(blocks=params["blocks"], criterion="influence"))
        if params.get("width", 1.0) < 1:
            steps.append(WidthConfig(keep=params["width"], heads=False, align=self.width_align))
        sparsity = params.get("sparsity", "none")
        if sparsity != "none":
            steps.append(WandaConfig(pattern=sparsity) if ":" in sparsity else WandaConfig(sparsity=float(sparsity)))
        if params.get("recovery") and steps:
            steps.append(DistillConfig(tokens=recovery_tokens, seqlen=recovery_seqlen))
        bits = params.get("bits", 0)
        if bits:
            kind = {"rtn": RTNConfig, "gptq": GPTQConfig, "awq": AWQConfig}[params.get("quantizer", "rtn")]
            group = None if bits == 8 else params.get("group", -1)
            head = params.get("head", 0)
            steps.append(kind(bits=bits, group_size=group, head=bool(head), embedding=bool(head),
                              head_bits=head or 8))
        return tuple(steps)


@dataclass(frozen=True)
class AutoConfig:
    """How :func:`auto` searches and what it runs at the end.

    The search scores each candidate after running its steps with ``search_calibration``
    windows and ``search_recovery_tokens`` of distillation, on ``score_windows`` windows of
    ``score_seqlen`` tokens of the calibration text; it stops after ``trials`` candidates or
    ``budget_s`` seconds. The chosen recipe then runs with ``calibration``,
    ``recovery_tokens`` and ``measure``. Before that, the decode speed of the chosen candidate
    and of ``check_front`` other Pareto-optimal ones is measured beside the cost model's
    prediction (0: none).
    """

    target: Target
    space: AutoSpace = field(default_factory=AutoSpace)
    trials: int = 60
    budget_s: float | None = 1800.0
    strategy: str = "nsga2"
    seed: int = 0
    search_calibration: Calibration = field(default_factory=lambda: Calibration(nsamples=8, seqlen=512))
    score_windows: int = 4
    score_seqlen: int = 512
    search_recovery_tokens: int = 8192
    calibration: Calibration = field(default_factory=lambda: Calibration(nsamples=16, seqlen=1024))
    recovery_tokens: int = 40_000
    measure: Measure = field(default_factory=lambda: Measure(ppl_windows=8))
    speed_repeats: int = 3
    check_front: int = 2


Scorer = Callable[[dict], dict]


def search(space: dict, score: Scorer, target: Target, *, trials: int, seconds: float | None = None,
           strategy: str = "nsga2", seed: int = 0, initial: list[dict] | None = None, progress: bool = True) -> dict:
    """Search ``space`` (optuna distributions) with ``score(params) -> {ppl, size, speed}``; the points, front and choice.

    Returns ``{"points", "front", "chosen"}``: every scored point (params and figures, in trial
    order), the indices of the Pareto-optimal ones (perplexity, size and latency minimised), and
    the best point under ``target`` (:func:`choose`).
    """
    points: list[dict] = []

    def evaluate(params: dict) -> tuple[float, float, float]:
        figures = score(params)
        points.append({"params": params, **figures})
        return figures["ppl"], figures["size"], 1 / figures["speed"]

    run_search(space, evaluate, objectives=OBJECTIVES, strategy=strategy, trials=trials, seed=seed,
               progress=progress, initial=initial, seconds=seconds)
    front = pareto_mask([[p["ppl"], p["size"], 1 / p["speed"]] for p in points]).nonzero()[0].tolist()
    return {"points": points, "front": front, "chosen": choose(points, target)}


class CandidateScorer:
    """Scores candidates of :class:`AutoSpace` on one model: see the module docstring for the three figures."""

    def __init__(self, loaded: LoadedModel, spec: str, config: AutoConfig, progress: bool = True):
        self.dense, self.spec, self.config, self.progress = loaded, spec, config, progress
        c = config.search_calibration
        ids = tokenize(loaded.tokenizer, load_text(c.source))
        n, length = config.score_windows, config.score_seqlen
        if ids.shape[1] < n * length:
            raise SlimformerError(f"the calibration text has {ids.shape[1]} tokens, fewer than the "
                                  f"{n} × {length} the scoring windows need")
        self.windows = ids[0, : n * length].view(n, length)
        self.cost = DecodeCost()
        self.speed_ids = speed_ids = ids[:, :256]
        measured = measure_costs({"dense": loaded.model}, speed_ids, repeats=config.speed_repeats,
                                 prompt_tokens=128, new_tokens=32)["models"]["dense"]
        self.dense_decode_tok_s = measured["decode_tok_s"]
        self.cost.calibrate(loaded.model, 1 / measured["decode_tok_s"])
        self.dense_step_s = self.cost.predict(loaded.model)
        self.dense_ppl = calibration_perplexity(loaded.model, self.windows)
        self.dense_bytes = self._bytes(loaded)
        self.cache: dict[str, dict] = {}

    @staticmethod
    def _bytes(loaded: LoadedModel) -> int:
        with tempfile.TemporaryDirectory() as tmp:
            return size_on_disk(save_model(loaded.model, None, Path(tmp) / "m"))

    def recipe(self, params: dict, final: bool = False) -> Recipe:
        """The recipe of a candidate: the search's cheap settings, or the final run's (``final``)."""
        c = self.config
        steps = c.space.steps(params, c.recovery_tokens if final else c.search_recovery_tokens)
        return Recipe(steps=steps, model=self.spec, seed=c.seed,
                      calibration=c.calibration if final else c.search_calibration,
                      measure=c.measure if final else Measure(ppl_windows=0, speed=False))

    def build(self, params: dict) -> LoadedModel:
        """A candidate's model, its steps run with the search's settings on a copy of the dense model."""
        recipe = self.recipe(params)
        model = copy.deepcopy(self.dense.model)
        loaded = LoadedModel(model, self.dense.tokenizer, get_adapter(model), self.dense.source)
        if recipe.steps:
            apply_steps(loaded, recipe, progress=False)
        return loaded

    def check_speed(self, params: dict) -> dict:
        """A candidate's decode speed-up measured against the dense model (the two alternating), as the cost model was calibrated."""
        loaded = self.build(params)
        measured = measure_costs({"dense": self.dense.model, "candidate": loaded.model}, self.speed_ids,
                                 repeats=self.config.speed_repeats, prompt_tokens=128, new_tokens=32)["models"]
        return {"measured": measured["candidate"]["decode_tok_s"] / measured["dense"]["decode_tok_s"],
                "predicted": self.dense_step_s / self.cost.predict(loaded.model)}

    def __call__(self, params: dict) -> dict:
        recipe = self.recipe(params)
        key = json.dumps([config_dict(s) for s in recipe.steps], sort_keys=True, default=str)
        if key in self.cache:
            return self.cache[key]
        start = time.perf_counter()
        loaded = self.build(params)
        figures = {"ppl": calibration_perplexity(loaded.model, self.windows) / self.dense_ppl,
                   "size": self._bytes(loaded) / self.dense_bytes,
                   "speed": self.dense_step_s / self.cost.predict(loaded.model),
                   "seconds": time.perf_counter() - start}
        if not math.isfinite(figures["ppl"]):
            figures["ppl"] = 1e6  # a broken candidate stays in the record, dominated by every working one
        self.cache[key] = figures
        if self.progress:
            print(f"  {describe_params(params)}: {describe_point(figures)} ({figures['seconds']:.0f} s)", flush=True)
        return figures


def initial_points(space: dict) -> list[dict]:
    """Seeds of the search: the dense model and one plain quantization per bit width, with and without the head
    quantized, so the cheap and usually Pareto-optimal points are scored even under a short budget."""
    def pick(name: str, *preferred):
        choices = space[name].choices
        return next((v for v in preferred if v in choices), choices[0])

    base = {name: d.choices[0] if isinstance(d, CategoricalDistribution) else d.low for name, d in space.items()}
    base.update(sparsity=pick("sparsity", "none"), recovery=pick("recovery", False), head=pick("head", 0),
                quantizer=pick("quantizer", "rtn"), bits=pick("bits", 0), blocks=space["blocks"].low)
    points = [dict(base)]
    head = max(space["head"].choices)
    for bits in space["bits"].choices:
        if bits:
            group = max(space["group"].choices) if bits < 8 else pick("group", -1)
            plain = {**base, "bits": bits, "group": group,
                     "quantizer": pick("quantizer", "gptq") if bits < 8 else base["quantizer"]}
            points += [plain] + ([{**plain, "head": head}] if head else [])
    return points


def auto(model: str, target: str | Target, out: str | Path, *, config: AutoConfig | None = None,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Search for the best model under ``target`` and write it to ``out`` with its recipe and report; see the module docstring.

    Returns the summary written as ``out/auto.json``.
    """
    target = target if isinstance(target, Target) else Target.parse(target)
    config = dataclasses.replace(config, target=target) if config else AutoConfig(target=target)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimformerError(f"output '{out}' exists; choose another path or pass --overwrite")
    start = time.perf_counter()
    loaded = load_model(model)
    if loaded.adapter.family.kind != "decoder":
        raise SlimformerError("auto searches decoder models (its quality figure is perplexity)")
    scorer = CandidateScorer(loaded, model, config, progress)
    space = config.space.distributions(loaded.adapter)
    if progress:
        print(f"dense: decode {scorer.dense_decode_tok_s:.1f} tok/s measured; searching for {target.describe()}")
    found = search(space, scorer, target, trials=config.trials, seconds=config.budget_s, strategy=config.strategy,
                   seed=config.seed, initial=initial_points(space), progress=progress)
    search_s = time.perf_counter() - start
    chosen = found["chosen"]
    checks = check_front(scorer, found, target, config.check_front, progress)
    recipe = scorer.recipe(chosen["params"], final=True)
    if progress:
        print(f"chosen: {describe_params(chosen['params'])}: {describe_point(chosen)} (predicted); running it in full")
    del loaded, scorer.dense
    summary = run_recipe(recipe, out, overwrite=overwrite, progress=progress)
    measured = _measured(summary)
    record = {
        "model": model, "target": dataclasses.asdict(target), "target_text": target.describe(),
        "settings": json.loads(json.dumps(dataclasses.asdict(config), default=str)),
        "dense": {"decode_tok_s": scorer.dense_decode_tok_s, "calibration_ppl": scorer.dense_ppl,
                  "bytes": scorer.dense_bytes},
        "cost_model": scorer.cost.to_dict(),
        "objectives": list(OBJECTIVES),
        "trials": [{"number": i, "params": p["params"], "values": [p["ppl"], p["size"], 1 / p["speed"]],
                    "seconds": p.get("seconds")} for i, p in enumerate(found["points"])],
        "pareto": found["front"],
        "chosen": {"params": chosen["params"], "describe": describe_params(chosen["params"]),
                   "predicted": {k: chosen[k] for k in ("ppl", "size", "speed")}, "measured": measured,
                   "meets_target_measured": target.meets(measured) if measured else None},
        "speed_checks": checks,
        "search_seconds": search_s, "seconds": time.perf_counter() - start,
        "recipe": recipe.to_dict(), "kind": "auto",
    }
    write_text(out / "recipe.yaml", recipe.to_yaml())
    write_json(out / "auto.json", record)
    write_json(out / "search.json", {k: record[k] for k in ("model", "objectives", "trials", "pareto", "kind",
                                                             "speed_checks")}
               | {"strategy": config.strategy, "chosen": found["points"].index(chosen)})
    from slimformer.report import build_report

    build_report(out)
    return record


def check_front(scorer: CandidateScorer, found: dict, target: Target, count: int, progress: bool = True) -> list[dict]:
    """The cost model checked where it decided: decode speed measured for the chosen candidate and up to ``count``
    other Pareto-optimal ones (the best under the target first), each rebuilt with the search's settings."""
    if count < 0:
        raise SlimformerError(f"the number of front points to measure must be 0 or more, not {count}")
    chosen = found["chosen"]
    front = [found["points"][i] for i in found["front"]]
    others = sorted((p for p in front if p is not chosen), key=target.rank)[:count]
    checks = []
    for point in [chosen, *others] if count else []:
        speed = scorer.check_speed(point["params"])
        checks.append({"describe": describe_params(point["params"]), "params": point["params"],
                       "chosen": point is chosen, "predicted_speed": speed["predicted"],
                       "measured_speed": speed["measured"]})
        if progress:
            print(f"  decode {speed['measured']:.2f}× measured, {speed['predicted']:.2f}× predicted: "
                  f"{checks[-1]['describe']}", flush=True)
    return checks


def _measured(summary: dict) -> dict[str, Any] | None:
    """The chosen model's measured figures relative to dense: perplexity from the recipe's measurements, decode
    speed from its side-by-side comparison, size as written (dense or quantized form)."""
    before = summary["before"]
    after = summary["steps"][-1]["after"] if summary["steps"] else before
    models = summary.get("comparison", {}).get("models", {})
    original, compressed = models.get("original", {}), models.get("compressed", {})
    if "ppl" not in before or "decode_tok_s" not in compressed:
        return None

    def written(m: dict) -> int:
        return m["size_bytes"].get("quantized") or m["size_bytes"]["dense"]

    return {"ppl": after["ppl"] / before["ppl"], "size": written(after) / written(before),
            "speed": compressed["decode_tok_s"] / original["decode_tok_s"],
            "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "decode_tok_s_before": original["decode_tok_s"], "decode_tok_s_after": compressed["decode_tok_s"]}
