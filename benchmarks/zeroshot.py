"""Dense SmolLM2-135M zero-shot on PIQA, ARC-Easy and BoolQ (full sets): acc, acc_norm and evaluation throughput,
next to the figures the model's card publishes.

Prompts and scoring follow lm-evaluation-harness (see slimformer.evaluation.zeroshot); batch 16,
2 threads. Each task runs in its own process, so a task that fails loses only itself. Our model
is the GGUF Q4_1 export of SmolLM2-135M-Instruct de-quantised to float32, not the bf16 weights
the card measured.

    python benchmarks/zeroshot.py [--limit N] [--only piqa] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess

import torch

from common import run_children, write_result

TASKS = ["piqa", "arc_easy", "boolq"]
CARD = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"
# The card's "Instruction model" table, evaluated with lighteval, zero-shot. The metric is not named
# there; SmolLM's lighteval task config (huggingface/smollm, text/evaluation/tasks.py) scores PIQA
# (harness prompt) and ARC with loglikelihood_acc_norm_nospace: the log-likelihood per character of
# the choice, i.e. the harness's acc_norm. The card's ARC is the mean of ARC-Easy and ARC-Challenge,
# so there is no ARC-Easy figure; BoolQ is not reported.
PUBLISHED = {
    "piqa": "66.3 (acc_norm, lighteval, 0-shot, bf16 weights; model card, Instruction model table); "
            "66.9 (acc_norm, lm-eval 0-shot, bf16 weights, third-party measurement)",
    "arc_easy": "54.1 (acc, lm-eval 0-shot, bf16 weights, third-party measurement); the card gives only "
                "ARC (Average) of Easy and Challenge: 37.3",
    "boolq": "—",
}


def one_task(task: str, limit: int | None, batch_size: int, threads: int) -> dict:
    """Load the model and score one task; runs in a child process."""
    from slimformer import load_model
    from slimformer.evaluation import evaluate_task

    torch.set_num_threads(threads)
    loaded = load_model("smollm2-135m")
    return evaluate_task(loaded.model, loaded.tokenizer, task, limit=limit, batch_size=batch_size, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="the first N examples of each task (quick run)")
    parser.add_argument("--only", default=None, choices=TASKS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(one_task(json.loads(args.child), args.limit, args.batch_size, args.threads)))
        return
    extra = ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    if args.limit is not None:
        extra += ["--limit", str(args.limit)]
    results, rows = [], []
    for task in [t for t in TASKS if args.only in (None, t)]:
        try:
            r = run_children(__file__, [task], extra)[0]
        except subprocess.CalledProcessError as e:
            error = (e.stderr or "").strip().splitlines()[-1:] or [f"exit status {e.returncode}"]
            results.append({"task": task, "error": error[0]})
            rows.append((task, f"failed: {error[0]}"))
            print(f"{task} failed:\n{e.stderr}", flush=True)
            continue
        results.append(r)
        rows.append((f"{task} ({r['examples']} examples)",
                     f"acc {100 * r['acc']:.1f} · acc_norm {100 * r['acc_norm']:.1f} "
                     f"(normalisation changes {r['norm_changes_choice']} choices) · "
                     f"{r['seconds']:.1f} s, {r['examples_per_s']:.2f} examples/s · published: {PUBLISHED[task]}"))
    rows.append(("published figures", f"{CARD} (lighteval, acc_norm; the card's ARC is Easy and Challenge averaged)"))
    payload = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct, GGUF Q4_1 de-quantised to float32)",
        "limit": args.limit, "batch_size": args.batch_size, "threads": args.threads,
        "tasks": results, "published": {"source": CARD, "figures": PUBLISHED},
    }
    # partial runs get their own files, so they never pass for the full benchmark
    name = "zeroshot_smollm2" + (f"_{args.only}" if args.only else "") + (f"_limit{args.limit}" if args.limit else "")
    write_result(name, payload, rows)


if __name__ == "__main__":
    main()
