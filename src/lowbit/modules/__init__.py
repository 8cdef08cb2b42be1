"""Runtime modules that compute with quantized weights."""

from lowbit.modules.quant_linear import QuantLinear, cache_dequantized_weights

__all__ = ["QuantLinear", "cache_dequantized_weights"]
