"""Zero-shot accuracy of a causal LM on multiple-choice, partial-scoring and LAMBADA-style tasks, as lm-eval scores them.

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
import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from slimformer.data.tasks import LMExample, MCExample, PartialExample, load_task
from slimformer.errors import SlimformerError
from slimformer.evaluation.perplexity import max_positions
from slimformer.models.loading import added_bos

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


Request = tuple[list[int], list[int]]  # (context ids, continuation ids)


def _mc_requests(tokenizer, examples: Sequence[MCExample]) -> list[Request]:
    """(context ids, continuation ids) for every choice of every example, in order."""
    requests = []
    for ex in examples:
        for choice in ex.choices:
            ctx, cont = encode_pair(tokenizer, ex.context, TARGET_DELIMITER + choice)
            if not cont:
                raise SlimformerError(f"choice {choice!r} adds no tokens to its context")
            requests.append((ctx, cont))
    return requests


def _fed(ctx: list[int], cont: list[int], limit: int | None, bos: int | None) -> list[int]:
    """The token ids fed for a request: all but the last, cut on the left to ``limit`` keeping a leading BOS."""
    seq = ctx + cont
    if limit is not None and len(seq) > limit + 1:
        keep_bos = bos is not None and seq[0] == bos
        seq = ([bos] if keep_bos else []) + seq[-(limit + 1 - keep_bos) :]
    return seq[:-1]  # the last token is only predicted, never fed


@torch.no_grad()
def score_requests(model, tokenizer, requests: Sequence[Request], batch_size: int = 16,
                   progress: bool = True) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the continuation's summed log-likelihood and whether it is greedy.

    "Greedy" means every continuation token is the argmax of the model's prediction at its
    position (LAMBADA's accuracy). Requests that feed the same tokens share one row of the
    batch, since the logits of that row answer all of them; in particular the one-token
    choices of a context (BoolQ's " no" / " yes") cost a single forward of the context. Rows
    are sorted longest first and run in batches, padded on the right, one forward pass per
    batch. A request longer than the model allows loses tokens from the left of its context,
    as in the harness, but keeps the BOS its tokenizer starts every text with.
    """
    if batch_size < 1:
        raise SlimformerError(f"batch_size must be at least 1, not {batch_size}")
    limit = max_positions(model.config)
    bos = added_bos(tokenizer)
    groups: dict[tuple[int, ...], list[int]] = {}  # fed token ids -> the requests they answer
    for i, (ctx, cont) in enumerate(requests):
        if limit is not None and len(cont) > limit - (bos is not None):
            raise SlimformerError(f"a continuation of {len(cont)} tokens is longer than the model allows ({limit})")
        groups.setdefault(tuple(_fed(ctx, cont, limit, bos)), []).append(i)
    rows = sorted(groups.items(), key=lambda row: -len(row[0]))  # longest first: little padding per batch
    starts = {i: len(seq) - len(requests[i][1]) for seq, users in rows for i in users}  # first predicting position
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # only the positions that predict continuation tokens need logits, when the model can skip the rest
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
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
        answered, sums, greedy = [], [], []
        for b, (seq, users) in enumerate(batch):
            first = min(starts[i] for i in users)
            part = logits[b, first - offset : len(seq) - offset].float()
            log_norm = torch.logsumexp(part, -1)  # once per position, shared by the row's requests
            best = part.argmax(-1)
            for i in users:
                cont, at = requests[i][1], starts[i] - first
                target = torch.tensor(cont, device=part.device)
                picked = part[at : at + len(cont)].gather(1, target[:, None])[:, 0]
                sums.append((picked - log_norm[at : at + len(cont)]).sum())
                greedy.append(torch.equal(best[at : at + len(cont)], target))
                answered.append(i)
        for i, value, is_greedy in zip(answered, torch.stack(sums).tolist(), greedy):  # one device sync per batch
            scores[i] = (value, is_greedy)
    return scores


