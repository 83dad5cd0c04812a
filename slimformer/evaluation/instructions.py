"""Held-out instruction loss: the mean next-token loss of reference responses given their instructions in the model's chat template."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from slimformer.data.instructions import instruction_examples, tokenize_example
from slimformer.models.adapters import get_adapter, next_token_nll


@torch.no_grad()
def instruction_loss(model, tokenizer, source: str = "self-instruct", *, limit: int | None = None,
                     max_tokens: int = 1024, progress: bool = True) -> dict[str, float | int]:
    """Mean loss (nats per response token) of each example's response given its prompt, one example at a time.

    ``source`` is an instruction source (``self-instruct``: the 252 user-oriented tasks with
    reference outputs); ``limit`` takes its first examples; an example longer than ``max_tokens``
    keeps its last ``max_tokens`` tokens. Returns the loss, its perplexity, and the counts.
    """
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    examples = instruction_examples(source)[:limit]
    total, tokens = 0.0, 0
    for example in tqdm(examples, desc="instruction loss", unit="example", disable=not progress):
        ids, labels = tokenize_example(tokenizer, example)
        ids, labels = torch.tensor([ids[-max_tokens:]], device=device), torch.tensor([labels[-max_tokens:]], device=device)
        hidden = adapter.base(input_ids=ids, use_cache=False).last_hidden_state
        total += float(next_token_nll(adapter, hidden, labels).sum())
        tokens += int((labels[:, 1:] >= 0).sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "examples": len(examples), "tokens": tokens}
