"""Runtime modules that compute with quantized weights."""

from lowbit.modules.linears import linear_weight, set_linear_weight
from lowbit.modules.quant_embedding import QuantEmbedding, quantize_embeddings
from lowbit.modules.quant_linear import (
    QuantLinear,
    cache_dequantized_weights,
    dense_tensors,
    enable_fast_kernels,
    keep_dequantized_weights,
)

__all__ = ["QuantEmbedding", "QuantLinear", "cache_dequantized_weights", "dense_tensors", "enable_fast_kernels",
           "keep_dequantized_weights", "linear_weight", "quantize_embeddings", "set_linear_weight"]
