"""`slimformer auto` on SmolLM2-135M for three targets, beside the best single-method result for each target.

For each target (``size=0.25``, ``speed=2``, ``ppl=+10%``) the search runs for ``--budget`` in a
fresh process, then its chosen recipe runs in full and is measured on the protocol (perplexity on
the first 40 windows of WikiText-2 test, size on disk, decode tokens/s against the dense model
in the same process). The single-method results come from ``results/quantization_smollm2.json``
(RTN, GPTQ, AWQ at 8 and 4 bits, with and without the head quantized): the best of those that
meet each target's constraint on the axis the target optimises (perplexity for a size or speed
target, size for a perplexity target). The auto result should be at least as good as that one
and dominate at least one single-method result.

    python benchmarks/auto.py [--targets size=0.25,speed=2,ppl=+10%] [--budget 20m]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, run_children, write_result


def single_method_results() -> list[dict]:
    """The quantization benchmark's runs as points: perplexity, size and decode speed relative to dense."""
    runs = json.loads((RESULTS / "quantization_smollm2.json").read_text())["runs"]
    dense = next(r for r in runs if r["name"] == "dense")
    points = []
    for r in runs:
        if r["name"] == "dense" or "ppl" not in r or "size_bytes" not in r or "model" not in r.get("speed", {}):
            continue
        speed = r["speed"]["model"]["decode_tok_s"] / r["speed"]["dense"]["decode_tok_s"]
        points.append({"name": r["name"], "ppl": r["ppl"] / dense["ppl"], "size": r["size_bytes"] / dense["size_bytes"],
                       "speed": speed, "ppl_abs": r["ppl"]})
    return points


def child(spec: dict) -> dict:
    """One auto run in this process: search, full run of the chosen recipe, measured figures."""
    import torch

    from slimformer.auto import AutoConfig, Target, auto, describe_params
    from slimformer.recipes import Measure

    torch.set_num_threads(2)
    target = Target.parse(spec["target"])
    config = AutoConfig(target=target, budget_s=spec["budget_s"], trials=spec["trials"],
                        measure=Measure(ppl_windows=40, speed=True, repeats=3, generations=3))
    out = Path(spec["out"])
    record = auto("smollm2-135m", target, out, config=config, overwrite=True)
    shutil.rmtree(out, ignore_errors=True)
    candidates = [{"describe": describe_params(t["params"]), "params": t["params"], "ppl": t["values"][0],
                   "size": t["values"][1], "speed": 1 / t["values"][2], "on_front": t["number"] in record["pareto"]}
                  for t in record["trials"]]
    return {"name": spec["target"], **{k: record[k] for k in ("chosen", "search_seconds", "seconds", "recipe",
                                                               "cost_model", "dense", "speed_checks")},
            "trials": len(record["trials"]), "pareto": len(record["pareto"]), "candidates": candidates}


def compare(target_text: str, chosen: dict, single: list[dict]) -> dict:
    """The best single-method result under the target, and which single-method results the auto result dominates."""
    from slimformer.auto import Target

    target = Target.parse(target_text)
    meeting = [p for p in single if target.meets(p)]
    best = min(meeting, key=target.rank) if meeting else None
    measured = chosen["measured"]
    axis = "size" if target.axis == "ppl" else "ppl"
    dominated = [p["name"] for p in single if measured["ppl"] <= p["ppl"] and measured["size"] <= p["size"]
                 and measured["speed"] >= p["speed"] and (measured["ppl"], measured["size"], measured["speed"])
                 != (p["ppl"], p["size"], p["speed"])]
    return {"best_single": best, "axis": axis, "meets": target.meets(measured),
            "as_good": best is None or measured[axis] <= best[axis], "dominates": dominated}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="size=0.25,speed=2,ppl=+10%")
    parser.add_argument("--budget", default="20m", help="search time per target (90s, 20m, 1h)")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return
    from slimformer.cli.verbs import _seconds

    single = single_method_results()
    path = RESULTS / "auto_smollm2.json"
    results = {r["name"]: r for r in (json.loads(path.read_text())["runs"] if path.exists() else [])}
    for target in args.targets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            spec = {"target": target, "budget_s": _seconds(args.budget), "trials": args.trials, "out": f"{tmp}/out"}
            for r in run_children(__file__, [spec], []):
                r["comparison"] = compare(target, r["chosen"], single)
                results[target] = r
        rows = []
        for name, r in results.items():
            m, p, c = r["chosen"]["measured"], r["chosen"]["predicted"], r["comparison"]
            best = c["best_single"]
            rows.append((f"auto {name}: {r['chosen']['describe']}",
                         f"ppl {m['ppl_after']:.2f} (×{m['ppl']:.3f}) · size {m['size']:.3f} · decode "
                         f"{m['decode_tok_s_after']:.1f} tok/s ({m['speed']:.2f}×; predicted {p['speed']:.2f}×) · "
                         f"{'meets' if c['meets'] else 'misses'} the target · {r['trials']} candidates, "
                         f"{r['pareto']} on the front, search {r['search_seconds'] / 60:.1f} min, total "
                         f"{r['seconds'] / 60:.1f} min"))
            rows.append((f"best single method for {name}",
                         (f"{best['name']}: ppl ×{best['ppl']:.3f}, size {best['size']:.3f}, decode {best['speed']:.2f}× · "
                          f"auto {'at least as good' if c['as_good'] else 'worse'} on {c['axis']}")
                         if best else "none meets the target"))
            rows.append((f"single methods auto {name} dominates", ", ".join(c["dominates"]) or "none"))
            if r.get("candidates"):
                rows.append((f"auto {name}: the front (predicted)",
                             "; ".join(f"{c['describe']}: ppl ×{c['ppl']:.3f}, size {c['size']:.3f}, {c['speed']:.2f}×"
                                       for c in r["candidates"] if c["on_front"])))
            if r.get("speed_checks"):
                rows.append((f"auto {name}: decode measured / predicted on the front",
                             "; ".join(f"{k['describe']}{' (chosen)' if k['chosen'] else ''}: "
                                       f"{k['measured_speed']:.2f}× / {k['predicted_speed']:.2f}×"
                                       for k in r["speed_checks"])))
        write_result("auto_smollm2", {"runs": list(results.values()), "single_method": single}, rows)


if __name__ == "__main__":
    main()