def score_choices(
    model, tokenizer, examples: Sequence[MCExample], batch_size: int = 16, progress: bool = True
) -> list[list[float]]:
    """Per multiple-choice example, the summed log-likelihood of each choice's tokens given the context."""
    scores = score_requests(model, tokenizer, _mc_requests(tokenizer, examples), batch_size, progress)
    per_example, at = [], 0
    for ex in examples:
        per_example.append([ll for ll, _ in scores[at : at + len(ex.choices)]])
        at += len(ex.choices)
    return per_example


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties go to the first, like numpy


def _multiple_choice(model, tokenizer, examples: Sequence[MCExample], batch_size: int, progress: bool) -> dict:
    scores = score_choices(model, tokenizer, examples, batch_size=batch_size, progress=progress)
    correct = correct_norm = disagree = 0
    for ex, lls in zip(examples, scores):
        pick, pick_norm = _argmax(lls), _argmax([ll / max(len(c), 1) for ll, c in zip(lls, ex.choices)])
        correct += pick == ex.gold
        correct_norm += pick_norm == ex.gold
        disagree += pick != pick_norm
    # how often length normalisation changes the choice: equal acc and acc_norm can hide flips both ways
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples), "norm_changes_choice": disagree}


def _partial_scoring(model, tokenizer, examples: Sequence[PartialExample], batch_size: int, progress: bool) -> dict:
    """lm-evaluation-harness's winogrande: the shared continuation scored after each option's context."""
    requests = [encode_pair(tokenizer, context, TARGET_DELIMITER + ex.continuation)
                for ex in examples for context in ex.contexts]
    scores = score_requests(model, tokenizer, requests, batch_size, progress)
    correct, at = 0, 0
    for ex in examples:
        correct += _argmax([ll for ll, _ in scores[at : at + len(ex.contexts)]]) == ex.gold
        at += len(ex.contexts)
    return {"acc": correct / len(examples)}


def _language_modelling(model, tokenizer, examples: Sequence[LMExample], batch_size: int, progress: bool) -> dict:
    """LAMBADA: accuracy of greedy decoding reproducing the continuation, and the continuations' perplexity.

    The continuation is scored as written; a ``" "`` goes between the two only when neither
    the context ends nor the continuation starts with whitespace. ``perplexity`` is the
    harness's: exp of minus the mean (per example) summed log-likelihood.
    """
    requests = []
    for ex in examples:
        joint = ex.context[-1:].isspace() or ex.continuation[:1].isspace() or not ex.context
        requests.append(encode_pair(tokenizer, ex.context, ex.continuation if joint else " " + ex.continuation))
    scores = score_requests(model, tokenizer, requests, batch_size, progress)
    return {"acc": sum(g for _, g in scores) / len(examples),
            "perplexity": math.exp(-sum(ll for ll, _ in scores) / len(examples))}


_KINDS = {MCExample: ("multiple choice", _multiple_choice), PartialExample: ("partial scoring", _partial_scoring),
          LMExample: ("language modelling", _language_modelling)}


def evaluate_task(
    model, tokenizer, name_or_path: str, limit: int | None = None, batch_size: int = 16, progress: bool = True
) -> dict:
    """Zero-shot figures of a task (see :func:`slimformer.data.tasks.load_task`), with its layout and timing.

    Multiple choice: ``acc`` and ``acc_norm``; partial scoring: ``acc``; language modelling:
    ``acc`` (greedy match) and ``perplexity``.
    """
    examples = load_task(name_or_path, limit)
    layout, score = _KINDS[type(examples[0])]
    start = time.perf_counter()
    figures = score(model, tokenizer, examples, batch_size, progress)
    seconds = time.perf_counter() - start
    return {"task": name_or_path, "layout": layout, **figures, "examples": len(examples), "seconds": seconds,
            "examples_per_s": len(examples) / seconds}
