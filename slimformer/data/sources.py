"""Named text sources: WikiText-2 from the data directory (or the hub), plain text files, jsonl files.

The data directory is ``$SLIMFORMER_DATA``; without it, ``../shared/data`` next to the
working directory or the source checkout, when one exists. WikiText-2 is built as GPTQ,
SparseGPT, Wanda and SLEB build it: the split's rows (the lines of the raw file, blank ones
empty) joined by ``"\\n\\n"``, so perplexities compare with published ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from slimformer.errors import SlimformerError

SOURCES_HELP = ("wikitext2[:test|valid], alpaca[:PATH], text:PATH (or PATH.txt), jsonl:PATH[:FIELD] (or PATH.jsonl); "
                "A+B joins sources")
_WIKITEXT_SPLITS = {"test": "test", "valid": "valid", "validation": "valid"}
_ENV = "SLIMFORMER_DATA"


def _default_dirs() -> list[Path]:
    checkout = Path(__file__).resolve().parents[2]
    return [Path.cwd() / ".." / "shared" / "data", checkout / ".." / "shared" / "data"]


def data_dir(required: bool = False) -> Path | None:
    """The data directory: ``$SLIMFORMER_DATA``, else ``../shared/data`` when it exists, else None."""
    env = os.environ.get(_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SlimformerError(f"data directory {path} (from ${_ENV}) does not exist")
        return path
    for path in _default_dirs():
        if path.is_dir():
            return path.resolve()
    if required:
        looked = ", ".join(str(p.resolve()) for p in _default_dirs())
        raise SlimformerError(f"no data directory: looked in {looked}; set {_ENV}=/path/to/data")
    return None


def wikitext2_rows(split: str) -> list[str]:
    """The rows of a WikiText-2 raw split as the Hugging Face builder yields them."""
    if split not in _WIKITEXT_SPLITS:
        raise SlimformerError(f"unknown wikitext2 split '{split}'; choose test or valid")
    root = data_dir()
    if root is None:
        return _wikitext2_from_hub(split)
    path = root / "wikitext-2-raw-v1" / f"wiki.{_WIKITEXT_SPLITS[split]}.raw"
    if not path.is_file():
        raise SlimformerError(f"WikiText-2 not found at {path}; set {_ENV} to a folder holding wikitext-2-raw-v1/")
    with path.open(encoding="utf-8") as f:
        return [line if line.strip() else "" for line in f]


def _wikitext2_from_hub(split: str) -> list[str]:
    looked = ", ".join(str(p.resolve()) for p in _default_dirs())
    try:
        import datasets  # optional: only for machines without a data directory
    except ImportError:
        raise SlimformerError(
            f"no data directory (looked in {looked}) and no 'datasets' package for the hub; set {_ENV}=/path/to/data"
        ) from None
    hub_split = "validation" if _WIKITEXT_SPLITS[split] == "valid" else "test"
    try:
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)["text"])
    except Exception as e:  # the hub is unreachable: say where we looked instead of a stack trace
        raise SlimformerError(
            f"no data directory (looked in {looked}) and the hub failed ({type(e).__name__}); set {_ENV}=/path/to/data"
        ) from None


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """The JSON objects of a jsonl file with their line numbers, blank lines skipped; a bad line names itself."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimformerError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise SlimformerError(f"{path}:{n}: not a JSON object")
            rows.append((n, obj))
    return rows


def _read_jsonl(path: Path, field: str) -> str:
    texts = []
    for n, obj in read_jsonl(path):
        if not isinstance(obj.get(field), str):
            raise SlimformerError(f"{path}:{n}: has no text field '{field}'")
        texts.append(obj[field])
    return "\n\n".join(texts)


_ALPACA = "instruct/alpaca/alpaca_5000.pr152-unverified.json"


def read_alpaca(path: Path | None = None) -> list[dict]:
    """The records of an Alpaca-format JSON list (instruction, input, output); default the data directory's 5,000.

    That subset carries the Alpaca data's own licence (CC BY-NC 4.0, non-commercial).
    """
    path = path or (data_dir(required=True) / _ALPACA)
    if not path.is_file():
        raise SlimformerError(f"Alpaca data not found at {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SlimformerError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("output"), str)
                                             and isinstance(r.get("instruction", ""), str) for r in rows):
        raise SlimformerError(f"{path}: not a JSON list of instruction/input/output records")
    return rows


def alpaca_records(path: Path | None = None) -> list[str]:
    """Alpaca records as plain text a causal LM can train on: instruction, input (when there is one) and output on separate lines."""
    return ["\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k)) for r in read_alpaca(path)]


def load_text(source: str) -> str:
    """The text of a named source; see ``SOURCES_HELP`` for the forms (``A+B``: both texts, joined)."""
    if "+" in source and not Path(source).exists():
        return "\n\n".join(load_text(part) for part in source.split("+"))
    kind, _, rest = source.partition(":")
    if kind == "wikitext2":
        return "\n\n".join(wikitext2_rows(rest or "test"))
    if kind == "alpaca":
        return "\n\n".join(alpaca_records(Path(rest).expanduser() if rest else None))
    if kind in ("text", "jsonl"):
        path_str, field = rest, "text"
        if kind == "jsonl" and ":" in rest and not Path(rest).exists():
            path_str, _, field = rest.rpartition(":")
    elif source.endswith((".txt", ".jsonl")):
        kind, path_str, field = ("jsonl" if source.endswith(".jsonl") else "text"), source, "text"
    else:
        raise SlimformerError(f"unknown data source '{source}'; use {SOURCES_HELP}")
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise SlimformerError(f"data file not found: {path}")
    text = _read_jsonl(path, field) if kind == "jsonl" else path.read_text(encoding="utf-8")
    if not text.strip():
        raise SlimformerError(f"data source '{source}' is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a whole text as a ``(1, L)`` tensor, with the tokenizer's usual special tokens."""
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids
