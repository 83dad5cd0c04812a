"""The search job behind ``slimformer search`` and ``slimformer extract``: a resumable run folder.

A run folder holds ``run.json`` (what was asked), ``importance.pt`` (the unit ranking),
for encoders ``stage1/`` (the fine-tuned reference and the trained super-network),
``study.journal`` (optuna's trial log), and when the search is done ``search.json`` (every
trial, the Pareto set, its hypervolume, the dev-set figures and the baseline) and
``front.png``. Running the same command again reuses stage 1 and continues the trials.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from slimformer.data import calibration_samples
from slimformer.data.glue import GLUE_TASKS, glue_task
from slimformer.errors import SlimformerError
from slimformer.files import write_json
from slimformer.models import load_model, save_model
from slimformer.models.adapters import get_adapter
from slimformer.search.pareto import plot_front
from slimformer.search.space import Importance, SearchSpace, extract
from slimformer.search.strategies import SearchResult
from slimformer.search.decoder import decoder_importance, decoder_search
from slimformer.evaluation.glue import check_max_length
from slimformer.search.encoder import Stage1, encoder_search, train_stage1
from slimformer.search.structural import SearchConfig


def _save_importance(path: Path, importance: Importance) -> None:
    torch.save({"heads": importance.heads, "units": importance.units}, path)


def _load_importance(path: Path) -> Importance:
    data = torch.load(path, weights_only=True)
    return Importance(data["heads"], data["units"])


def _open_run(out: Path, request: dict) -> None:
    """Create the run folder, or check that an existing one holds the same search (then it resumes).

    Only the trial count may change between runs: asking for more trials continues the search.
    """
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "run.json"
    request = json.loads(json.dumps(request))
    if spec.exists():
        before = json.loads(spec.read_text())
        same = lambda r: {**r, "config": {**r.get("config", {}), "trials": None}}  # noqa: E731
        if same(before) != same(request):
            a, b = same(before), same(request)
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise SlimformerError(f"{out} holds a different search (differs in {', '.join(changed)}); "
                                  "choose another --out")
    write_json(spec, request)


def run_search_job(model: str, task: str | None, config: SearchConfig, out: str | Path, *, seed: int = 0,
                   nsamples: int = 8, seqlen: int = 512, dtype: str = "float32", device: str = "cpu",
                   progress: bool = True) -> dict:
    """Run (or resume) a search in ``out`` on ``device``; return the summary written to ``search.json``."""
    out = Path(out)
    loaded = load_model(model, dtype=dtype, device=device)
    kind = loaded.adapter.family.kind
    if kind == "encoder" and not (task or "").startswith("glue:"):
        raise SlimformerError(f"an encoder is searched on a GLUE task: --task glue:TASK ({', '.join(GLUE_TASKS)}), "
                              f"not {task!r}")
    task = task or "wikitext2:valid"
    request = {"model": model, "task": task, "kind": kind, "config": asdict(config), "nsamples": nsamples,
               "seqlen": seqlen, "dtype": dtype}
    if kind == "encoder":
        glue_task(task)  # an unknown task or too long an input fails before the folder is made
        check_max_length(loaded.model, config.max_length)
    _open_run(out, request)
    storage = out / "study.journal"
    if kind == "encoder":
        stage1 = _stage1(loaded, task, config, out, device, progress)
        found = encoder_search(stage1, loaded.tokenizer, task, config, storage=storage, progress=progress)
        result: SearchResult = found["result"]
        points = {"search (dev)": [[p["params"], 1 - p["dev"]["score"]] for p in found["dev_front"]],
                  "importance pruning (dev)": [[b["params"], 1 - b["dev"]["score"]] for b in found["baseline"]]}
        extra = {"dev_front": found["dev_front"], "baseline": {"label": "importance pruning (dev)",
                 "points": points["importance pruning (dev)"], "runs": found["baseline"]},
                 "baseline_at_front": found["baseline_at_front"], "reference_dev": found["reference_dev"],
                 "supernet_dev": found["supernet_dev"],
                 "timing": stage1.timing}
        labels = ("relative parameters", f"1 − {glue_task(task).metrics[0]} (dev)")
    else:
        samples = calibration_samples(loaded.tokenizer, task, n=nsamples, seqlen=seqlen, seed=seed, bos=loaded.window_bos())
        ranking = out / "importance.pt"
        if ranking.exists():  # a resumed search ranks with what the first run computed
            importance = _load_importance(ranking)
        else:
            importance = decoder_importance(loaded.adapter, samples, config, progress)
            _save_importance(ranking, importance)
        found = decoder_search(loaded.adapter, samples, config, storage=storage, progress=progress,
                               importance=importance)
        result = found["result"]
        points = {"search": result.points()[:, :2].tolist()}
        extra = {}
        labels = (config.objectives[1], config.objectives[0]) if config.objectives[0] == "error" else \
            tuple(config.objectives[:2])
    summary = {**json.loads(result.to_json()), "model": model, "task": task, "kind": kind, **extra}
    write_json(out / "search.json", summary)
    if len(config.objectives) == 2:
        # x: size-like objective, y: error, as people read such fronts
        order = [1, 0] if config.objectives[0] == "error" else [0, 1]
        series = {name: [[p[order[0]], p[order[1]]] for p in pts] for name, pts in points.items()} \
            if kind == "decoder" else {name: pts for name, pts in points.items()}
        plot_front(series, out / "front.png", labels=labels, title=f"{model} — {task}")
    return summary


def _stage1(loaded, task: str, config: SearchConfig, out: Path, device: str, progress: bool) -> Stage1:
    """Stage 1 from the run folder when an earlier run finished it, else trained and saved."""
    folder = out / "stage1"
    if (folder / "supernet" / "config.json").exists() and (out / "importance.pt").exists():
        reference = load_model(str(folder / "reference"), head="sequence-classification", device=device).model
        supernet = load_model(str(folder / "supernet"), head="sequence-classification", device=device).model
        timing = json.loads((folder / "timing.json").read_text())
        return Stage1(reference, supernet, _load_importance(out / "importance.pt"), timing)
    stage1 = train_stage1(loaded.model, loaded.tokenizer, task, config, progress=progress)
    save_model(stage1.reference, loaded.tokenizer, folder / "reference", overwrite=True)
    save_model(stage1.supernet, loaded.tokenizer, folder / "supernet", overwrite=True)
    write_json(folder / "timing.json", stage1.timing)
    _save_importance(out / "importance.pt", stage1.importance)
    return stage1


def extract_trial(run: str | Path, trial: int, out: str | Path, *, overwrite: bool = False) -> Path:
    """Save the sub-network of trial ``trial`` of a finished search as a smaller model."""
    run = Path(run)
    if not (run / "search.json").exists():
        raise SlimformerError(f"{run} holds no finished search (no search.json)")
    request = json.loads((run / "run.json").read_text())
    summary = json.loads((run / "search.json").read_text())
    params = next((t["params"] for t in summary["trials"] if t["number"] == trial), None)
    if params is None:
        raise SlimformerError(f"no trial {trial} in {run}/search.json")
    if request["kind"] == "encoder":
        loaded = load_model(str(run / "stage1" / "supernet"), head="sequence-classification")
    else:
        loaded = load_model(request["model"], dtype=request["dtype"])
    space = SearchSpace(request["config"]["space"], get_adapter(loaded.model), _load_importance(run / "importance.pt"))
    small = extract(loaded.model, space.subnet(params), inplace=True)
    return save_model(small, loaded.tokenizer, out, overwrite=overwrite)
