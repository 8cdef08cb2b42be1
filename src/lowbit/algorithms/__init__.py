"""Algorithms: which codes are chosen (RTN now; GPTQ, AWQ, ... register the same way)."""

from lowbit.algorithms.base import Algorithm, LayerStats
from lowbit.algorithms.rtn import RTN

__all__ = ["RTN", "Algorithm", "LayerStats"]
