"""Typed run records: written by the recipe runner and the CLI, read back by the report."""

import json

from slimformer.records import EvalRecord, StepRecord
from slimformer.report import read_run


def test_records_round_trip_and_leave_out_what_they_do_not_hold(tmp_path):
    step = StepRecord(model="m", step=1, result={"method": "wanda", "summary": {"sparsity": 0.5}},
                      ppl_before=20.0, ppl_after=30.0, ppl_windows=4, size_bytes={"dense": 10})
    path = step.write(tmp_path / "steps" / "01-wanda")
    doc = json.loads(path.read_text())
    assert path.name == "slimformer.json" and "costs" not in doc  # None fields are not written
    assert StepRecord.from_dict({**doc, "unknown": 1}) == step
    evaluation = EvalRecord(model="m", perplexity={"wikitext2": {"perplexity": 21.0, "windows": 2, "seqlen": 16}})
    evaluation.write(tmp_path)
    report = read_run(tmp_path)
    assert report["steps"][0]["quality"]["metric"] == "perplexity (4 × 2048-token windows)"
    assert report["evaluations"][0]["perplexity"]["wikitext2"]["perplexity"] == 21.0


def test_the_eval_verb_writes_an_eval_record(saved_tiny, tmp_path):
    from slimformer.cli import main

    path, text = saved_tiny
    out = tmp_path / "run" / "eval.json"
    assert main(["eval", str(path), "--ppl", str(text), "--seqlen", "32", "--out", str(out)]) == 0
    record = EvalRecord.from_dict(json.loads(out.read_text()))
    assert record.model == str(path) and record.perplexity[str(text)]["windows"] == 12 and record.machine
    assert read_run(tmp_path / "run")["evaluations"][0]["perplexity"][str(text)]["windows"] == 12
