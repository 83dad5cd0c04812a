"""Typed run records: what a compression step and an evaluation write into a run folder, and the report reads back.

A record is a dataclass of plain data; ``write`` puts it in its file of a folder (atomically),
``from_dict`` takes a document back, keeping the record's fields and leaving out other keys.
Readers still check each value (a file may come from another version or be edited by hand):
the report drops what is not a finite number where it expects one. ``search.json`` is the
search's own :class:`slimformer.search.strategies.SearchResult` plus the run's model, task
and dev figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slimformer.files import write_json


class _Record:
    """Shared by the records: their file name, writing and lenient reading."""

    FILE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data, fields that are None left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def write(self, folder: str | Path) -> Path:
        """Write the record to ``folder/FILE`` atomically; return the path."""
        return write_json(Path(folder) / self.FILE, self.to_dict())

    @classmethod
    def from_dict(cls, doc: dict):
        """The record's fields of ``doc``; other keys are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in names})


@dataclass
class StepRecord(_Record):
    """One compression step (``slimformer.json``): what the method did and the measurements around it.

    ``result`` is a :class:`slimformer.methods.MethodResult` as data; ``measure_*`` the recipe's
    measurements (perplexity, parameters, FLOPs, speed, ``size_bytes`` per stored format);
    ``ppl_*`` the perplexity before and after, on ``ppl_windows`` × ``ppl_seqlen`` tokens of
    ``ppl_source``; ``costs`` a :func:`slimformer.evaluation.measure_costs` comparison, or
    ``speed`` a benchmark's {name: figures}, the first model before the step and the last after.
    """

    FILE: ClassVar[str] = "slimformer.json"
    model: str | None = None
    step: int | None = None
    result: dict = field(default_factory=dict)
    measure_before: dict | None = None
    measure_after: dict | None = None
    ppl_before: float | None = None
    ppl_after: float | None = None
    ppl_after_finetune: float | None = None
    ppl_source: str | None = None
    ppl_windows: int | None = None
    ppl_seqlen: int | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    accuracy_after_finetune: float | None = None
    size_bytes: dict | None = None
    size_bytes_before: float | None = None
    costs: dict | None = None
    speed: dict | None = None


@dataclass
class EvalRecord(_Record):
    """An evaluation (``eval.json``): perplexities by source, zero-shot and harness results, cost comparison.

    ``perplexity`` is {source: PerplexityResult as data}; ``tasks`` {task: evaluate_task's
    figures}; ``costs`` a :func:`slimformer.evaluation.measure_costs` result, e.g. the original
    and the compressed model of a recipe side by side; ``generations`` greedy continuations of
    fixed prompts by each model (``[{"prompt", model name: text, …}]``); ``step`` the recipe step
    that measured it.
    """

    FILE: ClassVar[str] = "eval.json"
    model: str | None = None
    step: int | None = None
    source: str | None = None
    dtype: str | None = None
    perplexity: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)
    lm_eval: dict | None = None
    costs: dict | None = None
    generations: list = field(default_factory=list)
    machine: dict | None = None
