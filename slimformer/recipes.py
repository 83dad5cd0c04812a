"""Recipes: a YAML list of compression steps, run end to end with a measurement and a checkpoint after each step.

A recipe names the model, the calibration data, the seed, what to measure, and the steps::

    model: smollm2-135m
    seed: 0
    bos: auto          # which windows start with the tokenizer's BOS: auto, every, once
    calibration: {source: "wikitext2:valid", nsamples: 8, seqlen: 512}
    measure: {ppl_windows: 8, speed: true}
    steps:
      - {method: sleb, ratio: 0.2, criterion: influence}
      - {method: wanda, sparsity: 0.5}
      - {method: distill, tokens: 100000}   # the teacher: the model before the recipe
      - {method: eval, ppl: wikitext2, windows: 8, tasks: [piqa], limit: 200}

Each step is a method's config (every field of its dataclass may be given; see
``slimformer.methods``) or ``eval``. A misspelt method or field is reported with its line
and the closest valid name, before any work starts.

:func:`run_recipe` keeps its progress in a work folder beside the output
(``.OUT.work``): after every finished step the model and the figures are saved there, so
running the same recipe again after an interruption resumes after the last finished step.
The output folder appears only when the whole recipe is done (model, one
``steps/NN-method/slimformer.json`` per step, ``eval.json`` with the original and the final
model measured side by side, ``report.json`` and ``report.html``). :func:`compress` runs a
recipe in memory, for notebooks.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import yaml
from tqdm.auto import tqdm

from slimformer.data import instruction_examples, load_text, sample_windows, tokenize, tokenize_instructions
from slimformer.errors import SlimformerError
from slimformer.files import write_json
from slimformer.records import EvalRecord, StepRecord
from slimformer.evaluation import evaluate_task, measure_costs, perplexity, side_by_side, size_on_disk
from slimformer.machine import machine_info
from slimformer.methods import METHODS, apply, config_dict
from slimformer.methods.base import MethodResult
from slimformer.models import BOS_MODES, DEFAULT_MODEL, LoadedModel, load_model, save_model
from slimformer.models.loading import atomic_dir, write_model
from slimformer.models.quantized import is_quantized
from slimformer.report import build_report


@dataclass(frozen=True)
class EvalConfig:
    """A measurement step: perplexity on a text source and zero-shot multiple-choice tasks.

    YAML: ``{method: eval, ppl: wikitext2, windows: 8, tasks: [piqa, arc_easy], limit: 200}``
    """

    method: ClassVar[str] = "eval"
    ppl: str | None = "wikitext2"
    windows: int | None = 8
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 16

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.windows is not None and self.windows < 1:
            raise SlimformerError(f"windows must be at least 1, not {self.windows}")


STEPS: dict[str, type] = {**METHODS, "eval": EvalConfig}


@dataclass(frozen=True)
class Calibration:
    """Calibration samples for every step that needs them: ``nsamples × seqlen`` seeded windows of ``source``."""

    source: str = "wikitext2:valid"
    nsamples: int = 32
    seqlen: int = 2048


@dataclass(frozen=True)
class Measure:
    """What is measured before the first step and after every step.

    Perplexity on ``ppl_windows`` windows of ``ppl_seqlen`` tokens of ``ppl_source`` (0 windows:
    none); with ``speed``, the prefill latency of ``prefill_tokens`` tokens and greedy decoding
    of ``new_tokens`` after 128 (medians of ``repeats``). ``generations``: the original and the
    final model continue that many fixed prompts greedily (``generation_tokens`` each), shown side
    by side in the report.
    """

    ppl_windows: int = 8
    ppl_source: str = "wikitext2:test"
    ppl_seqlen: int = 2048
    speed: bool = True
    prefill_tokens: int = 512
    new_tokens: int = 32
    repeats: int = 3
    generations: int = 0
    generation_tokens: int = 40


@dataclass(frozen=True)
class Recipe:
    """A model, its calibration and measurement settings, a seed, and the steps in order."""

    steps: tuple = ()
    model: str = DEFAULT_MODEL
    seed: int = 0
    bos: str = "auto"
    calibration: Calibration = field(default_factory=Calibration)
    measure: Measure = field(default_factory=Measure)

    def to_dict(self) -> dict:
        """Plain data, as the YAML file holds it (every field of every step)."""
        return {"model": self.model, "seed": self.seed, "bos": self.bos, "calibration": dataclasses.asdict(self.calibration),
                "measure": dataclasses.asdict(self.measure),
                "steps": [json.loads(json.dumps(config_dict(s))) for s in self.steps]}

    def to_yaml(self) -> str:
        """The recipe as YAML that :func:`load_recipe` reads back to an equal recipe."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# -- reading ----------------------------------------------------------------------------------
