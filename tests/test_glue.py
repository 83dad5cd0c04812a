"""GLUE: the TSV readers on the real files, batching, the classifier on an encoder, fine-tuning and evaluation."""

import json
import math
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from slimformer import SlimformerError
from slimformer.data import GLUE_TASKS, GlueExample, data_dir, glue_task, load_glue
from slimformer.evaluation import batches, classifier_from, evaluate_classifier, finetune_classifier
from slimformer.cli import main
from slimformer.evaluation import run_glue
from slimformer.evaluation.glue import f1, matthews, pearson, predict, spearman
from slimformer.models import save_model
from conftest import TINY_REL, tiny_model, tiny_tokenizer


# Counts and label-1 counts were taken from the files with awk, independently of the reader.
@pytest.mark.parametrize("task, split, count, ones", [
    ("sst2", "dev", 872, 444), ("sst2", "train", 67349, 37569),
    ("mrpc", "dev", 408, 279), ("mrpc", "train", 3667, 2473),
    ("rte", "dev", 277, 131), ("rte", "train", 2490, 1241),
])
def test_readers_count_examples_and_labels(task, split, count, ones):
    examples = load_glue(task, split)
    assert len(examples) == count
    assert sum(e.label for e in examples) == ones
    assert all((e.text_b is not None) == GLUE_TASKS[task].is_pair for e in examples)


def test_readers_fields_of_the_first_lines():
    sst2 = load_glue("SST-2", "dev")
    assert sst2[:2] == [GlueExample("it 's a charming and often affecting journey . ", None, 1),
                        GlueExample("unflinchingly bleak and desperate ", None, 0)]
    mrpc = load_glue("mrpc", "train")[0]  # the file starts with a byte-order mark, and quotes stay as written
    assert mrpc.text_a.startswith('Amrozi accused his brother , whom he called " the witness " ,')
    assert mrpc.text_b.startswith('Referring to him as only " the witness " , Amrozi')
    assert mrpc.label == 1
    quoted = '" The foodservice pie business does not fit our long-term growth strategy .'
    assert load_glue("mrpc", "dev")[0].text_b == quoted
    rte = load_glue("glue:rte", "dev")[:2]
    assert rte[0] == GlueExample(rte[0].text_a, "Christopher Reeve had an accident.", 1)  # not_entailment
    assert rte[0].text_a.startswith("Dana Reeve, the widow of the actor")
    assert rte[1].text_b == "Bacteria is winning the war against antibiotics." and rte[1].label == 0  # entailment


def test_task_names_and_info():
    assert glue_task("SST-2").name == glue_task("glue:sst2").name == glue_task(" sst_2 ").name == "sst2"
    assert glue_task("GLUE:RTE").name == "rte"
    assert glue_task("MRPC").metrics == ("accuracy", "f1") and glue_task("mrpc").num_labels == 2
    assert glue_task("rte").label_names[0] == "entailment"
    assert glue_task("CoLA").metrics == ("matthews",) and glue_task("sts-b").regression
    assert glue_task("stsb").num_labels == 1 and glue_task("mnli").num_labels == 3
    with pytest.raises(SlimformerError, match="unknown GLUE task 'colas'; choose one of cola, sst2, mrpc, stsb, qqp, "
                                              "mnli, qnli, rte, wnli"):
        glue_task("colas")
    with pytest.raises(SlimformerError, match="unknown split 'test' of GLUE rte; choose one of train, dev"):
        load_glue("rte", "test")
    with pytest.raises(SlimformerError, match="choose one of train, dev, dev_matched, dev_mismatched"):
        load_glue("mnli", "test")


@pytest.fixture
def rte_copy(tmp_path, monkeypatch):
    """A data directory holding a copy of RTE, to break."""
    folder = tmp_path / "glue" / "RTE"
    folder.mkdir(parents=True)
    shutil.copy(data_dir(required=True) / "glue" / "RTE" / "dev.tsv", folder / "dev.tsv")
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    return folder / "dev.tsv"


