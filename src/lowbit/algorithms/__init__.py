"""Algorithms: which codes are chosen (RTN, GPTQ, AWQ; others register the same way)."""

from lowbit.algorithms.awq import AWQ
from lowbit.algorithms.base import Algorithm, LayerStats
from lowbit.algorithms.gptq import GPTQ, SingularHessianError
from lowbit.algorithms.rtn import RTN

__all__ = ["AWQ", "GPTQ", "RTN", "Algorithm", "LayerStats", "SingularHessianError"]
