"""Formats: readers and writers of quantized models."""

from lowbit.io.compressed_tensors import load_compressed_tensors, save_compressed_tensors
from lowbit.io.lowbit_format import load_quantized, save_quantized

__all__ = ["load_compressed_tensors", "load_quantized", "save_compressed_tensors", "save_quantized"]
