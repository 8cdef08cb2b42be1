"""Calibration and evaluation text sources (built-in corpora, files, HF datasets), calibration
samples, and the statistics collected from calibration activations."""

from lowbit.calibration.samples import CalibrationConfig, CalibrationSet, calibration_set, sample_windows
from lowbit.calibration.texts import BUILTIN_TEXTS, Text, load_text

__all__ = ["BUILTIN_TEXTS", "CalibrationConfig", "CalibrationSet", "Text", "calibration_set", "load_text", "sample_windows"]
