"""Zero-shot tasks in three layouts: multiple choice, partial scoring and language modelling.

The layouts are those of the MosaicML-style jsonl files the data directory holds, told apart
by their fields (one record per line):

- multiple choice: ``query`` (or ``context``), ``choices``, ``gold`` — ARC-Easy/Challenge,
  HellaSwag, BoolQ: each choice is a continuation of the one context;
- partial scoring: ``context_options``, ``continuation``, ``gold`` — WinoGrande: the context
  differs per option and only the shared continuation is scored, as lm-evaluation-harness's
  ``winogrande`` scores it;
- language modelling: ``context``, ``continuation`` — LAMBADA: accuracy is whether greedy
  decoding reproduces the continuation exactly, plus the continuation's perplexity.

Named tasks are prompted exactly as lm-evaluation-harness's task definitions prompt them
(``lm_eval/tasks/piqa/piqa.yaml``, ``arc/arc_easy.yaml``, ``super_glue/boolq/default.yaml``,
``hellaswag/hellaswag.yaml``, ``winogrande/default.yaml``, ``lambada/lambada_openai.yaml``), so
accuracies compare with the harness's. The choices are stored without the harness's target
delimiter; the scorer puts the ``" "`` before each.

ARC and BoolQ come in MosaicML's format (a prefabricated ``query``), from which the
harness prompt is rebuilt. Differences remain that the files cannot undo: the BoolQ passages
lack SuperGLUE's ``"<title> -- "`` prefix (and 22 of them had " question" rewritten, restored
up to its case); ARC questions with 3 options were padded to 4 by repeating a distractor
(same accuracy: a repeat comes after the original and never wins a tie).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from slimformer.data.sources import data_dir, read_jsonl
from slimformer.errors import SlimformerError

TASKS: dict[str, str] = {
    "piqa": "PIQA validation, 1838 two-choice physical commonsense questions (original files)",
    "arc_easy": "ARC-Easy test, 2376 grade-school science questions (MosaicML copy)",
    "arc_challenge": "ARC-Challenge test, the harder grade-school science questions (<data dir>/arc_challenge/*.jsonl)",
    "boolq": "BoolQ validation, 3270 yes/no questions about a passage (MosaicML copy)",
    "hellaswag": "HellaSwag validation, sentence endings (<data dir>/hellaswag/*.jsonl)",
    "winogrande": "WinoGrande, pronoun resolution by partial scoring (<data dir>/winogrande/*.jsonl)",
    "lambada": "LAMBADA, the last word of a passage (<data dir>/lambada/*.jsonl)",
}
TASKS_HELP = (f"{', '.join(TASKS)}, or a jsonl file (jsonl:PATH or PATH.jsonl) in a multiple-choice, "
              "partial-scoring or language-modelling layout")
LAYOUTS = {
    "multiple choice": "query (or context), choices, gold",
    "partial scoring": "context_options, continuation, gold",
    "language modelling": "context, continuation",
}


@dataclass
class MCExample:
    """A multiple-choice example: the prompt, the candidate continuations, and the index of the right one."""

    context: str
    choices: list[str]
    gold: int


@dataclass
class PartialExample:
    """A partial-scoring example: one context per option, the shared continuation scored after each."""

    contexts: list[str]
    continuation: str
    gold: int


@dataclass
class LMExample:
    """A language-modelling example: a context and the continuation greedy decoding should reproduce."""

    context: str
    continuation: str


Example = MCExample | PartialExample | LMExample


def load_task(name_or_path: str, limit: int | None = None) -> list[Example]:
    """The examples of a named task or of a jsonl file (``jsonl:PATH`` or ``PATH.jsonl``), the first ``limit``.

    A file's layout is read from its first record's fields (see the module docstring); every
    record must then fit it, and a malformed one is an error naming the file and line.
    """
    if limit is not None and limit < 1:
        raise SlimformerError(f"limit must be at least 1, not {limit}")
    if name_or_path in TASKS:
        root = data_dir(required=True)
        readers = {"piqa": _piqa, "arc_easy": _arc_easy, "boolq": _boolq}
        examples = readers[name_or_path](root) if name_or_path in readers else _named(root, name_or_path)
    elif name_or_path.startswith("jsonl:") or name_or_path.endswith(".jsonl"):
        path = Path(name_or_path.removeprefix("jsonl:")).expanduser()
        if not path.is_file():
            raise SlimformerError(f"task file not found: {path}")
        examples = read_task_file(path)
    else:
        raise SlimformerError(f"unknown task '{name_or_path}'; use {TASKS_HELP}")
    if not examples:
        raise SlimformerError(f"task '{name_or_path}' has no examples")
    return examples[:limit]


def task_layout(obj: dict) -> str | None:
    """The layout whose fields a record has (a key of ``LAYOUTS``), or None."""
    if "context_options" in obj:
        return "partial scoring"
    if "choices" in obj:
        return "multiple choice"
    if "context" in obj and "continuation" in obj:
        return "language modelling"
    return None


def read_task_file(path: Path) -> list[Example]:
    """Every record of a jsonl task file, in the layout of its first record."""
    rows = read_jsonl(path)
    if not rows:
        return []
    n, first = rows[0]
    layout = task_layout(first)
    if layout is None:
        expected = "; ".join(f"{name}: {fields}" for name, fields in LAYOUTS.items())
        raise SlimformerError(f"{path}:{n}: fields {sorted(first)} match no task layout ({expected})")
    read = {"multiple choice": _generic_mc, "partial scoring": _partial, "language modelling": _lm}[layout]
    return [read(obj, path, n) for n, obj in rows]


def _named(root: Path, name: str) -> list[Example]:
    """A task read from the one jsonl file in ``<data dir>/<name>/`` (or ``<name with ->``); ARC gets its answer cue."""
    folders = list(dict.fromkeys([root / name, root / name.replace("_", "-")]))
    for folder in folders:
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if len(files) > 1:
            raise SlimformerError(f"task '{name}': {folder} holds several jsonl files "
                                  f"({', '.join(f.name for f in files)}); keep one")
        if files:
            examples = read_task_file(files[0])
            if name.startswith("arc_"):
                return [MCExample(_arc_prompt(ex.context, files[0], i + 1), ex.choices, ex.gold)
                        for i, ex in enumerate(examples)]
            return examples
    looked = " and ".join(str(f) for f in folders)
    raise SlimformerError(f"task '{name}': no jsonl file in {looked}; put its file there or set $SLIMFORMER_DATA")


def _data_file(root: Path, relpath: str) -> Path:
    path = root / relpath
    if not path.is_file():
        raise SlimformerError(f"task data not found at {path}; set $SLIMFORMER_DATA to a folder holding {relpath}")
    return path


def _field(obj: dict, name: str, kind: type, path: Path, n: int):
    if name not in obj:
        raise SlimformerError(f"{path}:{n}: missing field '{name}'")
    value = obj[name]
    # bool is an int subclass: a gold of true/false is a mistake, not an index
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SlimformerError(f"{path}:{n}: field '{name}' must be {kind.__name__}, not {type(value).__name__}")
    return value


def _choices(obj: dict, path: Path, n: int) -> list[str]:
    choices = _field(obj, "choices", list, path, n)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise SlimformerError(f"{path}:{n}: field 'choices' must be a non-empty list of strings")
    return choices


def _gold(value: int, choices: list[str], path: Path, n: int) -> int:
    if not 0 <= value < len(choices):
        raise SlimformerError(f"{path}:{n}: gold {value} is out of range for {len(choices)} choices")
    return value


def _generic_mc(obj: dict, path: Path, n: int) -> MCExample:
    key = "query" if "query" in obj else "context"
    context = _field(obj, key, str, path, n)
    choices = _choices(obj, path, n)
    return MCExample(context, choices, _gold(_field(obj, "gold", int, path, n), choices, path, n))


def _partial(obj: dict, path: Path, n: int) -> PartialExample:
    contexts = _field(obj, "context_options", list, path, n)
    if not contexts or not all(isinstance(c, str) for c in contexts):
        raise SlimformerError(f"{path}:{n}: field 'context_options' must be a non-empty list of strings")
    continuation = _field(obj, "continuation", str, path, n)
    return PartialExample(contexts, continuation, _gold(_field(obj, "gold", int, path, n), contexts, path, n))


def _lm(obj: dict, path: Path, n: int) -> LMExample:
    context, continuation = _field(obj, "context", str, path, n), _field(obj, "continuation", str, path, n)
    if not continuation.strip():
        raise SlimformerError(f"{path}:{n}: field 'continuation' is empty")
    return LMExample(context, continuation)


def _piqa(root: Path) -> list[MCExample]:
    path = _data_file(root, "piqa/valid.jsonl")
    labels_path = _data_file(root, "piqa/valid-labels.lst")
    rows = read_jsonl(path)
    labels = [(n, line.strip()) for n, line in enumerate(labels_path.read_text(encoding="utf-8").splitlines(), 1)]
    labels = [(n, label) for n, label in labels if label]
    if len(labels) != len(rows):
        raise SlimformerError(f"{labels_path} has {len(labels)} labels but {path} has {len(rows)} questions")
    examples = []
    for (n, obj), (label_line, label) in zip(rows, labels):
        if label not in ("0", "1"):
            raise SlimformerError(f"{labels_path}:{label_line}: label must be 0 or 1, not '{label}'")
        goal, sol1, sol2 = (_field(obj, name, str, path, n) for name in ("goal", "sol1", "sol2"))
        examples.append(MCExample(f"Question: {goal}\nAnswer:", [sol1, sol2], int(label)))
    return examples


def _mosaic(path: Path) -> list[tuple[int, str, list[str], int]]:
    """MosaicML ICL rows as (line, query, choices, gold), checked."""
    rows = []
    for n, obj in read_jsonl(path):
        query = _field(obj, "query", str, path, n)
        choices = _choices(obj, path, n)
        rows.append((n, query, choices, _gold(_field(obj, "gold", int, path, n), choices, path, n)))
    return rows


def _arc_prompt(query: str, path: Path, n: int) -> str:
    if not query.startswith("Question: "):
        raise SlimformerError(f"{path}:{n}: query does not start with 'Question: '")
    return f"{query}\nAnswer:"  # MosaicML's query is the harness prompt without its answer cue


def _arc_easy(root: Path) -> list[MCExample]:
    path = _data_file(root, "arc-easy/arc_easy_test.mosaicml.jsonl")
    return [MCExample(_arc_prompt(query, path, n), choices, gold) for n, query, choices, gold in _mosaic(path)]


_QUESTION = "\nQuestion: "
# MosaicML also turned every " question" inside a passage into "\nQuestion" (22 passages); undone
# below, keeping the capital after a sentence end (a title such as "Snakes in Question" stays lower)
_MANGLED = re.compile(r"(\S)\nQuestion")


def _unmangle(m: re.Match) -> str:
    return m.group(1) + (" Question" if m.group(1) in ".?!'\"" else " question")


def _boolq_fields(query: str) -> tuple[str, str]:
    """The passage and question of a MosaicML BoolQ query ``"Passage: ...\\nQuestion: ...?"``."""
    if not query.startswith("Passage: ") or _QUESTION not in query or not query.endswith("?"):
        raise ValueError("query is not 'Passage: ...\\nQuestion: ...?'")
    # the question follows the last marker: a passage can hold "\nQuestion: " itself
    passage, _, question = query.removeprefix("Passage: ").rpartition(_QUESTION)
    return _MANGLED.sub(_unmangle, passage), question.removesuffix("?")


def _boolq(root: Path) -> list[MCExample]:
    path = _data_file(root, "boolq/boolq_dev.mosaicml.jsonl")
    examples = []
    for n, query, choices, gold in _mosaic(path):
        if choices != ["no", "yes"]:
            raise SlimformerError(f"{path}:{n}: choices must be [\"no\", \"yes\"], not {choices}")
        try:
            passage, question = _boolq_fields(query)
        except ValueError as e:
            raise SlimformerError(f"{path}:{n}: {e}") from None
        examples.append(MCExample(f"{passage}\nQuestion: {question}?\nAnswer:", choices, gold))
    return examples
