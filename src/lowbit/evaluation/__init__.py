"""Evaluation: perplexity, KL divergence and top-1 agreement against a reference, sizes."""

from lowbit.evaluation.evaluate import EvalResult, evaluate, tokenize
from lowbit.evaluation.size import ModelSize, model_size
from lowbit.evaluation.windows import Window, make_windows

__all__ = ["EvalResult", "ModelSize", "Window", "evaluate", "make_windows", "model_size", "tokenize"]
