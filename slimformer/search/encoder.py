"""Structural search of an encoder on a GLUE task: rank, train the super-network, search, compare with pruning.

The two-stage method of Klein et al. 2024:

1. the training set is split into a training part and a search-validation part (seeded);
2. a standard fine-tune of the pre-trained encoder gives the reference model, on which
   heads and FFN units are ranked by mask-gradient importance;
3. stage 1: the super-network is fine-tuned with the sandwich rule
   (:mod:`slimformer.search.supernet`), units ordered by that ranking. Klein et al. start it
   from the pre-trained weights (``supernet_init="pretrained"``); the default here starts it
   from the fine-tuned reference (``"reference"``), which reaches useful sub-networks in far
   fewer steps — what a CPU budget allows. Its random sub-networks are drawn size first
   (``sampling="sized"``) rather than uniformly per parameter as in the paper, so that sizes
   near the full model are trained too (see :func:`~slimformer.search.supernet.sandwich_loss`);
4. stage 2: the multi-objective search evaluates sub-networks of the super-network on the
   search-validation part (no retraining); the Pareto set is then measured on the dev set;
5. the baseline is plain importance pruning of the standard fine-tuned model: one global
   threshold on the normalised importance, no search and no super-network training. It is
   measured at fixed sizes (``baseline_sizes``; its sub-networks there are also among the
   first trials of the search when ``seed_baseline``, measured there with the super-network's
   weights) and at the sizes of the searched Pareto set below the full model
   (``baseline_at_front``: the same sizes, point for point).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from slimformer.data.glue import glue_task, load_glue
from slimformer.errors import SlimformerError
from slimformer.evaluation.glue import (batches, check_max_length, classifier_from, evaluate_classifier,
                                         finetune_classifier)
from slimformer.models.adapters import get_adapter
from slimformer.search.importance import classifier_loss, mask_gradient_importance
from slimformer.search.objectives import Objective
from slimformer.search.space import Importance, SearchSpace, Subnet, count_params, masked
from slimformer.search.strategies import run_search
from slimformer.search.supernet import sandwich_loss
from slimformer.search.structural import SearchConfig, importance_prune, initial_points


def split_train(examples: list, valid: int, seed: int) -> tuple[list, list]:
    """A seeded split of a training set into (training part, search-validation part of ``valid`` examples)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    valid = min(valid, len(examples) // 5)
    held = set(order[:valid])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:valid]]


def _error_fn(model, tokenizer, examples, config: SearchConfig, task):
    def error(subnet: Subnet) -> float:
        return 1.0 - evaluate_classifier(model, tokenizer, examples, batch_size=64, max_length=config.max_length,
                                         task=task)["score"]
    return error


@dataclass
class Stage1:
    """What the search of an encoder starts from: the reference model, the super-network and the unit ranking."""

    reference: torch.nn.Module
    supernet: torch.nn.Module
    importance: Importance
    timing: dict


def task_splits(task: str, config: SearchConfig) -> tuple[object, list, list, list]:
    """(task info, training part, search-validation part, dev set) of a GLUE task."""
    info = glue_task(task)
    train_all, dev = load_glue(info, "train"), load_glue(info, "dev")
    train, search_valid = split_train(train_all, config.search_valid, config.seed)
    if config.train_limit:  # a seeded sample, not the head of the file (SST-2's file is not shuffled)
        train = random.Random(config.seed).sample(train, min(config.train_limit, len(train)))
    return info, train, search_valid, dev


def select_schedule(pretrained, tokenizer, task: str, config: SearchConfig,
                    grid: list[tuple[float, float]], *,
                    progress: bool = True) -> tuple[SearchConfig, list[dict], torch.nn.Module]:
    """Choose the fine-tuning schedule: the (epochs, lr) of ``grid`` whose reference is best on held-out examples.

    Each schedule fine-tunes a fresh reference model on the training part; the one most
    accurate on the search-validation part (held out from the training set, never the dev
    set) wins, the earlier in ``grid`` on a tie. Returns ``config`` with that schedule, one
    row per schedule with its held-out and dev accuracy (dev only reported, not used), and the
    winning fine-tuned model, which :func:`train_stage1` takes as its reference.
    """
    if not grid:
        raise SlimformerError("the schedule grid is empty")
    check_max_length(pretrained, config.max_length)
    info, train, search_valid, dev = task_splits(task, config)
    if not search_valid:
        raise SlimformerError("choosing a schedule needs held-out examples (search_valid > 0)")
    rows, best, best_model = [], None, None
    for epochs, lr in grid:
        model = classifier_from(copy.deepcopy(pretrained), info.num_labels, seed=config.seed)
        seconds = finetune_classifier(model, tokenizer, train, epochs=epochs, lr=lr, batch_size=config.batch_size,
                                      max_length=config.max_length, seed=config.seed, progress=progress)["seconds"]
        held_out = evaluate_classifier(model, tokenizer, search_valid, max_length=config.max_length, task=info)
        on_dev = evaluate_classifier(model, tokenizer, dev, max_length=config.max_length, task=info)
        rows.append({"epochs": epochs, "lr": lr, "search_valid_score": held_out["score"],
                     "dev_score": on_dev["score"], "seconds": seconds})
        if best is None or rows[-1]["search_valid_score"] > best["search_valid_score"]:
            best, best_model = rows[-1], model  # strictly better: the first of equals stays
    return replace(config, epochs=best["epochs"], lr=best["lr"]), rows, best_model