def test_bad_lines_name_the_file_and_line(rte_copy):
    lines = rte_copy.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(load_glue("rte", "dev")) == 277
    rte_copy.write_text("".join(lines[:3]) + "3\tonly one sentence\tentailment\n", encoding="utf-8")
    with pytest.raises(SlimformerError, match=r"RTE/dev\.tsv:4: expected 4 tab-separated fields, found 3"):
        load_glue("rte", "dev")
    rte_copy.write_text("".join(lines[:2]) + "1\ta\tb\tmaybe\n", encoding="utf-8")
    with pytest.raises(SlimformerError, match=r"RTE/dev\.tsv:3: label 'maybe' is not one of entailment, not_entailment"):
        load_glue("rte", "dev")
    rte_copy.write_text("index\tsentence1\tlabel\n", encoding="utf-8")
    with pytest.raises(SlimformerError, match=r"RTE/dev\.tsv:1: the header has no column 'sentence2'"):
        load_glue("rte", "dev")


def test_missing_file_says_where_it_looked(rte_copy):
    with pytest.raises(SlimformerError, match=r"GLUE file not found: .*glue/SST-2/train\.tsv; set SLIMFORMER_DATA"):
        load_glue("sst2")


def test_batches_pad_each_batch_to_its_longest_row():
    words = [3, 1, 5, 2, 20]
    examples = [GlueExample(" ".join(f"w{i + 2}" for i in range(n)), None, n % 2) for n in words]
    out = list(batches(tiny_tokenizer(), examples, batch_size=2, max_length=8))
    assert [b["input_ids"].shape for b in out] == [(2, 3), (2, 5), (1, 8)]  # the last one is truncated
    assert [b["attention_mask"].sum(1).tolist() for b in out] == [[3, 1], [5, 2], [8]]
    assert [b["labels"].tolist() for b in out] == [[1, 1], [1, 0], [0]]
    shuffled = [list(batches(tiny_tokenizer(), examples, 2, 8, shuffle=True, seed=s)) for s in (0, 0, 1)]
    order = [[n for b in run for n in b["attention_mask"].sum(1).tolist()] for run in shuffled]
    assert order[0] == order[1] and sorted(order[0]) == [1, 2, 3, 5, 8] and order[0] != order[2]


def test_batches_of_pairs_and_mixed_examples():
    pairs = [GlueExample("w1 w2", "w3", 0), GlueExample("w4", "w5 w6 w7", 1)]
    (batch,) = batches(tiny_tokenizer(), pairs, batch_size=2)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 6, 7]]
    with pytest.raises(SlimformerError, match="mixes single sentences and sentence pairs"):
        list(batches(tiny_tokenizer(), [pairs[0], GlueExample("w1", None, 0)], batch_size=2))


class FixedLogits(nn.Module):
    """A stand-in classifier: the logits of a row are a fixed table's row of its first token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return SimpleNamespace(logits=self.table[input_ids[:, 0]])


def test_evaluate_matches_hand_computed_accuracy_and_f1():
    preds = [1, 1, 0, 0, 1, 0, 1, 1]
    labels = [1, 0, 0, 1, 1, 0, 1, 0]
    # True positives at 0, 4, 6; false positives at 1, 7; a false negative at 3; correct: 0, 2, 4, 5, 6.
    table = torch.zeros(len(preds), 2)
    table[torch.arange(len(preds)), torch.tensor(preds)] = torch.rand(len(preds)) + 0.1
    model = FixedLogits(table).train()
    examples = [GlueExample(f"w{i} w9", f"w{i}", y) for i, y in enumerate(labels)]
    result = evaluate_classifier(model, tiny_tokenizer(), examples, batch_size=3, task="mrpc")
    assert result["accuracy"] == pytest.approx(5 / 8)
    assert result["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert result["examples"] == 8 and result["seconds"] >= 0
    assert model.calls == [(False, False)] * 3 and model.training  # eval mode, no grad, mode restored
    assert "f1" not in evaluate_classifier(model, tiny_tokenizer(), examples, task="rte")
    assert f1([0, 0], [0, 0]) == 0.0


def _has_w1_task(n: int, seed: int) -> list[GlueExample]:
    """Label 1 when the word w1 occurs among 6 random words of w2..w127."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        words = [f"w{rng.randrange(2, 128)}" for _ in range(6)]
        if i % 2:
            words[rng.randrange(6)] = "w1"
        examples.append(GlueExample(" ".join(words), None, i % 2))
    return examples


