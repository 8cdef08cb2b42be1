"""Equivalence transforms of a block before codes are chosen (AWQ's scaling, SmoothQuant)."""

from lowbit.transforms.awq import AWQScale
from lowbit.transforms.base import StepContext, Transform

__all__ = ["AWQScale", "StepContext", "Transform"]
