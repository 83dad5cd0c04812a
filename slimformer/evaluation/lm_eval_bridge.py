"""Run lm-evaluation-harness on a model already in memory, e.g. one slimformer has just compressed.

The model is wrapped in the harness's ``HFLM`` as it is (no reload, no hub). Built-in tasks
such as ``piqa`` fetch their data from the Hugging Face hub; a task whose YAML reads a local
file (``dataset_path: json``) runs offline, and :func:`write_task_yaml` makes one from a
generic task file (see ``docs/tasks.md``). Set ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` on machines without network, so nothing waits on the hub.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from slimformer.errors import SlimformerError

_TASK_NAME = re.compile(r"^[A-Za-z_][\w-]*$")


def write_task_yaml(data_file: str | Path, folder: str | Path, name: str) -> Path:
    """A harness task YAML in ``folder`` for a generic jsonl task file (context, choices, gold per line).

    The task prompts and scores exactly as :func:`slimformer.evaluation.zeroshot.evaluate_task`
    does on the same file; pass ``folder`` as ``include_path`` to :func:`run_lm_eval`.
    """
    if not _TASK_NAME.match(name):
        raise SlimformerError(f"task name '{name}' must be letters, digits, '_' or '-', starting with a letter")
    data = Path(data_file).expanduser().resolve()
    if not data.is_file():
        raise SlimformerError(f"task file not found: {data}")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


def _metrics(values: dict) -> dict[str, float]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` -> ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out = {}
    for key, value in values.items():
        metric, _, filt = key.partition(",")
        if filt and isinstance(value, int | float):
            out[metric if filt == "none" else f"{metric},{filt}"] = float(value)
    return out


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 16,
    include_path: str | Path | None = None,
    log_samples: bool = False,
) -> dict:
    """The harness's zero-shot metrics of an in-memory causal LM on ``tasks``.

    Returns ``{"results": {task: {metric: value}}, "seconds": s}``, plus with ``log_samples``
    ``"samples": {task: [per document, the log-likelihood of each choice]}`` in document order.
    ``include_path`` is a folder (or file) of extra task YAMLs; ``limit`` keeps the first documents.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SlimformerError("the lm-eval bridge needs the 'lm-eval' extra: pip install 'slimformer[lm-eval]'") from None
    if not tasks:
        raise SlimformerError("give at least one task")
    manager = None
    if include_path is not None:
        # indexing the harness's own thousands of tasks takes ~10 s: skip it when the extra ones suffice
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        names = ", ".join(unknown)
        raise SlimformerError(f"lm-eval does not know the task(s) {names}; add their YAML via include_path")
    kwargs = {}
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        # the harness decodes its prefix token (BOS, else EOS) on every encode; give it one that exists
        kwargs["prefix_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kwargs)
    start = time.perf_counter()
    try:
        out = simple_evaluate(
            model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=log_samples, num_fewshot=0
        )
    except ConnectionError as e:
        raise SlimformerError(
            f"lm-eval could not fetch a task's data ({e}); offline, use a local task (write_task_yaml) or evaluate_task"
        ) from None
    result = {
        # every task the harness reports: a group or tag expands to its members
        "results": {task: _metrics(values) for task, values in out["results"].items()},
        "seconds": time.perf_counter() - start,
    }
    if log_samples:
        result["samples"] = {
            task: [[float(ll) for ll, _greedy in s["filtered_resps"]] for s in sorted(docs, key=lambda s: s["doc_id"])]
            for task, docs in out["samples"].items()
        }
    return result