def test_classifier_shares_the_encoder_with_a_seeded_head():
    encoder = tiny_model("bert")
    layer = encoder.encoder.layer[0]  # a block narrower than the config says, as structural pruning leaves it
    layer.intermediate.dense, layer.output.dense = nn.Linear(32, 8), nn.Linear(8, 32)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model = classifier_from(encoder, num_labels=3, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the global random state is left alone
    assert model.bert is encoder and not model.training
    logits = model(**next(batches(tiny_tokenizer(), _has_w1_task(4, 0), batch_size=4))).logits
    assert logits.shape == (4, 3)
    again, other = classifier_from(tiny_model("bert"), 3, seed=1), classifier_from(tiny_model("bert"), 3, seed=2)
    assert torch.equal(model.classifier.weight, again.classifier.weight)
    assert not torch.equal(model.classifier.weight, other.classifier.weight)
    assert classifier_from(tiny_model("roberta")).roberta.config.model_type == "roberta"
    with pytest.raises(SlimformerError, match="needs an encoder"):
        classifier_from(tiny_model("llama"))


def test_finetuning_learns_an_easy_task():
    torch.set_num_threads(1)
    train, dev = _has_w1_task(256, 0), _has_w1_task(128, 1)
    model, tok = classifier_from(tiny_model("bert")), tiny_tokenizer()
    before = evaluate_classifier(model, tok, dev)["accuracy"]
    out = finetune_classifier(model, tok, train, epochs=8, lr=2e-3, batch_size=16, max_length=16, progress=False)
    after = evaluate_classifier(model, tok, dev)["accuracy"]
    assert out["steps"] == len(out["losses"]) == 8 * 16 and out["seconds"] > 0
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert sum(out["losses"][-16:]) < sum(out["losses"][:16]) / 2


def test_finetuning_is_deterministic_and_step_hook_replaces_the_loss():
    train, tok = _has_w1_task(64, 0), tiny_tokenizer()
    runs = [finetune_classifier(classifier_from(tiny_model("bert")), tok, train, limit=5, batch_size=8,
                                max_length=16, progress=False)["losses"] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 5
    seen = []

    def hook(model, batch):
        seen.append(batch["labels"].shape[0])
        loss = 2 * model(**batch).loss
        seen.append(loss.item())
        return loss

    out = finetune_classifier(classifier_from(tiny_model("bert")), tok, train, limit=3, batch_size=8,
                              max_length=16, progress=False, step_hook=hook)
    assert out["steps"] == 3 and seen[0::2] == [8, 8, 8] and out["losses"] == seen[1::2]
    assert out["losses"][0] == pytest.approx(2 * runs[0][0])  # same first batch and weights, doubled loss
    with pytest.raises(SlimformerError, match="warmup"):
        finetune_classifier(classifier_from(tiny_model("bert")), tok, train, warmup=1.5)


# --- every task in its official file layout -------------------------------------------------------------------
# Two examples per file, written as the GLUE download script lays them out (CoLA without a header row).
LAYOUTS = {
    "CoLA": {"train.tsv": "gj04\t1\t\tw1 w2 w3 .\ngj04\t0\t*\tw4 w5 .\n", "dev.tsv": "gj04\t0\t*\tw6 w7\ngj04\t1\t\tw8\n"},
    "STS-B": {name: "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
              "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tw1 w2\tw1 w3\t3.8\n"
              "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tw4\tw5 w6\t0.5\n" for name in ("train.tsv", "dev.tsv")},
    "MNLI": {name: "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n"
             f"0\t1\t1e\tgov\t( w1 )\t( w2 )\t(ROOT w1)\t(ROOT w2)\tw1 w9\tw2\tneutral\t{gold}\n"
             "1\t2\t2c\tgov\t( w3 )\t( w4 )\t(ROOT w3)\t(ROOT w4)\tw3\tw4 w9\tcontradiction\tcontradiction\n"
             for name, gold in (("train.tsv", "neutral"), ("dev_matched.tsv", "entailment"),
                                ("dev_mismatched.tsv", "neutral"))},
    "QNLI": {name: "index\tquestion\tsentence\tlabel\n0\tw1 w2?\tw3 w4\tentailment\n1\tw5?\tw6\tnot_entailment\n"
             for name in ("train.tsv", "dev.tsv")},
    "QQP": {name: "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tw1?\tw2?\t1\n1\t3\t4\tw3?\tw4 w5?\t0\n"
            for name in ("train.tsv", "dev.tsv")},
    "WNLI": {name: "index\tsentence1\tsentence2\tlabel\n0\tw1 w2\tw3\t1\n1\tw4\tw5\t0\n" for name in ("train.tsv", "dev.tsv")},
}


@pytest.fixture
def glue_layouts(tmp_path, monkeypatch):
    """A data directory with every task above in its official layout."""
    for folder, files in LAYOUTS.items():
        (tmp_path / "glue" / folder).mkdir(parents=True)
        for name, text in files.items():
            (tmp_path / "glue" / folder / name).write_text(text)
    monkeypatch.setenv("SLIMFORMER_DATA", str(tmp_path))
    return tmp_path / "glue"


def test_every_task_reads_its_official_layout(glue_layouts):
    assert load_glue("cola", "train") == [GlueExample("w1 w2 w3 .", None, 1), GlueExample("w4 w5 .", None, 0)]
    stsb = load_glue("stsb", "dev")
    assert stsb == [GlueExample("w1 w2", "w1 w3", 3.8), GlueExample("w4", "w5 w6", 0.5)]
    assert all(isinstance(e.label, float) for e in stsb)
    assert [e.label for e in load_glue("mnli", "dev")] == [0, 2]  # dev is dev_matched
    assert [e.label for e in load_glue("mnli", "dev_mismatched")] == [1, 2]
    assert load_glue("mnli", "train")[0] == GlueExample("w1 w9", "w2", 1)
    assert load_glue("qnli", "dev") == [GlueExample("w1 w2?", "w3 w4", 0), GlueExample("w5?", "w6", 1)]
    assert [e.label for e in load_glue("qqp", "dev")] == [1, 0] and load_glue("qqp", "dev")[1].text_b == "w4 w5?"
    assert [e.label for e in load_glue("wnli", "train")] == [1, 0]


def test_wrong_columns_and_labels_name_the_file_and_line(glue_layouts):
    (glue_layouts / "QNLI" / "dev.tsv").write_text("index\tquestion\tanswer\tlabel\n0\tw1\tw2\tentailment\n")
    with pytest.raises(SlimformerError, match=r"QNLI/dev\.tsv:1: the header has no column 'sentence' \(GLUE qnli needs "
                                              r"'question', 'sentence', 'label'\)"):
        load_glue("qnli", "dev")
    (glue_layouts / "STS-B" / "dev.tsv").write_text(LAYOUTS["STS-B"]["dev.tsv"].replace("3.8", "high"))
    with pytest.raises(SlimformerError, match=r"STS-B/dev\.tsv:2: label 'high' is not a number"):
        load_glue("stsb", "dev")
    (glue_layouts / "CoLA" / "dev.tsv").write_text("gj04\t1\tw1\n")
    with pytest.raises(SlimformerError, match=r"CoLA/dev\.tsv:1: expected 4 tab-separated fields, found 3"):
        load_glue("cola", "dev")


def test_regression_labels_stay_floats_and_predictions_are_the_score():
    examples = [GlueExample("w1 w2", "w3", 3.8), GlueExample("w4", "w5", 0.5)]
    (batch,) = batches(tiny_tokenizer(), examples, batch_size=2)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == pytest.approx([3.8, 0.5])
    model = classifier_from(tiny_model("bert"), num_labels=1)
    assert model.config.problem_type == "regression"
    with torch.no_grad():
        expected = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, 0]
        loss = model(**batch).loss
    assert torch.equal(predict(model, tiny_tokenizer(), examples, batch_size=2), expected)
    assert loss.item() == pytest.approx(torch.nn.functional.mse_loss(expected, batch["labels"]).item(), rel=TINY_REL)


def direct_matthews(preds, labels):
    """MCC of binary predictions from the confusion counts, as GLUE's CoLA score defines it."""
    tp = sum(p == y == 1 for p, y in zip(preds, labels))
    tn = sum(p == y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def test_matthews_pearson_and_spearman_against_direct_computations():
    rng = random.Random(0)
    labels = [rng.randrange(2) for _ in range(50)]
    preds = [y if rng.random() < 0.7 else 1 - y for y in labels]
    assert matthews(preds, labels) == pytest.approx(direct_matthews(preds, labels))
    assert matthews([1, 1, 1], [0, 1, 1]) == 0.0  # undefined when one side is constant, as sklearn reports
    x = [rng.uniform(0, 5) for _ in range(40)]
    y = [v + rng.gauss(0, 1) for v in x]
    mx, my = sum(x) / 40, sum(y) / 40
    direct = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
    assert pearson(x, y) == pytest.approx(direct)
    # Spearman: Pearson of ranks, ties at their mean rank
    assert spearman([1.0, 2.0, 2.0, 4.0], [10.0, 20.0, 30.0, 40.0]) == pytest.approx(
        pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0)  # any increasing map ranks the same


@pytest.mark.parametrize("task", ["cola", "stsb", "mnli", "qnli", "qqp", "wnli"])
def test_run_glue_reports_the_task_metrics_on_every_dev_split(glue_layouts, task):
    model, result = run_glue(tiny_model("bert"), tiny_tokenizer(), task, epochs=1, batch_size=2, max_length=16,
                             progress=False)
    info = glue_task(task)
    assert set(result["metrics"]) == set(info.dev_splits)
    for split, metrics in result["metrics"].items():
        assert {*info.metrics, "score", "examples"} <= set(metrics) and metrics["examples"] == 2
        assert metrics["score"] == metrics[info.metrics[0]]
    assert model.num_labels == info.num_labels and result["steps"] == 1


def test_cli_glue_prints_the_metric_and_saves_the_classifier(glue_layouts, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    encoder = save_model(tiny_model("bert"), tiny_tokenizer(), tmp_path / "bert")
    out = tmp_path / "cola"
    assert main(["glue", str(encoder), "--task", "CoLA", "--epochs", "1", "--train-limit", "1", "--batch-size", "1",
                 "--max-length", "16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "matthews" in printed and "1 training examples" in printed
    saved = json.loads((out / "glue.json").read_text())
    assert saved["task"] == "cola" and saved["train_examples"] == 1 and "matthews" in saved["metrics"]["dev"]
    assert AutoModelForSequenceClassification.from_pretrained(out).num_labels == 2
    assert main(["glue", str(encoder), "--task", "colas"]) == 2
    assert "unknown GLUE task 'colas'" in capsys.readouterr().err
