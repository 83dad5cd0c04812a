"""Evaluation: perplexity (and, as they land, zero-shot tasks, GLUE, speed and memory)."""

from slimformer.evaluation.perplexity import PerplexityResult, max_positions, perplexity

__all__ = ["PerplexityResult", "max_positions", "perplexity"]
from slimformer.evaluation.glue import batches, classifier_from, evaluate_classifier, finetune_classifier, run_glue

__all__ += ["batches", "classifier_from", "evaluate_classifier", "finetune_classifier", "run_glue"]
from slimformer.evaluation.cost import DecodeCost, flops_per_token, measure_costs, param_counts, peak_memory, size_on_disk

__all__ += ["DecodeCost", "flops_per_token", "measure_costs", "param_counts", "peak_memory", "size_on_disk"]
from slimformer.evaluation.zeroshot import encode_pair, evaluate_task, score_choices
from slimformer.evaluation.lm_eval_bridge import run_lm_eval, write_task_yaml

__all__ += ["encode_pair", "evaluate_task", "run_lm_eval", "score_choices", "write_task_yaml"]
from slimformer.evaluation.instructions import instruction_loss

__all__ += ["instruction_loss"]
from slimformer.evaluation.generation import PROMPTS, greedy_generations, side_by_side

__all__ += ["PROMPTS", "greedy_generations", "side_by_side"]
