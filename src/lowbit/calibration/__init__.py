"""Calibration and evaluation text sources (built-in corpora, files, HF datasets)."""

from lowbit.calibration.texts import BUILTIN_TEXTS, Text, load_text

__all__ = ["BUILTIN_TEXTS", "Text", "load_text"]
