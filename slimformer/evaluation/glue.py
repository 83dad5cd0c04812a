"""GLUE with encoders: batching, a sequence classifier on an encoder, its fine-tuning, GLUE's metrics and evaluation."""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, PreTrainedModel, get_linear_schedule_with_warmup

from slimformer.data.glue import GlueExample, TaskInfo, glue_task, load_glue
from slimformer.errors import SlimformerError
from slimformer.models.adapters import family_for
from slimformer.models.loading import LoadedModel, load_model

StepHook = Callable[[nn.Module, dict], torch.Tensor]


def batches(
    tokenizer,
    examples: Sequence[GlueExample],
    batch_size: int = 32,
    max_length: int = 128,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches ``{input_ids, attention_mask, [token_type_ids], labels}``, each padded to its longest row.

    Pairs are encoded as the tokenizer joins two segments, truncated longest-first to
    ``max_length``. ``shuffle`` permutes the examples with ``seed`` (the same order every time).
    """
    if batch_size < 1:
        raise SlimformerError(f"batch_size must be at least 1, not {batch_size}")
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        pairs = {e.text_b is not None for e in chunk}
        if len(pairs) > 1:
            raise SlimformerError("a batch mixes single sentences and sentence pairs; use examples of one task")
        text_b = [e.text_b for e in chunk] if pairs == {True} else None
        enc = tokenizer([e.text_a for e in chunk], text_b, padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")
        batch = dict(enc)
        # float scores (STS-B) stay floats for the regression loss; class indices are longs
        dtype = torch.float32 if any(isinstance(e.label, float) for e in chunk) else torch.long
        batch["labels"] = torch.tensor([e.label for e in chunk], dtype=dtype)
        yield batch


def classifier_from(model_or_spec: PreTrainedModel | LoadedModel | str, num_labels: int = 2, *,
                    seed: int = 0) -> PreTrainedModel:
    """An ``AutoModelForSequenceClassification`` on the encoder of ``model_or_spec``, with a fresh head.

    ``model_or_spec`` is an encoder (a bare ``BertModel``/``RobertaModel``, possibly compressed,
    or a model with a head, whose encoder is taken), a :class:`LoadedModel`, or a model spec
    for :func:`load_model` (then load the tokenizer with ``load_model`` too). The classifier
    *shares* the encoder's modules rather than copying them, so a pruned or shortened encoder
    keeps its shapes, and fine-tuning the classifier changes the encoder passed in. The head
    (and a pooler, for an encoder built without one) is initialised from ``seed``, without
    touching the global random state. The classifier is returned in eval mode.
    """
    if num_labels < 1:
        raise SlimformerError(f"num_labels must be at least 1, not {num_labels}")
    if isinstance(model_or_spec, str):
        model_or_spec = load_model(model_or_spec, head="base")
    model = model_or_spec.model if isinstance(model_or_spec, LoadedModel) else model_or_spec
    encoder = model.base_model
    kind = family_for(encoder.config.model_type).kind
    if kind != "encoder":
        raise SlimformerError(f"a GLUE classifier needs an encoder (bert, roberta), not a {kind} "
                              f"('{encoder.config.model_type}')")
    config = copy.deepcopy(encoder.config)
    config.num_labels = num_labels
    # one output is a score learnt with MSE (STS-B); more are classes learnt with cross-entropy
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = AutoModelForSequenceClassification.from_config(config)
    fresh = classifier.base_model
    # BERT's head reads the pooled output: an encoder saved without a pooler borrows the fresh one.
    if getattr(encoder, "pooler", False) is None and getattr(fresh, "pooler", None) is not None:
        encoder.pooler = fresh.pooler
    setattr(classifier, classifier.base_model_prefix, encoder)
    first = next(encoder.parameters())
    return classifier.to(device=first.device, dtype=first.dtype).eval()


def _device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, tokenizer, examples: Sequence[GlueExample], batch_size: int = 64,
            max_length: int = 128) -> torch.Tensor:
    """The prediction of every example, in order, computed in eval mode: the argmax class, or the score of a one-output head."""
    was_training, device = model.training, _device(model)
    model.eval()
    try:
        preds = []
        for batch in batches(tokenizer, examples, batch_size, max_length):
            batch.pop("labels")
            logits = model(**_to(batch, device)).logits
            preds.append((logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(-1)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def accuracy(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """The fraction of predictions equal to their labels."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    return (preds == labels).float().mean().item()


def f1(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor, positive: int = 1) -> float:
    """F1 of the ``positive`` class (GLUE's MRPC F1); 0 when there is no true or predicted positive."""
    preds, labels = torch.as_tensor(preds) == positive, torch.as_tensor(labels) == positive
    tp = (preds & labels).sum().item()
    denominator = preds.sum().item() + labels.sum().item()
    return 2 * tp / denominator if denominator else 0.0


def matthews(preds: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Matthews correlation coefficient (GLUE's CoLA metric), for any number of classes; 0 when undefined."""
    preds, labels = torch.as_tensor(preds).long(), torch.as_tensor(labels).long()
    k = int(max(preds.max().item(), labels.max().item())) + 1
    confusion = torch.zeros(k, k, dtype=torch.float64)
    confusion.index_put_((labels, preds), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    t, p = confusion.sum(1), confusion.sum(0)  # true and predicted counts per class
    c, n = confusion.trace(), confusion.sum()
    denominator = ((n * n - p @ p) * (n * n - t @ t)).sqrt()
    return ((c * n - t @ p) / denominator).item() if denominator > 0 else 0.0


def pearson(preds: Sequence[float] | torch.Tensor, labels: Sequence[float] | torch.Tensor) -> float:
    """Pearson correlation of predictions and labels (GLUE's STS-B metric); 0 when either is constant."""
    x = torch.as_tensor(preds, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = (x.norm() * y.norm()).item()
    return (x @ y).item() / denominator if denominator > 0 else 0.0


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks from 1, ties sharing their mean rank (as scipy's ``rankdata``)."""
    order = values.argsort(stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    _, group, counts = values.unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, ranks)
    return (sums / counts)[group]


def spearman(preds: Sequence[float] | torch.Tensor, labels: Sequence[float] | torch.Tensor) -> float:
    """Spearman rank correlation: Pearson's of the ranks, ties at their mean rank (GLUE's second STS-B metric)."""
    return pearson(_ranks(torch.as_tensor(preds, dtype=torch.float64)),
                   _ranks(torch.as_tensor(labels, dtype=torch.float64)))


_METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def evaluate_classifier(
    model: nn.Module,
    tokenizer,
    examples: Sequence[GlueExample],
    batch_size: int = 64,
    max_length: int = 128,
    *,
    task: str | TaskInfo | None = None,
) -> dict:
    """The task's metrics of a classifier on ``examples`` (accuracy without a task), and its ``score``.

    ``score`` is the task's first metric (accuracy, Matthews correlation for CoLA, Pearson for
    STS-B): what a search maximises. Also reports the number of ``examples`` and the
    ``seconds`` the predictions took.
    """
    if not examples:
        raise SlimformerError("no examples to evaluate")
    metrics = ("accuracy",) if task is None else (task if isinstance(task, TaskInfo) else glue_task(task)).metrics
    start = time.perf_counter()
    preds = predict(model, tokenizer, examples, batch_size, max_length)
    seconds = time.perf_counter() - start
    labels = [e.label for e in examples]
    result = {name: _METRICS[name](preds, labels) for name in metrics}
    return {**result, "score": result[metrics[0]], "examples": len(examples), "seconds": seconds}


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # As BERT fine-tuning does: no decay for biases and norm weights (the only parameters of fewer than 2 dims).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def finetune_classifier(
    model: nn.Module,
    tokenizer,
    train_examples: Sequence[GlueExample],
    *,
    epochs: int = 3,
    lr: float = 5e-5,
    batch_size: int = 32,
    max_length: int = 128,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    step_hook: StepHook | None = None,
) -> dict:
    """Fine-tune a sequence classifier with AdamW and a linear warm-up then linear decay of the learning rate.

    Each epoch visits the examples in a fresh order drawn from ``seed``; dropout is seeded
    too, so a run repeats exactly on a CPU. ``warmup`` is the fraction of the steps spent
    warming up; ``limit`` stops after that many steps (the schedule is laid over them);
    gradients are clipped to ``max_grad_norm`` (``None``: not clipped).

    ``step_hook(model, batch) -> loss``, when given, replaces the plain loss
    ``model(**batch).loss``: it receives the batch (labels included, on the model's device)
    and returns the scalar to minimise, so a caller can train e.g. a weight-sharing
    super-network with the sum of several masked sub-network losses. The optimiser, the
    schedule and clipping stay the same. Returns ``{losses, seconds, steps}``; the model is
    left in eval mode.
    """
    if not train_examples:
        raise SlimformerError("no training examples")
    if epochs != int(epochs) or epochs < 1:
        raise SlimformerError(f"epochs must be a whole number of at least 1, not {epochs}")
    epochs = int(epochs)
    if lr <= 0:
        raise SlimformerError(f"learning rate must be positive, not {lr}")
    if not 0 <= warmup < 1:
        raise SlimformerError(f"warmup is a fraction of the steps in [0, 1), not {warmup}")
    if limit is not None and limit < 1:
        raise SlimformerError(f"limit must be at least 1 step, not {limit}")
    per_epoch = math.ceil(len(train_examples) / batch_size)
    total = per_epoch * epochs if limit is None else min(limit, per_epoch * epochs)
    device = _device(model)
    torch.manual_seed(seed)
    optimizer = _optimizer(model, lr, weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, round(warmup * total), total)
    losses: list[float] = []
    bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
    start = time.perf_counter()
    model.train()
    try:
        for epoch in range(epochs):
            for batch in batches(tokenizer, train_examples, batch_size, max_length, shuffle=True, seed=seed + epoch):
                if len(losses) == total:
                    break
                batch = _to(batch, device)
                loss = step_hook(model, batch) if step_hook is not None else model(**batch).loss
                loss.backward()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()
        model.eval()
    return {"losses": losses, "seconds": time.perf_counter() - start, "steps": len(losses)}


def check_max_length(model: nn.Module, max_length: int) -> None:
    """Fail clearly when ``max_length`` exceeds the encoder's position embeddings."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise SlimformerError(f"max_length {max_length} is longer than the model's {positions} positions")


def glue_data(task: str | TaskInfo) -> tuple[list[GlueExample], dict[str, list[GlueExample]]]:
    """A task's training examples and its dev splits by name (every file read and checked)."""
    info = glue_task(task)
    return load_glue(info, "train"), {split: load_glue(info, split) for split in info.dev_splits}


def run_glue(model_or_spec: PreTrainedModel | LoadedModel | str, tokenizer, task: str | TaskInfo, *,
             epochs: int = 3, lr: float = 5e-5, batch_size: int = 32, max_length: int = 128,
             train_limit: int | None = None, seed: int = 0, progress: bool = True,
             data: tuple[list[GlueExample], dict[str, list[GlueExample]]] | None = None) -> tuple[nn.Module, dict]:
    """Fine-tune a classifier on an encoder for a GLUE task and evaluate it on every dev split.

    ``train_limit`` trains on a seeded sample of that many training examples (not the head of
    the file: SST-2's is sorted). ``data`` is :func:`glue_data`'s result when the caller has
    read it already. Returns the classifier and ``{task, metrics per dev split, training figures}``.
    """
    info = glue_task(task)
    train, devs = data if data is not None else glue_data(info)  # a missing file fails before training
    if train_limit is not None:
        if train_limit < 1:
            raise SlimformerError(f"train_limit must be at least 1, not {train_limit}")
        train = random.Random(seed).sample(train, min(train_limit, len(train)))
    classifier = classifier_from(model_or_spec, info.num_labels, seed=seed)
    check_max_length(classifier, max_length)
    trained = finetune_classifier(classifier, tokenizer, train, epochs=epochs, lr=lr, batch_size=batch_size,
                                  max_length=max_length, seed=seed, progress=progress)
    metrics = {split: evaluate_classifier(classifier, tokenizer, examples, max_length=max_length, task=info)
               for split, examples in devs.items()}
    return classifier, {"task": info.name, "metrics": metrics, "train_examples": len(train), "epochs": epochs,
                        "lr": lr, "steps": trained["steps"], "train_seconds": trained["seconds"],
                        "final_loss": trained["losses"][-1]}