def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(map(str, valid))}"


def _coerce(cls, name: str, value: Any) -> Any:
    """YAML lists become tuples where the field is a tuple; ``1e-4`` (a string to YAML 1.1) a float where it is one."""
    hint = str(typing.get_type_hints(cls).get(name))
    if isinstance(value, list) and "tuple" in hint:
        return tuple(value)
    if isinstance(value, str) and "float" in hint and "str" not in hint:
        try:
            return float(value)
        except ValueError:
            raise SlimformerError(f"{name} must be a number, not '{value}'") from None
    return value


def _build(cls, data: dict, node: yaml.MappingNode | None, where: str, skip: tuple[str, ...] = ()):
    """An instance of dataclass ``cls`` from a YAML mapping, with line-numbered errors."""
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names and key not in skip:
            raise SlimformerError(f"{where}:{lines.get(key, '?')}: unknown field '{key}' for "
                                  f"{getattr(cls, 'method', cls.__name__)}{_suggest(key, names)}")
    try:
        return cls(**{k: _coerce(cls, k, v) for k, v in data.items() if k not in skip})
    except (SlimformerError, ValueError) as e:
        line = node.start_mark.line + 1 if node is not None else "?"
        raise SlimformerError(f"{where}:{line}: {e}") from None
    except TypeError as e:
        line = node.start_mark.line + 1 if node is not None else "?"
        raise SlimformerError(f"{where}:{line}: {e}") from None


def _child(node, key: str):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == key:
                return v
    return None


