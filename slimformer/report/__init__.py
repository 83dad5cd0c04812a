"""The run report: a run folder's figures merged into ``report.json``, and a self-contained ``report.html`` with plots.

What is read (every field is optional; a section whose data is missing is left out):

- ``slimformer.json`` anywhere under the folder, one per compression step, in natural path
  order (``step2`` before ``step10``); identical copies (the dense and the sparse output of
  one run) count once: a :class:`slimformer.records.StepRecord`. Fields: ``model``; ``ppl_before``,
  ``ppl_after``, ``ppl_after_finetune`` (or ``accuracy_*``) and what they were measured on
  (``ppl_source``, ``ppl_windows``, ``ppl_seqlen``); ``size_bytes`` {format: bytes} of the output
  and ``size_bytes_before``; ``result`` (a ``MethodResult``: ``method``, ``config``,
  ``seconds``, ``peak_rss_gib``, ``layers`` {module: {sparsity}}, ``summary`` with
  ``sparsity``, ``blocks_before``, ``blocks_after``, ``removed``, ``rounds``
  [{block: score}], ``dense_loss``); and ``costs`` (the output of
  :func:`slimformer.evaluation.cost.measure_costs`) or ``speed`` ({name: {prefill_s,
  decode_tok_s, ...}}), whose first model is the one before and last the one after.
- ``search.json``: ``objectives``, ``trials`` [{number, params, values}], ``pareto``
  (positions in ``trials``; computed when absent), ``hypervolume``, and ``baseline``
  {``points`` [[x, y]] in plot coordinates — the size-like objective, then ``error`` —, ``label``}.
- ``eval.json`` (a :class:`slimformer.records.EvalRecord`): ``model``, ``perplexity`` {source:
  {perplexity, windows, seqlen, tokens_per_s}}, ``costs``.

A file that is not a JSON object, or holds none of these figures, is listed under
``skipped``; a folder where nothing is readable is an error. ``report.json`` holds ``read``,
``skipped``, ``model``, ``steps`` (one per compression step, with its sparsity grid and
block scores), ``before_after`` (rows from the first step's "before" to the last step's
"after"), ``quality_vs_size``, ``searches`` and ``evaluations`` — keys only where there is data.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimformer.files import write_text
from slimformer.report.page import render_html
from slimformer.report.records import read_run

__all__ = ["build_report", "read_run", "render_html"]


def build_report(run_dir: str | Path, *, folder: str | Path | None = None) -> tuple[Path, Path]:
    """Read a run folder and write ``report.json`` and ``report.html`` into it (atomically); return their paths.

    ``folder`` is the name the report gives the run, when it is built in a temporary folder
    that is renamed into place afterwards.
    """
    run_dir = Path(run_dir)
    report = read_run(run_dir)
    if folder is not None:
        report["run_dir"] = str(folder)
    page = render_html(report)  # before writing anything: a failing plot leaves the old pair untouched
    json_path, html_path = run_dir / "report.json", run_dir / "report.html"
    write_text(json_path, json.dumps(report, indent=2) + "\n")
    write_text(html_path, page)
    return json_path, html_path
