"""Runtime modules that compute with quantized weights."""

from lowbit.modules.quant_linear import QuantLinear, cache_dequantized_weights, dense_tensors

__all__ = ["QuantLinear", "cache_dequantized_weights", "dense_tensors"]
