"""Evaluation: perplexity (and, as they land, zero-shot tasks, GLUE, speed and memory)."""

from slimformer.evaluation.perplexity import PerplexityResult, max_positions, perplexity

__all__ = ["PerplexityResult", "max_positions", "perplexity"]
