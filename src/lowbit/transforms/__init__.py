"""Equivalence transforms of a block before codes are chosen (AWQ's scaling, SmoothQuant)."""

from lowbit.transforms.awq import AWQScale
from lowbit.transforms.base import StepContext, Transform
from lowbit.transforms.smoothquant import SmoothQuant

__all__ = ["AWQScale", "SmoothQuant", "StepContext", "Transform"]
