"""The run report on synthetic and tiny real run folders: merged JSON, self-contained HTML, a browser render."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from slimformer import SlimformerError
from slimformer.report import build_report, read_run

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write(path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))


def sleb_run() -> dict:
    """Block removal of 3 of 10 blocks: block 0 and 9 protected, one line of losses per round."""
    rounds, candidates = [], list(range(1, 9))
    for removed in (4, 6, 2):
        rounds.append({str(b): 3.0 + 0.1 * abs(b - removed) + 0.05 * len(rounds) for b in candidates})
        candidates.remove(removed)
    summary = {"blocks_before": 10, "dense_loss": 2.9, "removed": [4, 6, 2], "removed_sorted": [2, 4, 6],
               "blocks_after": 7, "rounds": rounds, "block_calls": 120}
    return {"model": "tiny-llama", "ppl_windows": 4, "ppl_before": 20.0, "ppl_after": 30.0,
            "result": {"method": "sleb", "config": {"method": "sleb", "blocks": 3, "criterion": "iterative"},
                       "seconds": 12.5, "peak_rss_gib": 1.5, "layers": {}, "summary": summary},
            "size_bytes": {"dense": 7_000_000}, "size_bytes_before": 10_000_000,
            "costs": {"models": {"dense": {"params": 1_000_000, "nonzero_params": 1_000_000, "prefill_s": 2.0,
                                           "decode_tok_s": 10.0},
                                 "compressed": {"params": 720_000, "nonzero_params": 720_000, "prefill_s": 1.5,
                                                "decode_tok_s": 13.0}}}}


def wanda_run() -> dict:
    """Wanda 2:4 on the 7 remaining blocks, then a short fine-tune."""
    layers = {f"model.layers.{b}.{p}": {"sparsity": 0.5 if "mlp" in p else 0.25 + 0.01 * b, "shape": [8, 8]}
              for b in range(7) for p in PROJECTIONS}
    layers["lm_head"] = {"sparsity": 0.0, "shape": [8, 8]}
    return {"model": "tiny-llama", "ppl_windows": 4, "ppl_before": 30.0, "ppl_after": 60.0, "ppl_after_finetune": 40.0,
            "result": {"method": "wanda", "config": {"method": "wanda", "sparsity": 0.5, "pattern": "2:4"},
                       "seconds": 3.0, "peak_rss_gib": 1.2, "layers": layers,
                       "summary": {"sparsity": 0.5, "pruned_modules": 49}},
            "size_bytes": {"dense": 7_000_000, "sparse-bitmask": 4_500_000},
            "costs": {"models": {"dense": {"params": 720_000, "nonzero_params": 720_000, "prefill_s": 1.5,
                                           "decode_tok_s": 13.0},
                                 "pruned": {"params": 720_000, "nonzero_params": 420_000, "prefill_s": 1.4,
                                            "decode_tok_s": 13.5}}}}


def search_doc(rng: np.random.Generator) -> dict:
    values = rng.random((30, 2)).round(4).tolist()
    trials = [{"number": i, "params": {"heads": i % 4}, "values": v} for i, v in enumerate(values)]
    trials.append({"number": 30, "params": {}, "values": None})  # a failed trial
    return {"objectives": ["error", "params"], "trials": trials, "hypervolume": 0.61, "strategy": "random",
            "baseline": {"label": "importance pruning", "points": [[0.9, 0.1], [0.5, 0.4], [0.2, 0.8], ["x", 1]]}}


def synthetic_run(root):
    """Two steps in folders whose natural order differs from the string order, a search, an eval, a bad file."""
    write(root / "step2" / "out" / "slimformer.json", sleb_run())
    write(root / "step10" / "out" / "slimformer.json", wanda_run())
    write(root / "step10" / "sparse" / "slimformer.json", wanda_run())  # the same run's sparse output
    write(root / "search" / "search.json", search_doc(np.random.default_rng(0)))
    write(root / "eval.json", {"model": "tiny-llama", "perplexity": {"wikitext2": {
        "perplexity": 20.5, "windows": 4, "seqlen": 2048, "tokens_per_s": 300.0}}})
    write(root / "broken" / "slimformer.json", "{not json")
    return root


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_merges_steps_search_and_eval(tmp_path):
    json_path, html_path = build_report(synthetic_run(tmp_path / "run"))
    report = json.loads(json_path.read_text())
    assert [s["file"] for s in report["steps"]] == ["step2/out/slimformer.json", "step10/out/slimformer.json"]
    assert "step10/sparse/slimformer.json" in report["read"]  # identical copy: read, counted once
    assert report["skipped"][0]["file"] == "broken/slimformer.json" and "JSON" in report["skipped"][0]["reason"]
    rows = {r["metric"]: r for r in report["before_after"]}
    ppl = "perplexity (4 × 2048-token windows)"  # the metric says what it was measured on
    assert rows[ppl] == {"key": "quality", "metric": ppl, "before": 20.0, "after": 60.0,
                                  "change": 3.0}
    assert rows[f"{ppl} after fine-tune"]["after"] == 40.0
    assert rows["parameters (non-zero)"]["before"] == 1_000_000 and rows["parameters (non-zero)"]["after"] == 420_000
    assert rows["size on disk (smallest format)"]["before"] == 10_000_000
    assert rows["size on disk (smallest format)"]["after"] == 4_500_000
    assert rows["blocks"]["before"] == 10 and rows["blocks"]["after"] == 7
    assert rows["decode tokens/s"]["change"] == pytest.approx(1.35)
    qvs = report["quality_vs_size"]
    assert qvs["x"] == "nonzero_params"
    assert [(p["x"], p["y"]) for p in qvs["points"]] == [(1e6, 20.0), (720_000, 30.0), (420_000, 60.0), (420_000, 40.0)]
    grid = report["steps"][1]["sparsity_grid"]
    # numbered as in the original 10-block model, from which blocks 2, 4 and 6 were removed; lm_head left out
    assert grid["blocks"] == [0, 1, 3, 5, 7, 8, 9] and grid["projections"] == list(PROJECTIONS)
    assert grid["values"][3][0] == pytest.approx(0.28) and grid["values"][3][6] == 0.5
    scores = report["steps"][0]["block_scores"]
    assert [r["removed"] for r in scores["rounds"]] == [[4], [6], [2]]
    assert [len(r["blocks"]) for r in scores["rounds"]] == [8, 7, 6] and scores["dense_loss"] == 2.9
    search = report["searches"][0]
    assert len(search["trials"]) == 30  # the failed trial is dropped
    values = np.array([t["values"] for t in search["trials"]])
    dominated = [any((w <= v).all() and (w < v).any() for w in values) for v in values]
    assert search["pareto"] == [i for i, d in enumerate(dominated) if not d]  # computed: the file has none
    assert search["baseline"]["points"] == [[0.9, 0.1], [0.5, 0.4], [0.2, 0.8]]
    assert report["evaluations"][0]["perplexity"]["wikitext2"]["perplexity"] == 20.5
    page = html_path.read_text()
    for section in ("summary", "before-after", "quality-vs-size", "sparsity", "block-scores", "pareto", "evaluations"):
        assert f'<section id="{section}">' in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 4 and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "<script" not in page and "<link" not in page
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []  # no temp files


def test_missing_data_leaves_sections_out(tmp_path):
    doc = search_doc(np.random.default_rng(1))
    doc.update(pareto=[0, 1, 99], objectives=["params", "latency", "error"])
    for trial in doc["trials"][:-1]:
        trial["values"] = trial["values"] + [0.5]
    del doc["baseline"]
    write(tmp_path / "search.json", doc)
    json_path, html_path = build_report(tmp_path)
    report = json.loads(json_path.read_text())
    assert set(report) == {"run_dir", "read", "searches"}
    assert report["searches"][0]["pareto"] == [0, 1]  # positions past the trials are dropped
    page = html_path.read_text()
    assert '<section id="pareto">' in page and len(embedded_pngs(page)) == 1
    assert "before-after" not in page and "sparsity" not in page and "block-scores" not in page


def test_step_without_costs_uses_the_kept_fraction(tmp_path):
    run = sleb_run()
    del run["costs"], run["size_bytes_before"]
    write(tmp_path / "a" / "slimformer.json", run)
    run = wanda_run()
    del run["costs"]
    write(tmp_path / "b" / "slimformer.json", run)
    report = read_run(tmp_path)
    qvs = report["quality_vs_size"]
    assert qvs["x"] == "kept_fraction"
    assert [p["x"] for p in qvs["points"]] == pytest.approx([1.0, 0.7, 0.35, 0.35])
    assert "prefill latency (s)" not in {r["metric"] for r in report["before_after"]}


def test_fields_of_the_wrong_type_are_ignored(tmp_path):
    run = wanda_run()
    run["result"]["layers"] = {"model.layers.0.mlp.up_proj": {"sparsity": "half"}, "model.layers.1.mlp.up_proj": 5}
    run["result"]["summary"] = {"sparsity": float("nan"), "rounds": "none", "removed": [1, "x"]}
    run["result"]["config"] = {"method": "wanda", "sparsity": float("inf")}
    run.update(size_bytes=[1], costs={"models": []}, ppl_after_finetune=True)
    write(tmp_path / "slimformer.json", run)
    write(tmp_path / "search.json", {"trials": [5, {"values": "x"}], "baseline": {"points": 3}})
    report = json.loads(build_report(tmp_path)[0].read_text(), parse_constant=lambda name: pytest.fail(name))
    step = report["steps"][0]
    assert step["quality"] == {"metric": "perplexity (4 × 2048-token windows)", "before": 30.0, "after": 60.0}
    assert step["removed"] == [1] and step["config"] == {"method": "wanda", "sparsity": None}
    assert not {"sparsity_grid", "block_scores", "size_bytes", "costs", "sparsity"} & set(step)
    assert report["skipped"] == [{"file": "search.json", "reason": "no figures that a search.json holds"}]


@pytest.mark.parametrize("files", [{}, {"slimformer.json": "[1, 2]", "sub/eval.json": "{}", "search.json": "oops"}])
def test_a_folder_with_nothing_readable_is_an_error(tmp_path, files):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(SlimformerError, match=f"nothing readable in run folder {re.escape(str(tmp_path))}"):
        build_report(tmp_path)
    assert not (tmp_path / "report.json").exists()
    with pytest.raises(SlimformerError, match="does not exist"):
        build_report(tmp_path / "absent")


def test_report_of_real_compression_runs(saved_tiny, tmp_path):
    from slimformer.methods.blocks import SLEBConfig
    from slimformer.methods.pruning import MagnitudeConfig
    from slimformer.recipes import Calibration, Measure, Recipe, run_recipe

    path, text = saved_tiny
    calibration = Calibration(source=f"text:{text}", nsamples=2, seqlen=16)
    measure = Measure(ppl_windows=2, ppl_source=f"text:{text}", ppl_seqlen=32, speed=False, prefill_tokens=16)
    run = tmp_path / "run"
    recipe = Recipe(steps=(SLEBConfig(blocks=1, protect=(0,)), MagnitudeConfig(sparsity=0.5)), model=str(path),
                    calibration=calibration, measure=measure)
    summary = run_recipe(recipe, run, progress=False)
    report = json.loads((run / "report.json").read_text())
    sleb, prune = report["steps"]
    assert prune["method"] == "magnitude" and sleb["method"] == "sleb"
    assert report["run_dir"] == str(run)  # the folder the user asked for, not the one it was written in
    # the pruned model has 2 blocks; the grid numbers them as in the original model
    kept = [b for b in range(3) if b not in sleb["removed"]]
    assert prune["sparsity_grid"]["blocks"] == kept and len(prune["sparsity_grid"]["projections"]) == 7
    assert prune["sparsity_grid"]["block_label"] == "block (numbered as in the original model)"
    assert np.allclose(prune["sparsity_grid"]["values"], 0.5)
    assert set(prune["size_bytes"]) == {"dense", "sparse-bitmask"}
    first_round = sleb["block_scores"]["rounds"][0]
    assert first_round["blocks"] == [1, 2] and first_round["removed"] == sleb["removed"]
    rows = {r["metric"]: r for r in report["before_after"]}
    assert rows["blocks"]["after"] == 2
    assert f"perplexity (text:{text}, 2 × 32-token windows)" in rows
    page = (run / "report.html").read_text()
    assert f"<code>{run}</code>" in page and ".run." not in page
    evaluations = report["evaluations"][0]["costs"]
    assert evaluations["compressed"]["size_bytes"] == min(summary["steps"][-1]["after"]["size_bytes"].values())


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_html_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (make setup installs it where apt-get is available)")
    Image = pytest.importorskip("PIL.Image")
    _, html_path = build_report(synthetic_run(tmp_path / "run"))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
                    "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2000", html_path.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # a blank page has one colour, text alone ~300
    # Text is grey; the plots' colours (heat map, lines, markers) are what shows they rendered.
    coloured = pixels.max(axis=2) - pixels.min(axis=2) > 60
    assert coloured.mean() > 0.02, f"only {coloured.mean():.2%} of the page is coloured: the plots did not render"
