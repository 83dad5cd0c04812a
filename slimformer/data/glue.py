"""GLUE classification tasks (SST-2, MRPC, RTE): task names, labels and metrics, and readers of the GLUE TSV files.

The files are those the GLUE ``download_glue_data.py`` script writes, under
``<data dir>/glue/<TASK>/{train,dev}.tsv``. They are read as the Hugging Face ``glue``
builder reads them: tab-separated with ``csv.QUOTE_NONE`` (the sentences contain unbalanced
quote characters), the label mapped to an integer with GLUE's convention (RTE:
``entailment`` = 0, ``not_entailment`` = 1). MRPC's ``train.tsv`` from that script holds 3,667
pairs, one fewer than the official 3,668 the hub builder rebuilds from the raw corpus.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from slimformer.data.sources import data_dir
from slimformer.errors import SlimformerError

SPLITS = ("train", "dev")


@dataclass(frozen=True)
class TaskInfo:
    """A GLUE task: where its files are, which columns hold the texts and label, its labels and metrics."""

    name: str
    folder: str
    text_a: str
    text_b: str | None
    label: str
    label_names: tuple[str, ...]  # label i is label_names[i]
    label_values: tuple[str, ...]  # how label i is written in the files
    metrics: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return self.text_b is not None


@dataclass
class GlueExample:
    """One example: a sentence (or a pair of them) and its integer label."""

    text_a: str
    text_b: str | None
    label: int


GLUE_TASKS: dict[str, TaskInfo] = {
    "sst2": TaskInfo("sst2", "SST-2", "sentence", None, "label",
                     ("negative", "positive"), ("0", "1"), ("accuracy",)),
    "mrpc": TaskInfo("mrpc", "MRPC", "#1 String", "#2 String", "Quality",
                     ("not_equivalent", "equivalent"), ("0", "1"), ("accuracy", "f1")),
    "rte": TaskInfo("rte", "RTE", "sentence1", "sentence2", "label",
                    ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",)),
}


def glue_task(name: str) -> TaskInfo:
    """The task a name means, ignoring case, a ``glue:`` prefix and ``-``/``_`` (``SST-2``, ``glue:rte``)."""
    key = name.strip().lower().removeprefix("glue:").replace("-", "").replace("_", "")
    try:
        return GLUE_TASKS[key]
    except KeyError:
        raise SlimformerError(f"unknown GLUE task '{name}'; choose one of {', '.join(GLUE_TASKS)}") from None


def glue_file(task: str | TaskInfo, split: str = "train") -> Path:
    """The TSV file of a task's split; a clear error when it is missing."""
    info = task if isinstance(task, TaskInfo) else glue_task(task)
    if split not in SPLITS:
        raise SlimformerError(f"unknown GLUE split '{split}'; choose {' or '.join(SPLITS)}")
    path = data_dir(required=True) / "glue" / info.folder / f"{split}.tsv"
    if not path.is_file():
        raise SlimformerError(
            f"GLUE file not found: {path}; set SLIMFORMER_DATA to a folder holding glue/{info.folder}/{split}.tsv"
        )
    return path


def load_glue(task: str | TaskInfo, split: str = "train") -> list[GlueExample]:
    """The examples of a task's ``train`` or ``dev`` split, in file order.

    A line with too few fields, an empty text or an unknown label is an error naming the file and line.
    """
    info = task if isinstance(task, TaskInfo) else glue_task(task)
    path = glue_file(info, split)
    labels = {value: i for i, value in enumerate(info.label_values)}
    examples = []
    # utf-8-sig: the MRPC files start with a byte-order mark, which would otherwise stick to the first column name.
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, [])
        wanted = [c for c in (info.text_a, info.text_b, info.label) if c is not None]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise SlimformerError(f"{path}:1: the header has no column {', '.join(repr(c) for c in missing)}")
        col = {c: header.index(c) for c in wanted}
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if not row:
                continue
            if len(row) < len(header):
                raise SlimformerError(f"{where}: expected {len(header)} tab-separated fields, found {len(row)}")
            label = row[col[info.label]].strip()
            if label not in labels:
                raise SlimformerError(f"{where}: label '{label}' is not one of {', '.join(info.label_values)}")
            texts = [row[col[c]] for c in (info.text_a, info.text_b) if c is not None]
            if not all(t.strip() for t in texts):
                raise SlimformerError(f"{where}: empty sentence")
            examples.append(GlueExample(texts[0], texts[1] if info.is_pair else None, labels[label]))
    if not examples:
        raise SlimformerError(f"{path} has no examples")
    return examples
