"""Zero-shot multiple choice: the batched scorer against a slow reference, the task readers on the real files
(prompts equal to lm-evaluation-harness's templates), bad task files, and agreement with the harness itself."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY_REL, tiny_model, tiny_tokenizer
from slimformer.data import data_dir
from slimformer.data.tasks import TASKS, LMExample, MCExample, PartialExample, load_task
from slimformer.errors import SlimformerError
from slimformer.evaluation.zeroshot import evaluate_task, score_choices


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(1, 128)}" for _ in range(n))


def synthetic(
    n: int, seed: int = 0, context_words: tuple[int, int] = (1, 20), choice_words: tuple[int, int] = (1, 5)
) -> list[MCExample]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        choices = [words(rng, rng.randint(*choice_words)) for _ in range(rng.randint(2, 4))]
        examples.append(MCExample(words(rng, rng.randint(*context_words)), choices, 0))
    return examples


def reference(model, tokenizer, example: MCExample, max_len: int = 64) -> list[float]:
    """One pair at a time: the whole sequence through the model, log-softmax, sum over the choice's tokens."""
    scores = []
    for choice in example.choices:
        ctx = tokenizer.encode(example.context)
        full = tokenizer.encode(example.context + " " + choice)
        n_cont = len(full) - len(ctx)
        full = full[-(max_len + 1) :]  # the harness keeps the last max_len + 1 tokens
        logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), -1)
        scores.append(sum(logp[p - 1, full[p]].item() for p in range(len(full) - n_cont, len(full))))
    return scores


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_batched_scores_equal_one_at_a_time_reference(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    # contexts up to 80 words: some pairs are longer than the 64 positions and lose context on the left
    examples = synthetic(12, seed=1, context_words=(1, 80))
    got = score_choices(model, tok, examples, batch_size=5, progress=False)
    assert [len(g) for g in got] == [len(ex.choices) for ex in examples]
    for ex, scores in zip(examples, got):
        assert scores == pytest.approx(reference(model, tok, ex), abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_token_choices_share_a_forward_and_equal_the_reference(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    # BoolQ-like: every choice one token, some contexts past the 64 positions (cut on the left)
    one_token = synthetic(9, seed=5, context_words=(1, 80), choice_words=(1, 1))
    mixed = one_token + synthetic(5, seed=6, context_words=(1, 80), choice_words=(2, 5))
    counted = Counting(model)
    got = score_choices(counted, tok, mixed, batch_size=4, progress=False)
    for ex, scores in zip(mixed, got):
        assert scores == pytest.approx(reference(model, tok, ex), abs=1e-4)
    multi_rows = sum(len(ex.choices) for ex in mixed[9:])  # these choices start with different words
    assert counted.rows == 9 + multi_rows
    # and alone, with rows of one per forward: one forward per example, its choices all read there
    counted = Counting(model)
    alone = score_choices(counted, tok, one_token, batch_size=1, progress=False)
    for a, b in zip(alone, got):
        assert a == pytest.approx(b, abs=1e-4)
    assert (counted.calls, counted.rows) == (9, 9)


def test_choices_feeding_the_same_tokens_share_a_row():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    # fed tokens: "w1 w2" for w5 and w6, "w1 w2 w7" for both "w7 ..." choices
    example = MCExample("w1 w2", ["w5", "w6", "w7 w8", "w7 w9"], 0)
    counted = Counting(model)
    got = score_choices(counted, tok, [example], progress=False)
    assert counted.rows == 2
    assert got[0] == pytest.approx(reference(model, tok, example), abs=1e-4)


class Counting(torch.nn.Module):
    """A causal LM that counts its forward calls and the rows they were given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.calls = self.rows = 0

    def forward(self, input_ids, attention_mask=None, use_cache=None, logits_to_keep=0):
        self.calls += 1
        self.rows += input_ids.shape[0]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache,
                          logits_to_keep=logits_to_keep)


class FullLogits(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the scorer must index the full-length logits."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_models_without_logits_to_keep_score_the_same():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    examples = synthetic(8, seed=4, context_words=(1, 80))
    trimmed = score_choices(model, tok, examples, batch_size=3, progress=False)
    full = score_choices(FullLogits(model), tok, examples, batch_size=3, progress=False)
    for a, b, ex in zip(trimmed, full, examples):
        assert a == pytest.approx(b, abs=1e-4)
        assert a == pytest.approx(reference(model, tok, ex), abs=1e-4)


def test_evaluate_task_counts_the_best_choice(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    examples = synthetic(10, seed=2)
    scores = score_choices(model, tok, examples, progress=False)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    best_norm = [max(range(len(s)), key=lambda i: s[i] / len(ex.choices[i])) for s, ex in zip(scores, examples)]
    gold = [b if i < 7 else (b + 1) % len(ex.choices) for i, (b, ex) in enumerate(zip(best, examples))]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps({"context": e.context, "choices": e.choices, "gold": g}) + "\n"
                            for e, g in zip(examples, gold)))
    result = evaluate_task(model, tok, str(path), batch_size=4, progress=False)
    assert result["acc"] == pytest.approx(0.7)
    assert result["acc_norm"] == pytest.approx(sum(b == g for b, g in zip(best_norm, gold)) / 10)
    assert result["examples"] == 10 and result["examples_per_s"] > 0
    assert evaluate_task(model, tok, f"jsonl:{path}", limit=3, progress=False)["examples"] == 3


# --- the readers on the real files, against the harness's own task definitions -------------------------------

HARNESS_TASKS = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "boolq": "super_glue/boolq/default.yaml"}


def harness_prompt(task: str, doc: dict) -> str:
    """The harness's ``doc_to_text`` for ``task``, read from the installed lm_eval package and rendered."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.utils import apply_template

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / HARNESS_TASKS[task]).read_text())
    return apply_template(config["doc_to_text"], doc)


def raw_lines(relpath: str, n: int) -> list[dict]:
    with (data_dir(required=True) / relpath).open() as f:
        return [json.loads(next(f)) for _ in range(n)]


def test_piqa_prompts_are_the_harness_template():
    examples = load_task("piqa", limit=5)
    labels = (data_dir(required=True) / "piqa" / "valid-labels.lst").read_text().split()[:5]
    for ex, raw, label in zip(examples, raw_lines("piqa/valid.jsonl", 5), labels):
        assert ex.context == harness_prompt("piqa", raw) == f"Question: {raw['goal']}\nAnswer:"
        assert ex.choices == [raw["sol1"], raw["sol2"]]
        assert ex.gold == int(label)
    assert [ex.gold for ex in examples] == [0, 1, 1, 1, 0]


def test_arc_easy_prompts_are_the_harness_template():
    examples = load_task("arc_easy", limit=5)
    for ex, raw in zip(examples, raw_lines("arc-easy/arc_easy_test.mosaicml.jsonl", 5)):
        question = raw["query"].removeprefix("Question: ")
        assert ex.context == harness_prompt("arc_easy", {"question": question})
        assert ex.context.endswith("?\nAnswer:") and len(ex.choices) == 4
        assert (ex.choices, ex.gold) == (raw["choices"], raw["gold"])
    assert examples[0].choices[examples[0].gold] == "Sunlight is the source of energy for nearly all ecosystems."


def test_boolq_prompts_are_the_harness_template():
    examples = load_task("boolq", limit=5)
    for ex, raw in zip(examples, raw_lines("boolq/boolq_dev.mosaicml.jsonl", 5)):
        passage, question = raw["query"].removeprefix("Passage: ").split("\nQuestion: ")
        doc = {"passage": passage, "question": question.removesuffix("?")}
        assert ex.context == harness_prompt("boolq", doc)
        assert (ex.choices, ex.gold) == (["no", "yes"], raw["gold"])
    # SuperGLUE's first validation question, answered "no"
    assert "\nQuestion: does ethanol take more energy make that produces?\nAnswer:" in examples[0].context
    assert examples[0].gold == 0


def test_boolq_passages_get_their_question_words_back():
    # MosaicML wrote "answer general knowledge\nQuestions to win" for "... knowledge questions to win"
    tipping_point = load_task("boolq", limit=46)[45].context
    assert "general knowledge questions to win" in tipping_point
    assert tipping_point.count("\n") == 2
    assert tipping_point.endswith("\nQuestion: does only the winner get money on tipping point?\nAnswer:")


@pytest.mark.parametrize(("task", "count"), [("piqa", 1838), ("arc_easy", 2376), ("boolq", 3270)])
def test_task_sizes(task, count):
    examples = load_task(task)
    assert len(examples) == count
    assert all(0 <= ex.gold < len(ex.choices) for ex in examples)
    assert len(load_task(task, limit=7)) == 7


# --- bad input ---------------------------------------------------------------------------------------------------

GOOD = {"context": "w1 w2", "choices": ["w3", "w4"], "gold": 1}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"context": "w1", "choices": ["w3"', "not valid JSON"),
        (json.dumps({"context": "w1", "choices": ["w3", "w4"]}), "missing field 'gold'"),
        (json.dumps({**GOOD, "gold": 2}), "gold 2 is out of range for 2 choices"),
        (json.dumps({**GOOD, "gold": True}), "field 'gold' must be int"),
        (json.dumps({**GOOD, "choices": "w3 w4"}), "field 'choices' must be list"),
        (json.dumps({**GOOD, "choices": []}), "non-empty list of strings"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_generic_file_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(SlimformerError, match=message) as err:
        load_task(str(path))
    assert f"{path}:3:" in str(err.value)


def test_piqa_labels_must_match_the_questions(tmp_path, monkeypatch):
    (tmp_path / "piqa").mkdir()
    row = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    (tmp_path / "piqa" / "valid.jsonl").write_text(f"{row}\n{row}\n")
    labels = tmp_path / "piqa" / "valid-labels.lst"
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    labels.write_text("0\n")
    with pytest.raises(SlimformerError, match="has 1 labels but .*valid.jsonl has 2 questions"):
        load_task("piqa")
    labels.write_text("0\n2\n")
    with pytest.raises(SlimformerError, match=r"valid-labels.lst:2: label must be 0 or 1"):
        load_task("piqa")
    labels.write_text("1\n0\n")
    assert [ex.gold for ex in load_task("piqa")] == [1, 0]


def test_unknown_task_and_missing_file(tmp_path, monkeypatch):
    with pytest.raises(SlimformerError, match="unknown task 'swag'.*piqa, arc_easy, arc_challenge"):
        load_task("swag")
    with pytest.raises(SlimformerError, match="task file not found"):
        load_task("jsonl:/nonexistent/task.jsonl")
    with pytest.raises(SlimformerError, match="limit must be at least 1"):
        load_task("piqa", limit=0)
    assert set(TASKS) == {"piqa", "arc_easy", "arc_challenge", "boolq", "hellaswag", "winogrande", "lambada"}
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    with pytest.raises(SlimformerError, match=f"task 'arc_challenge': no jsonl file in {tmp_path}/arc_challenge and "
                                              f"{tmp_path}/arc-challenge"):
        load_task("arc_challenge")


# --- agreement with lm-evaluation-harness ------------------------------------------------------------------------


def test_lm_eval_on_a_local_task_agrees_with_evaluate_task(tmp_path):
    pytest.importorskip("lm_eval")
    from slimformer.evaluation.lm_eval_bridge import run_lm_eval, write_task_yaml

    model, tok = tiny_model("llama"), tiny_tokenizer()
    examples = synthetic(16, seed=3)
    rng = random.Random(3)
    data = tmp_path / "syn.jsonl"
    data.write_text("".join(json.dumps({"context": e.context, "choices": e.choices,
                                        "gold": rng.randrange(len(e.choices))}) + "\n" for e in examples))
    write_task_yaml(data, tmp_path / "tasks", "syn_mc")
    harness = run_lm_eval(model, tok, ["syn_mc"], batch_size=4, include_path=tmp_path / "tasks", log_samples=True)
    ours = evaluate_task(model, tok, str(data), progress=False)
    metrics = harness["results"]["syn_mc"]
    assert metrics["acc"] == pytest.approx(ours["acc"])
    assert metrics["acc_norm"] == pytest.approx(ours["acc_norm"])
    lls = score_choices(model, tok, load_task(str(data)), progress=False)
    assert len(harness["samples"]["syn_mc"]) == 16
    for theirs, mine in zip(harness["samples"]["syn_mc"], lls):
        assert theirs == pytest.approx(mine, abs=1e-4)


# --- partial scoring and language modelling ------------------------------------------------------------------


def continuation_ll(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One request alone: log-likelihood of the continuation's tokens after the context, and whether it is greedy."""
    ctx = tokenizer.encode(context)
    full = tokenizer.encode(context + continuation)
    n = len(full) - len(ctx)
    logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].double(), -1)
    positions = range(len(full) - n, len(full))
    return (sum(logp[p - 1, full[p]].item() for p in positions),
            all(logp[p - 1].argmax().item() == full[p] for p in positions))


def test_partial_scoring_scores_the_shared_continuation_after_each_context(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rng = random.Random(7)
    rows = [{"context_options": [words(rng, rng.randint(1, 12)) for _ in range(2)],
             "continuation": words(rng, rng.randint(1, 6)), "gold": rng.randrange(2)} for _ in range(10)]
    path = tmp_path / "wino.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_task(str(path))
    assert all(isinstance(ex, PartialExample) for ex in examples)
    result = evaluate_task(model, tok, str(path), batch_size=3, progress=False)
    with torch.no_grad():
        picks = [max(range(2), key=lambda k: continuation_ll(model, tok, r["context_options"][k],
                                                             " " + r["continuation"])[0]) for r in rows]
    assert result["layout"] == "partial scoring" and "acc_norm" not in result
    assert result["acc"] == pytest.approx(sum(p == r["gold"] for p, r in zip(picks, rows)) / 10)


def test_language_modelling_counts_greedy_matches_and_the_perplexity(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rng = random.Random(8)
    contexts = [words(rng, rng.randint(2, 10)) for _ in range(6)]
    with torch.no_grad():  # the model's own greedy next word: a continuation it must reproduce
        greedy = [f"w{model(torch.tensor([tok.encode(c)])).logits[0, -1].argmax().item()}" for c in contexts]
    rows = [{"context": c, "continuation": g if k % 2 == 0 else words(rng, 3)}
            for k, (c, g) in enumerate(zip(contexts, greedy))]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = evaluate_task(model, tok, str(path), progress=False)
    with torch.no_grad():
        refs = [continuation_ll(model, tok, r["context"], " " + r["continuation"]) for r in rows]
    assert result["layout"] == "language modelling"
    assert result["acc"] == pytest.approx(sum(g for _, g in refs) / 6) and result["acc"] >= 0.5
    assert result["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in refs) / 6), rel=TINY_REL)


def test_a_file_in_no_layout_is_named_with_its_line(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text("\n" + json.dumps({"question": "w1", "answer": "w2"}) + "\n")
    with pytest.raises(SlimformerError, match=rf"{path}:2: fields \['answer', 'question'\] match no task layout "
                                              r"\(multiple choice: query \(or context\), choices, gold; partial"):
        load_task(str(path))
    path.write_text(json.dumps({"context_options": ["w1", "w2"], "continuation": "w3", "gold": 0}) + "\n"
                    + json.dumps({"context_options": ["w1"], "continuation": "w3"}) + "\n")
    with pytest.raises(SlimformerError, match=rf"{path}:2: missing field 'gold'"):
        load_task(str(path))


def test_named_tasks_read_their_folder_in_the_data_directory(tmp_path, monkeypatch):
    files = {
        "arc_challenge": {"query": "Question: w1 w2?", "choices": ["w3", "w4"], "gold": 1},
        "hellaswag": {"query": "w5: w6 w7", "choices": ["w8", "w9 w10"], "gold": 0},
        "winogrande": {"context_options": ["w1 w2", "w1 w3"], "continuation": "w4 w5", "gold": 1},
        "lambada": {"context": "w1 w2 w3", "continuation": "w4"},
    }
    for name, row in files.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.mosaicml.jsonl").write_text(json.dumps(row) + "\n")
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    arc, = load_task("arc_challenge")
    assert arc == MCExample("Question: w1 w2?\nAnswer:", ["w3", "w4"], 1)  # the harness's ARC prompt
    assert load_task("hellaswag") == [MCExample("w5: w6 w7", ["w8", "w9 w10"], 0)]
    assert load_task("winogrande") == [PartialExample(["w1 w2", "w1 w3"], "w4 w5", 1)]
    assert load_task("lambada") == [LMExample("w1 w2 w3", "w4")]
    model, tok = tiny_model("llama"), tiny_tokenizer()
    layouts = {t: evaluate_task(model, tok, t, progress=False)["layout"] for t in files}
    assert layouts == {"arc_challenge": "multiple choice", "hellaswag": "multiple choice",
                       "winogrande": "partial scoring", "lambada": "language modelling"}
    (tmp_path / "lambada" / "second.jsonl").write_text("")
    with pytest.raises(SlimformerError, match="holds several jsonl files"):
        load_task("lambada")
