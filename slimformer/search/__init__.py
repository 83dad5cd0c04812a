"""Structural pruning by multi-objective search: spaces of sub-networks, strategies, Pareto fronts."""
