"""Every GLUE task: names, labels and metrics, and readers of the GLUE TSV files in their official layouts.

The files are those the GLUE ``download_glue_data.py`` script writes, under
``<data dir>/glue/<TASK>/{train,dev}.tsv`` (MNLI: ``dev_matched.tsv`` and
``dev_mismatched.tsv``). They are read as the Hugging Face ``glue`` builder reads them:
tab-separated with ``csv.QUOTE_NONE`` (the sentences contain unbalanced quote characters),
columns by their header name — except CoLA, whose files have no header row (source, label,
original label, sentence) — and the label mapped with GLUE's convention (RTE: ``entailment``
= 0, ``not_entailment`` = 1; MNLI: entailment, neutral, contradiction). STS-B's label is a
similarity score in [0, 5], kept as a float: a regression task. MRPC's ``train.tsv`` from
that script holds 3,667 pairs, one fewer than the official 3,668 the hub builder rebuilds
from the raw corpus.

Metrics are those GLUE reports: Matthews correlation for CoLA, Pearson and Spearman
correlation for STS-B, accuracy and F1 for MRPC and QQP, accuracy elsewhere; the first one
listed is the task's ``score`` (what a search maximises).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from slimformer.data.sources import data_dir
from slimformer.errors import SlimformerError


@dataclass(frozen=True)
class TaskInfo:
    """A GLUE task: its files, which columns hold the texts and label, its labels (none: regression) and metrics."""

    name: str
    folder: str
    text_a: str | int  # a header name, or a column index for files without a header row
    text_b: str | int | None
    label: str | int
    label_names: tuple[str, ...]  # label i is label_names[i]; empty for a regression task
    label_values: tuple[str, ...]  # how label i is written in the files
    metrics: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("dev",)
    header: bool = True

    @property
    def regression(self) -> bool:
        """Whether the label is a score (STS-B) rather than a class."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Outputs of the classifier's head: one per class, one score for regression."""
        return len(self.label_names) or 1

    @property
    def is_pair(self) -> bool:
        """Whether each example is a pair of sentences."""
        return self.text_b is not None

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits with labels: ``train``, ``dev`` (an alias of the first dev split) and every dev split."""
        return ("train", "dev", *(s for s in self.dev_splits if s != "dev"))


@dataclass
class GlueExample:
    """One example: a sentence (or a pair of them) and its label (an int, or a float score for regression)."""

    text_a: str
    text_b: str | None
    label: int | float


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, TaskInfo] = {
    "cola": TaskInfo("cola", "CoLA", 3, None, 1, ("unacceptable", "acceptable"), _BINARY, ("matthews",), header=False),
    "sst2": TaskInfo("sst2", "SST-2", "sentence", None, "label", ("negative", "positive"), _BINARY, ("accuracy",)),
    "mrpc": TaskInfo("mrpc", "MRPC", "#1 String", "#2 String", "Quality",
                     ("not_equivalent", "equivalent"), _BINARY, ("accuracy", "f1")),
    "stsb": TaskInfo("stsb", "STS-B", "sentence1", "sentence2", "score", (), (), ("pearson", "spearman")),
    "qqp": TaskInfo("qqp", "QQP", "question1", "question2", "is_duplicate",
                    ("not_duplicate", "duplicate"), _BINARY, ("accuracy", "f1")),
    "mnli": TaskInfo("mnli", "MNLI", "sentence1", "sentence2", "gold_label",
                     ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
                     ("accuracy",), dev_splits=("dev_matched", "dev_mismatched")),
    "qnli": TaskInfo("qnli", "QNLI", "question", "sentence", "label", _NLI2, _NLI2, ("accuracy",)),
    "rte": TaskInfo("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, _NLI2, ("accuracy",)),
    "wnli": TaskInfo("wnli", "WNLI", "sentence1", "sentence2", "label", ("not_entailment", "entailment"), _BINARY,
                     ("accuracy",)),
}


def glue_task(name: str | TaskInfo) -> TaskInfo:
    """The task a name means, ignoring case, a ``glue:`` prefix and ``-``/``_`` (``SST-2``, ``glue:rte``, ``STS-B``)."""
    if isinstance(name, TaskInfo):
        return name
    key = name.strip().lower().removeprefix("glue:").replace("-", "").replace("_", "")
    try:
        return GLUE_TASKS[key]
    except KeyError:
        raise SlimformerError(f"unknown GLUE task '{name}'; choose one of {', '.join(GLUE_TASKS)}") from None


def glue_file(task: str | TaskInfo, split: str = "train") -> Path:
    """The TSV file of a task's split; a clear error when it is missing."""
    info = glue_task(task)
    if split not in info.splits:
        raise SlimformerError(f"unknown split '{split}' of GLUE {info.name}; choose one of {', '.join(info.splits)}")
    name = info.dev_splits[0] if split == "dev" else split
    path = data_dir(required=True) / "glue" / info.folder / f"{name}.tsv"
    if not path.is_file():
        raise SlimformerError(
            f"GLUE file not found: {path}; set SLIMFORMER_DATA to a folder holding glue/{info.folder}/{name}.tsv"
        )
    return path


def _columns(info: TaskInfo, rows, path: Path) -> tuple[dict, int]:
    """Column index of each wanted field, and the number of fields a row must have."""
    wanted = [c for c in (info.text_a, info.text_b, info.label) if c is not None]
    if not info.header:
        return {c: c for c in wanted}, max(wanted) + 1
    header = next(rows, [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise SlimformerError(f"{path}:1: the header has no column {', '.join(repr(c) for c in missing)} "
                              f"(GLUE {info.name} needs {', '.join(repr(c) for c in wanted)})")
    return {c: header.index(c) for c in wanted}, len(header)


def _label(info: TaskInfo, value: str, where: str) -> int | float:
    if info.regression:
        try:
            return float(value)
        except ValueError:
            raise SlimformerError(f"{where}: label '{value}' is not a number") from None
    if value not in info.label_values:
        raise SlimformerError(f"{where}: label '{value}' is not one of {', '.join(info.label_values)}")
    return info.label_values.index(value)


def load_glue(task: str | TaskInfo, split: str = "train") -> list[GlueExample]:
    """The examples of a task's split (``train``, ``dev``, or one of ``info.dev_splits``), in file order.

    A line with too few fields, an empty text or an unknown label is an error naming the file and line.
    """
    info = glue_task(task)
    path = glue_file(info, split)
    examples = []
    # utf-8-sig: the MRPC files start with a byte-order mark, which would otherwise stick to the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        col, width = _columns(info, rows, path)
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if not row:
                continue
            if len(row) < width:
                raise SlimformerError(f"{where}: expected {width} tab-separated fields, found {len(row)}")
            label = _label(info, row[col[info.label]].strip(), where)
            texts = [row[col[c]] for c in (info.text_a, info.text_b) if c is not None]
            if not all(t.strip() for t in texts):
                raise SlimformerError(f"{where}: empty sentence")
            examples.append(GlueExample(texts[0], texts[1] if info.is_pair else None, label))
    if not examples:
        raise SlimformerError(f"{path} has no examples")
    return examples