def train_stage1(pretrained, tokenizer, task: str, config: SearchConfig, *, reference: torch.nn.Module | None = None,
                 progress: bool = True) -> Stage1:
    """Fine-tune the reference model, rank its units, and train the super-network (steps 2–3 of the module doc).

    ``reference``: a classifier already fine-tuned on this task's training part with
    ``config``'s schedule (e.g. :func:`select_schedule`'s winner), used as is; ``timing``
    then has no ``reference_finetune_s``.
    """
    check_max_length(pretrained, config.max_length)
    info, train, _, _ = task_splits(task, config)
    finetune = dict(epochs=config.epochs, lr=config.lr, batch_size=config.batch_size, max_length=config.max_length,
                    seed=config.seed, progress=progress)
    timing = {}
    if reference is None:
        reference = classifier_from(copy.deepcopy(pretrained), info.num_labels, seed=config.seed)
        timing["reference_finetune_s"] = finetune_classifier(reference, tokenizer, train, **finetune)["seconds"]
    rank_batches = list(batches(tokenizer, train, config.batch_size, config.max_length, shuffle=True,
                                seed=config.seed))[: config.importance_batches]
    importance = mask_gradient_importance(get_adapter(reference), rank_batches, classifier_loss, progress=progress)
    supernet = classifier_from(copy.deepcopy(pretrained), info.num_labels, seed=config.seed)
    if config.supernet_init == "reference" or not config.supernet:
        supernet.load_state_dict(reference.state_dict())
    if config.supernet:
        space = SearchSpace(config.space, get_adapter(supernet), importance)
        hook = sandwich_loss(space, random_subnets=config.random_subnets, distill=config.distill,
                             teacher=reference if config.distill == "reference" else None,
                             sampling=config.sampling, seed=config.seed)
        timing["supernet_finetune_s"] = finetune_classifier(supernet, tokenizer, train, step_hook=hook,
                                                            **finetune)["seconds"]
    return Stage1(reference.eval(), supernet.eval(), importance, timing)


def encoder_search(stage1: Stage1, tokenizer, task: str, config: SearchConfig, *, storage: Path | None = None,
                   progress: bool = True) -> dict:
    """Stage 2 and the comparison (steps 4–5): the search, its Pareto set on dev, and importance pruning.

    Importance pruning is measured at ``config.baseline_sizes`` (``baseline``; the front's sizes
    when empty) and at the sizes of the searched Pareto set (``baseline_at_front``).
    """
    info, _, search_valid, dev = task_splits(task, config)
    supernet, reference = stage1.supernet, stage1.reference
    space = SearchSpace(config.space, get_adapter(supernet), stage1.importance)
    latency_input = next(iter(batches(tokenizer, dev[:32], 32, config.max_length)))["input_ids"]
    objective = Objective(space, list(config.objectives), _error_fn(supernet, tokenizer, search_valid, config, info),
                          latency_input=latency_input)
    result = run_search(space.distributions(), objective, objectives=config.objectives, strategy=config.strategy,
                        trials=config.trials, seed=config.seed, storage=storage, backend=config.backend,
                        population=config.population, progress=progress,
                        initial=initial_points(space, config.seed_sizes))
    dev_eval = dict(max_length=config.max_length, task=info)
    front = []
    for trial in result.pareto_trials():
        subnet = space.subnet(trial["params"])
        with masked(space.adapter, subnet):
            metrics = evaluate_classifier(supernet, tokenizer, dev, **dev_eval)
        front.append({"number": trial["number"], "params": count_params(space.adapter, subnet) / objective.total_params,
                      "search_values": trial["values"], "dev": metrics})
    ref_adapter = get_adapter(reference)
    ref_space = SearchSpace(config.space, ref_adapter, stage1.importance)

    measured: dict[float, dict] = {}  # the grid and the front share sizes (0.8, 0.95, ...): measure each once

    def importance_pruning(sizes) -> list[dict]:
        for size in sizes:
            if size not in measured:
                subnet = importance_prune(ref_space, size)
                with masked(ref_adapter, subnet):
                    metrics = evaluate_classifier(reference, tokenizer, dev, **dev_eval)
                measured[size] = {"target": size, "params": count_params(ref_adapter, subnet) / objective.total_params,
                                  "dev": metrics}
        return [dict(measured[size]) for size in sizes]

    front_sizes = tuple(sorted({round(p["params"], 3) for p in front if p["params"] < 0.999}))
    at_front = importance_pruning(front_sizes)
    baseline = importance_pruning(config.baseline_sizes) if config.baseline_sizes else at_front
    return {"task": info.name, "result": result, "space": space, "dev_front": front, "baseline": baseline,
            "baseline_at_front": at_front,
            "reference_dev": evaluate_classifier(reference, tokenizer, dev, **dev_eval),
            "supernet_dev": evaluate_classifier(supernet, tokenizer, dev, **dev_eval)}
