"""Comparisons of recipes on one model (sweeps and reports grow here)."""

from lowbit.bench.compare import Row, compare_recipes, format_table

__all__ = ["Row", "compare_recipes", "format_table"]
