"""Instruction data: (prompt, response) examples from Alpaca or self-instruct files, tokenised with the model's chat template and a loss mask on the responses.

Sources: ``alpaca[:PATH]`` (an Alpaca-format JSON list; default the 5,000-record subset of the
data directory) and ``self-instruct[:PATH]`` (the 252 user-oriented self-instruct tasks with
reference outputs, one example per instance; default the data directory's copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from slimformer.data.sources import _ALPACA, data_dir, read_alpaca, read_jsonl
from slimformer.errors import SlimformerError

INSTRUCTION_SOURCES_HELP = "alpaca[:PATH], self-instruct[:PATH]"
_SELF_INSTRUCT = "instruct/self-instruct/user_oriented_instructions.jsonl"
IGNORE = -100  # the label of a token that is not trained on (prompt, template)
# The Alpaca prompt, for a tokenizer without a chat template.
_ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                  "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_part}### Response:\n")


@dataclass(frozen=True)
class InstructionExample:
    """One instruction (with its input, possibly empty) and the response to learn."""

    instruction: str
    input: str
    response: str

    @property
    def user_message(self) -> str:
        """The instruction and its input as one user turn."""
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


def _alpaca(path: Path) -> list[InstructionExample]:
    return [InstructionExample(r.get("instruction") or "", r.get("input") or "", r["output"]) for r in read_alpaca(path)]


def _self_instruct(path: Path) -> list[InstructionExample]:
    examples = []
    for n, obj in read_jsonl(path):
        if not isinstance(obj.get("instruction"), str) or not isinstance(obj.get("instances"), list):
            raise SlimformerError(f"{path}:{n}: not a self-instruct task (instruction, instances)")
        examples += [InstructionExample(obj["instruction"], i.get("input") or "", i["output"])
                     for i in obj["instances"] if isinstance(i.get("output"), str) and i["output"].strip()]
    return examples


def instruction_examples(source: str) -> list[InstructionExample]:
    """The examples of an instruction source (see ``INSTRUCTION_SOURCES_HELP``)."""
    kind, _, rest = source.partition(":")
    readers = {"alpaca": (_alpaca, _ALPACA), "self-instruct": (_self_instruct, _SELF_INSTRUCT)}
    if kind not in readers:
        raise SlimformerError(f"unknown instruction source '{source}'; use {INSTRUCTION_SOURCES_HELP}")
    reader, default = readers[kind]
    path = Path(rest).expanduser() if rest else data_dir(required=True) / default
    if not path.is_file():
        raise SlimformerError(f"instruction data not found at {path}")
    examples = reader(path)
    if not examples:
        raise SlimformerError(f"instruction source '{source}' has no examples")
    return examples


def _prompt_and_response(tokenizer, example: InstructionExample) -> tuple[str, str]:
    """The text before the response (system, user turn, assistant header) and the response with its end marker."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": example.user_message}]
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": example.response}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
    prompt = _ALPACA_PROMPT.format(with_input=", paired with an input that provides further context" if example.input
                                   else "", instruction=example.instruction,
                                   input_part=f"### Input:\n{example.input}\n\n" if example.input else "")
    return prompt, example.response + (tokenizer.eos_token or "")


def tokenize_example(tokenizer, example: InstructionExample) -> tuple[list[int], list[int]]:
    """(ids, labels) of one example: labels are the ids on the response and ``IGNORE`` on the prompt."""
    prompt, response = _prompt_and_response(tokenizer, example)
    bos_id = tokenizer.bos_token_id
    adds_bos = bos_id is not None and tokenizer.encode("a")[:1] == [bos_id]  # as the tokenizer does for plain text
    bos = [bos_id] if adds_bos and not (tokenizer.bos_token and prompt.startswith(tokenizer.bos_token)) else []
    p = bos + tokenizer.encode(prompt, add_special_tokens=False)
    r = tokenizer.encode(response, add_special_tokens=False)
    return p + r, [IGNORE] * len(p) + r


def tokenize_instructions(tokenizer, examples: list[InstructionExample]) -> torch.Tensor:
    """All examples packed one after another: a ``(2, L)`` tensor of token ids and labels (``IGNORE`` off the responses)."""
    ids, labels = [], []
    for example in examples:
        i, lab = tokenize_example(tokenizer, example)
        ids += i
        labels += lab
    return torch.tensor([ids, labels], dtype=torch.long)