def parse_recipe(text: str, where: str = "<recipe>") -> Recipe:
    """A recipe from YAML text; every error names ``where`` and the line."""
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SlimformerError(f"{where}:{mark.line + 1 if mark else '?'}: not valid YAML "
                              f"({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SlimformerError(f"{where}:1: a recipe is a mapping with model, calibration, measure and steps")
    top = ("model", "seed", "bos", "calibration", "measure", "steps")
    for key in data:
        if key not in top:
            line = next(k.start_mark.line + 1 for k, _ in root.value if k.value == key)
            raise SlimformerError(f"{where}:{line}: unknown recipe key '{key}'{_suggest(key, top)}")
    steps_data, steps_node = data.get("steps") or [], _child(root, "steps")
    if not isinstance(steps_data, list) or not steps_data:
        raise SlimformerError(f"{where}: a recipe needs a non-empty list of steps")
    steps = []
    for i, (step, node) in enumerate(zip(steps_data, steps_node.value)):
        line = node.start_mark.line + 1
        if not isinstance(step, dict) or "method" not in step:
            raise SlimformerError(f"{where}:{line}: step {i + 1} needs a 'method' ({', '.join(STEPS)})")
        if step["method"] not in STEPS:
            raise SlimformerError(f"{where}:{line}: unknown method '{step['method']}'{_suggest(step['method'], STEPS)}")
        steps.append(_build(STEPS[step["method"]], step, node, where, skip=("method",)))
    calibration = _build(Calibration, data.get("calibration") or {}, _child(root, "calibration"), where)
    measure = _build(Measure, data.get("measure") or {}, _child(root, "measure"), where)
    bos = str(data.get("bos", "auto"))
    if bos not in BOS_MODES:
        line = next(k.start_mark.line + 1 for k, _ in root.value if k.value == "bos")
        raise SlimformerError(f"{where}:{line}: bos must be one of {', '.join(BOS_MODES)}, not '{bos}'")
    return Recipe(steps=tuple(steps), model=str(data.get("model", DEFAULT_MODEL)), seed=int(data.get("seed", 0)),
                  bos=bos, calibration=calibration, measure=measure)


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """A recipe from a YAML file, YAML text, a dict, or a :class:`Recipe` (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(yaml.safe_dump(recipe, sort_keys=False))
    path = Path(recipe) if isinstance(recipe, Path) or "\n" not in str(recipe) else None
    if path is not None:
        if not path.is_file():
            raise SlimformerError(f"recipe file not found: {path}")
        return parse_recipe(path.read_text(encoding="utf-8"), str(path))
    return parse_recipe(str(recipe))


# -- running ----------------------------------------------------------------------------------
class _Context:
    """What every step of one run shares: the model, calibration samples, test tokens."""

    def __init__(self, recipe: Recipe, loaded: LoadedModel, progress: bool):
        self.recipe, self.loaded, self.progress = recipe, loaded, progress
        self._samples = None
        self._calibration_ids = None
        self._test_ids = None
        self._speed_ids = None
        self._training_ids: dict[str, torch.Tensor] = {}
        self.bos = loaded.window_bos(recipe.bos)

    @property
    def samples(self) -> torch.Tensor:
        if self._samples is None:  # drawn once, seeded: a resumed run draws the same ones
            c = self.recipe.calibration
            self._samples = sample_windows(self.calibration_ids(), c.nsamples, c.seqlen, self.recipe.seed, bos=self.bos)
        return self._samples

    def calibration_ids(self) -> torch.Tensor:
        if self._calibration_ids is None:
            self._calibration_ids = tokenize(self.loaded.tokenizer, load_text(self.recipe.calibration.source))
        return self._calibration_ids

    def training_ids(self, source: str) -> torch.Tensor:
        """Token ids of a training text (for recovery steps), read once per source."""
        if source not in self._training_ids:
            self._training_ids[source] = tokenize(self.loaded.tokenizer, load_text(source))
        return self._training_ids[source]

    def instruction_ids(self, source: str) -> torch.Tensor:
        """Instruction examples of ``source`` in the model's chat template, packed: ``(2, L)`` ids and labels."""
        key = "instructions:" + source
        if key not in self._training_ids:
            self._training_ids[key] = tokenize_instructions(self.loaded.tokenizer, instruction_examples(source))
        return self._training_ids[key]

    def test_ids(self) -> torch.Tensor:
        if self._test_ids is None:
            self._test_ids = tokenize(self.loaded.tokenizer, load_text(self.recipe.measure.ppl_source))
        return self._test_ids

    def speed_ids(self) -> torch.Tensor:
        """``prefill_tokens`` token ids to time: of the perplexity text when it is measured, else of the calibration text.

        Only the length matters to the timing; a short text is repeated to that length.
        """
        if self._speed_ids is None:
            m = self.recipe.measure
            ids = self.test_ids() if m.ppl_windows else self.calibration_ids()
            self._speed_ids = ids.repeat(1, -(-m.prefill_tokens // ids.shape[1]))[:, : m.prefill_tokens]
        return self._speed_ids

    def measure(self, checkpoint: Path | None = None) -> dict:
        """Perplexity, parameters, size and speed of the model as it is now."""
        m, model = self.recipe.measure, self.loaded.model
        out: dict[str, Any] = {}
        if m.ppl_windows:
            out["ppl"] = perplexity(model, self.test_ids(), seqlen=m.ppl_seqlen, windows=m.ppl_windows, bos=self.bos,
                                    progress=False).perplexity
        ids = self.speed_ids()
        costs = measure_costs({"model": model}, ids, repeats=m.repeats, new_tokens=m.new_tokens,
                              decode=m.speed)["models"]["model"]
        keep = ("params", "nonzero_params", "flops_per_token") + (("prefill_s", "decode_tok_s") if m.speed else ())
        out.update({k: costs[k] for k in keep if k in costs})
        if checkpoint is not None:
            out["size_bytes"] = _sizes(self.loaded, checkpoint, pruned=costs["nonzero_params"] < 0.9 * costs["params"])
        return out


def _sizes(loaded: LoadedModel, checkpoint: Path, pruned: bool) -> dict[str, int]:
    """Bytes of the saved dense checkpoint and, for a ``pruned`` model, of its sparse-bitmask form (a quantized one: its codes)."""
    if is_quantized(loaded.model):  # the checkpoint holds the packed codes: that is its only stored form
        return {"quantized": size_on_disk(checkpoint)}
    sizes = {"dense": size_on_disk(checkpoint)}
    if pruned:
        with tempfile.TemporaryDirectory() as tmp:
            sizes["sparse-bitmask"] = size_on_disk(save_model(loaded.model, None, Path(tmp) / "sparse",
                                                              sparse="unstructured"))
    return sizes


def _run_step(ctx: _Context, index: int, step) -> dict:
    """Apply one step to the model in ``ctx``; return what it did as plain data."""
    torch.manual_seed(ctx.recipe.seed + index)  # each step seeded on its own: a resumed run matches
    if isinstance(step, EvalConfig):
        start, out = time.perf_counter(), {"method": "eval", "config": config_dict(step)}
        if step.ppl:
            ids = tokenize(ctx.loaded.tokenizer, load_text(step.ppl))
            out["perplexity"] = {step.ppl: perplexity(ctx.loaded.model, ids, windows=step.windows, bos=ctx.bos,
                                                      progress=ctx.progress).to_dict()}
        out["tasks"] = {t: evaluate_task(ctx.loaded.model, ctx.loaded.tokenizer, t, limit=step.limit,
                                         batch_size=step.batch_size, progress=ctx.progress) for t in step.tasks}
        out["seconds"] = time.perf_counter() - start
        return out
    if getattr(step, "instruction_source", None):
        samples = ctx.instruction_ids(step.instruction_source)
    elif getattr(step, "train_source", None):  # recovery trains on its own text; its teacher is the model before the recipe
        if getattr(step, "needs_teacher", False) and step.teacher is None:
            step = dataclasses.replace(step, teacher=ctx.recipe.model)
        samples = ctx.training_ids(step.train_source)
    else:
        samples = ctx.samples if getattr(step, "needs_samples", True) else None
    result: MethodResult = apply(ctx.loaded.adapter, step, samples)
    return dataclasses.asdict(result)


def _check_steps(recipe: Recipe, kind: str) -> None:
    if kind != "decoder":
        raise SlimformerError("recipes run on decoder models (perplexity, calibration and fine-tuning need a causal LM)")
    if not recipe.steps:
        raise SlimformerError("the recipe has no steps")


def compress(model: str | LoadedModel, recipe: str | Path | dict | Recipe, *, progress: bool = True):
    """Run a recipe in memory: ``(compressed LoadedModel, report)``; nothing is written.

    ``model`` is a spec for :func:`slimformer.load_model` (overriding the recipe's) or an
    already loaded model. The report holds the measurement before the first step and, for
    each step, what it did and the measurement after it.
    """
    recipe = load_recipe(recipe)
    loaded = model if isinstance(model, LoadedModel) else load_model(model or recipe.model)
    _check_steps(recipe, loaded.adapter.family.kind)
    ctx = _Context(recipe, loaded, progress)
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "before": ctx.measure(), "steps": []}
    for i, step in enumerate(tqdm(recipe.steps, desc="recipe", disable=not progress)):
        report["steps"].append({"result": _run_step(ctx, i, step), "after": ctx.measure()})
    return loaded, report


def apply_steps(loaded: LoadedModel, recipe: str | Path | dict | Recipe, *, progress: bool = False) -> list[dict]:
    """Apply a recipe's steps to a loaded model in memory, measuring nothing; what each step did.

    The recipe's calibration, seed and training sources are used as :func:`run_recipe` uses
    them; its ``model`` is the teacher of a recovery step that names none.
    """
    recipe = load_recipe(recipe)
    _check_steps(recipe, loaded.adapter.family.kind)
    ctx = _Context(recipe, loaded, progress)
    return [_run_step(ctx, i, step) for i, step in enumerate(recipe.steps)]


def work_folder(out: Path) -> Path:
    """Where an unfinished run of ``out`` keeps its checkpoint."""
    return out.parent / f".{out.name}.work"


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when nothing is in it."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def run_recipe(recipe: str | Path | dict | Recipe, out: str | Path, *, model: str | None = None,
               overwrite: bool = False, progress: bool = True, dtype: str = "float32",
               sparse_out: str | Path | None = None) -> dict:
    """Run a recipe into ``out`` (see the module docstring); resume an interrupted run of the same recipe.

    The model is loaded in ``dtype``. ``sparse_out`` also writes the final model in the
    compressed-tensors sparse-bitmask layout there (smaller on disk for a pruned model).
    Returns the summary also written as ``out/run.json``, with the paths of the report.
    """
    recipe = load_recipe(recipe)
    if model:
        recipe = dataclasses.replace(recipe, model=model)
    out = Path(out)
    for target in (out, sparse_out):
        if target is not None and Path(target).exists() and not overwrite:
            raise SlimformerError(f"output '{target}' exists; choose another path or pass --overwrite")
    load_text(recipe.calibration.source)  # a missing data source fails before the model loads
    if recipe.measure.ppl_windows:
        load_text(recipe.measure.ppl_source)
    work = work_folder(out)
    state_path, checkpoint = work / "state.json", work / "model"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is not None and state["recipe"] != recipe.to_dict():
        if not overwrite:
            raise SlimformerError(f"{work} holds an interrupted run of a different recipe; "
                                  "pass --overwrite to start over")
        shutil.rmtree(work)
        state = None
    resumed = state is not None and state["done"] > 0
    loaded = load_model(str(checkpoint) if resumed else recipe.model, dtype=dtype)
    _check_steps(recipe, loaded.adapter.family.kind)
    ctx = _Context(recipe, loaded, progress)
    if state is None:
        work.mkdir(parents=True, exist_ok=True)
        save_model(loaded.model, loaded.tokenizer, checkpoint, overwrite=True)
        state = {"recipe": recipe.to_dict(), "done": 0, "before": ctx.measure(checkpoint), "steps": []}
        write_json(state_path, state)
    elif resumed:
        print(f"resuming after step {state['done']} of {len(recipe.steps)} ({work})")
    try:
        for i, step in enumerate(recipe.steps):
            if i < state["done"]:
                continue
            if progress:
                print(f"step {i + 1}/{len(recipe.steps)}: {step.method}")
            result = _run_step(ctx, i, step)
            save_model(loaded.model, loaded.tokenizer, checkpoint, overwrite=True)
            state["steps"].append({"result": result, "after": ctx.measure(checkpoint)})
            state["done"] = i + 1
            write_json(state_path, state)  # the step is finished only once this is written
    except BaseException:
        if state["done"] == 0:  # nothing finished that a rerun could resume from: leave nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise
    summary = _finish(recipe, state, ctx, out, overwrite, dtype)
    if sparse_out is not None:
        save_model(loaded.model, loaded.tokenizer, sparse_out, overwrite=overwrite, sparse=_sparse_structure(recipe))
        summary["sparse_out"] = str(sparse_out)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _sparse_structure(recipe: Recipe) -> str:
    """The sparsity structure a sparse copy records: the last N:M pattern of the recipe, else unstructured."""
    return next((s.pattern for s in reversed(recipe.steps) if getattr(s, "pattern", None)), "unstructured")


def run_streamed(recipe: str | Path | dict | Recipe, out: str | Path, *, max_memory: int, model: str | None = None,
                 overwrite: bool = False, progress: bool = True, dtype: str = "float32",
                 out_dtype: str | None = None, activations: str = "auto", sparse_out: str | Path | None = None) -> dict:
    """Run a recipe's compressing steps with the model streamed from disk block by block (``--max-memory``).

    Each step reads the previous one's output shards and writes its own as blocks finish (see
    :mod:`slimformer.models.streaming`); an interrupted step resumes at its last finished block.
    Each step's estimated peak (:func:`slimformer.methods.memory.estimate_peak`) is checked
    against ``max_memory`` bytes before it runs; ``activations`` (auto, memory, disk) says
    where the calibration hidden states live (auto: on disk only when they would not fit).
    Perplexity is not measured (it needs the whole model); the output folder holds the model
    and ``run.json``. ``sparse_out`` also writes a sparse-bitmask copy of a pruned output, made
    from the output one shard at a time.
    """
    from slimformer.methods.memory import ACTIVATIONS, STREAMABLE, check_budget
    from slimformer.models.loading import load_streamed
    from slimformer.models.streaming import stream_of

    recipe = load_recipe(recipe)
    if model:
        recipe = dataclasses.replace(recipe, model=model)
    out = Path(out)
    if out.exists() and not overwrite:
        raise SlimformerError(f"output '{out}' exists; choose another path or pass --overwrite")
    if activations not in ACTIVATIONS:
        raise SlimformerError(f"activations must be one of {', '.join(ACTIVATIONS)}, not '{activations}'")
    for step in recipe.steps:
        if not isinstance(step, STREAMABLE):
            raise SlimformerError(f"step '{step.method}' needs the whole model in memory: run it without --max-memory")
    if sparse_out is not None:
        if Path(sparse_out).exists() and not overwrite:
            raise SlimformerError(f"output '{sparse_out}' exists; choose another path or pass --overwrite")
        if any(getattr(step, "bits", None) for step in recipe.steps):
            raise SlimformerError("a quantized output has no sparse-bitmask form: drop --sparse-out")
    if recipe.measure.ppl_windows:
        raise SlimformerError("perplexity is measured on the whole model in memory: drop --ppl-windows with --max-memory")
    load_text(recipe.calibration.source)
    work = work_folder(out)
    work.mkdir(parents=True, exist_ok=True)
    source, steps = recipe.model, []
    for i, step in enumerate(recipe.steps):
        target = out if i == len(recipe.steps) - 1 else work / f"step-{i + 1:02d}"
        c = recipe.calibration
        job = {"step": config_dict(step), "calibration": dataclasses.asdict(c), "seed": recipe.seed, "bos": recipe.bos}
        if target.exists() and target != out:  # a finished step of an interrupted recipe
            steps.append(json.loads((target / "step.json").read_text()))
            source = str(target)
            continue
        try:
            loaded = load_streamed(source, target, dtype=dtype, out_dtype=out_dtype, job=job, overwrite=True)
        except BaseException:
            _remove_if_empty(work)  # a source refused before any work leaves nothing behind
            raise
        stream = stream_of(loaded.adapter)
        try:
            ctx = _Context(recipe, loaded, progress)
            needs = getattr(step, "needs_samples", True)
            estimate = check_budget(loaded.adapter, step, c.nsamples, c.seqlen, max_memory, activations)
            if progress:
                print(f"step {i + 1}/{len(recipe.steps)}: {step.method}, streamed"
                      f"{', activations on disk' if stream.spill else ''}; estimated peak "
                      f"{estimate['total'] / 2**30:.2f} GiB of {max_memory / 2**30:.2f}")
            torch.manual_seed(recipe.seed + i)
            result = dataclasses.asdict(apply(loaded.adapter, step, ctx.samples if needs else None))
            entry = {"result": result, "estimate_bytes": estimate, "activations_on_disk": stream.spill}
            write_json(stream.work / "step.json", entry)
            stream.commit(loaded.tokenizer)
        except BaseException:
            if not stream.progress["next"]:  # no block finished that a rerun could resume from
                shutil.rmtree(stream.work, ignore_errors=True)
                _remove_if_empty(work)
            raise
        finally:
            stream.abandon()
        entry["after"] = {"size_bytes": {"quantized" if "mean_bits" in result["summary"] else "dense":
                                         size_on_disk(target)}}
        steps.append(entry)
        source = str(target)
    summary = {"recipe": recipe.to_dict(), "streamed": True, "max_memory_bytes": max_memory, "steps": steps,
               "report_html": None}
    if sparse_out is not None:
        from slimformer.models.sparse_storage import linear_weight_names, sparsify_checkpoint

        with atomic_dir(sparse_out, overwrite=overwrite) as tmp:
            sparsify_checkpoint(out, tmp, linear_weight_names(loaded.model), structure=_sparse_structure(recipe))
        summary["sparse_out"] = str(sparse_out)
    write_json(out / "run.json", summary)
    (out / "step.json").unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _step_record(recipe: Recipe, step: int, result: dict, before: dict, after: dict) -> StepRecord:
    """What a compression step did and the recipe's measurements before and after it."""
    m = recipe.measure
    record = StepRecord(model=recipe.model, step=step, result=result, measure_before=before, measure_after=after)
    if "ppl" in before and "ppl" in after:
        record.ppl_before, record.ppl_after = before["ppl"], after["ppl"]
        record.ppl_source, record.ppl_windows, record.ppl_seqlen = m.ppl_source, m.ppl_windows, m.ppl_seqlen
    if "size_bytes" in after:
        record.size_bytes, record.size_bytes_before = after["size_bytes"], min(before["size_bytes"].values())
    return record


def _finish(recipe: Recipe, state: dict, ctx: _Context, out: Path, overwrite: bool, dtype: str) -> dict:
    """Write the output folder in one rename: the model, per-step figures, the side-by-side comparison, the report."""
    loaded = ctx.loaded
    original = load_model(recipe.model, dtype=dtype).model
    m = recipe.measure
    ids = ctx.speed_ids()
    comparison = measure_costs({"original": original, "compressed": loaded.model}, ids, repeats=max(m.repeats, 3),
                               new_tokens=m.new_tokens, decode=m.speed)
    generations = side_by_side({"original": original, "compressed": loaded.model}, loaded.tokenizer,
                               m.generations, m.generation_tokens) if m.generations else []
    del original
    sizes = {"original": min(state["before"]["size_bytes"].values()),
             "compressed": min((state["steps"][-1]["after"] if state["steps"] else state["before"])["size_bytes"].values())}
    for name, size in sizes.items():  # the smallest stored format of each, beside its speed
        comparison["models"][name]["size_bytes"] = size
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_model(loaded.model, loaded.tokenizer, tmp)
        previous = state["before"]
        for i, entry in enumerate(state["steps"]):
            result, after = entry["result"], entry["after"]
            folder = tmp / "steps" / f"{i + 1:02d}-{result.get('method', 'step')}"
            if result.get("method") == "eval":
                EvalRecord(model=recipe.model, step=i + 1, perplexity=result.get("perplexity", {}),
                           tasks=result.get("tasks", {})).write(folder)
            else:
                _step_record(recipe, i + 1, result, previous, after).write(folder)
            previous = after
        EvalRecord(model=recipe.model, costs=comparison, generations=generations, machine=machine_info()).write(tmp)
        build_report(tmp, folder=out)
        report = json.loads((tmp / "report.json").read_text())
        summary = {"recipe": recipe.to_dict(), "before": state["before"], "steps": state["steps"],
                   "comparison": comparison, "before_after": report.get("before_after", []), "generations": generations,
                   "report_html": str(out / "report.html"), "report_json": str(out / "report.json")}
        write_json(tmp / "run.json", summary)
    return summary
