"""Greedy generations from a few fixed prompts, so a person can read what compression did to a model's text."""

from __future__ import annotations

import torch

# Short prompts across knowledge, explanation, code and arithmetic: where a damaged model shows it first.
PROMPTS = (
    "What is the capital of France?",
    "Explain in one sentence why the sky is blue.",
    "Write a Python function that returns the square of a number.",
    "List three fruits that are red.",
    "What is 12 plus 7?",
)


def encode_prompt(tokenizer, prompt: str) -> torch.Tensor:
    """``(1, L)`` ids of ``prompt``: in the tokenizer's chat template when it has one (instruction models), else as is."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


@torch.no_grad()
def greedy_generations(model, tokenizer, prompts: tuple[str, ...] | list[str] = PROMPTS,
                       new_tokens: int = 40) -> list[str]:
    """The greedy continuation of each prompt (special tokens dropped, stopped at the end-of-sequence token)."""
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt).to(device)
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return texts


def side_by_side(models: dict, tokenizer, count: int, new_tokens: int = 40) -> list[dict[str, str]]:
    """``count`` of the fixed prompts, each with every model's greedy continuation: ``[{"prompt", name: text, …}]``."""
    prompts = list(PROMPTS[:count])
    outputs = {name: greedy_generations(model, tokenizer, prompts, new_tokens) for name, model in models.items()}
    return [{"prompt": p, **{name: texts[i] for name, texts in outputs.items()}} for i, p in enumerate(prompts)]
