"""Evaluation: perplexity (and, as they land, zero-shot tasks, GLUE, speed and memory)."""

from slimformer.evaluation.perplexity import PerplexityResult, max_positions, perplexity

__all__ = ["PerplexityResult", "max_positions", "perplexity"]
from slimformer.evaluation.glue import batches, classifier_from, evaluate_classifier, finetune_classifier

__all__ += ["batches", "classifier_from", "evaluate_classifier", "finetune_classifier"]
