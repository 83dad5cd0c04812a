"""Zero-shot multiple-choice accuracy of a causal LM, scored as lm-evaluation-harness scores it.

Each choice is a continuation ``" " + choice`` of the context; its score is the summed
log-likelihood of its tokens. Tokenisation follows the harness's ``_encode_pair``: trailing
whitespace of the context moves to the continuation, context and context + continuation are
encoded with the tokenizer's usual special tokens (a BOS only where the tokenizer adds one;
SmolLM2's adds none), and the continuation tokens are what the longer encoding adds. ``acc``
takes the best score; ``acc_norm`` the best score per character of the choice, as the
harness's ``acc_norm`` does (per byte for ASCII text).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from slimformer.data.tasks import MCExample, load_task
from slimformer.errors import SlimformerError
from slimformer.evaluation.perplexity import max_positions

TARGET_DELIMITER = " "  # the harness's default target_delimiter, put before every choice


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context and of a continuation of it, split as the harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer.encode(context) if context else []
    if ctx:
        return ctx, tokenizer.encode(context + continuation)[len(ctx) :]
    # nothing to condition on: BOS (else EOS) stands in for the context, as in the harness
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise SlimformerError("an empty context needs a tokenizer with a BOS or EOS token")
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])


def _requests(tokenizer, examples: Sequence[MCExample]) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) for every choice of every example, in order."""
    requests = []
    for ex in examples:
        for choice in ex.choices:
            ctx, cont = encode_pair(tokenizer, ex.context, TARGET_DELIMITER + choice)
            if not cont:
                raise SlimformerError(f"choice {choice!r} adds no tokens to its context")
            requests.append((ctx, cont))
    return requests


@torch.no_grad()
def score_choices(
    model, tokenizer, examples: Sequence[MCExample], batch_size: int = 16, progress: bool = True
) -> list[list[float]]:
    """Per example, the summed log-likelihood of each choice's tokens given the context.

    Each (context, choice) pair feeds its tokens but the last; pairs that feed the same tokens
    share one row of the batch, since the logits of that row answer all of them. In particular
    the one-token choices of a context (BoolQ's " no" / " yes") cost a single forward of the
    context, all read at its last position. Rows are sorted longest first and run in batches,
    padded on the right, one forward pass per batch. A pair longer than the model allows loses
    tokens from the left of its context, as in the harness.
    """
    if batch_size < 1:
        raise SlimformerError(f"batch_size must be at least 1, not {batch_size}")
    limit = max_positions(model.config)
    requests = _requests(tokenizer, examples)
    groups: dict[tuple[int, ...], list[int]] = {}  # fed token ids -> the requests they answer
    for i, (ctx, cont) in enumerate(requests):
        if limit is not None and len(cont) > limit:
            raise SlimformerError(f"a choice of {len(cont)} tokens is longer than the model allows ({limit})")
        # the last token is only predicted, never fed
        ids = (ctx + cont)[-(limit + 1) :][:-1] if limit is not None else (ctx + cont)[:-1]
        groups.setdefault(tuple(ids), []).append(i)
    rows = sorted(groups.items(), key=lambda row: -len(row[0]))  # longest first: little padding per batch
    starts = {i: len(seq) - len(requests[i][1]) for seq, users in rows for i in users}  # first predicting position
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # only the positions that predict continuation tokens need logits, when the model can skip the rest
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores = [0.0] * len(requests)
    batches = [rows[a : a + batch_size] for a in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="zero-shot", unit="batch", disable=not progress):
        width = len(batch[0][0])
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (seq, _) in enumerate(batch):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
        start = min(starts[i] for _, users in batch for i in users)
        kwargs = {"logits_to_keep": width - start} if trims else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
        offset = width - logits.shape[1]
        answered, sums = [], []
        for b, (seq, users) in enumerate(batch):
            first = min(starts[i] for i in users)
            part = logits[b, first - offset : len(seq) - offset].float()
            log_norm = torch.logsumexp(part, -1)  # once per position, shared by the row's requests
            for i in users:
                cont, at = requests[i][1], starts[i] - first
                picked = part[at : at + len(cont)].gather(1, torch.tensor(cont, device=part.device)[:, None])[:, 0]
                sums.append((picked - log_norm[at : at + len(cont)]).sum())
                answered.append(i)
        for i, value in zip(answered, torch.stack(sums).tolist()):  # one device sync per batch
            scores[i] = value
    per_example, at = [], 0
    for ex in examples:
        per_example.append(scores[at : at + len(ex.choices)])
        at += len(ex.choices)
    return per_example


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first, like numpy


def evaluate_task(
    model, tokenizer, name_or_path: str, limit: int | None = None, batch_size: int = 16, progress: bool = True
) -> dict:
    """Zero-shot accuracy on a task (see :func:`slimformer.data.tasks.load_task`): acc, acc_norm and timing."""
    examples = load_task(name_or_path, limit)
    start = time.perf_counter()
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - start
    correct = correct_norm = disagree = 0
    for ex, lls in zip(examples, scores):
        pick, pick_norm = _argmax(lls), _argmax([ll / max(len(c), 1) for ll, c in zip(lls, ex.choices)])
        correct += pick == ex.gold
        correct_norm += pick_norm == ex.gold
        disagree += pick != pick_norm
    return {
        "task": name_or_path,
        "acc": correct / len(examples),
        "acc_norm": correct_norm / len(examples),
        # how often length normalisation changes the choice: equal acc and acc_norm can hide flips both ways
        "norm_changes_choice": disagree,
        "examples": len(examples),
        "seconds": seconds,
        "examples_per_s": len(examples) / seconds,
    }
