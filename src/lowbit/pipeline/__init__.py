"""The layer-wise quantization runner."""

from lowbit.pipeline.importance import collect_importance
from lowbit.pipeline.quantize import QuantizationReport, check_finite, quantize_model

__all__ = ["QuantizationReport", "check_finite", "collect_importance", "quantize_model"]
