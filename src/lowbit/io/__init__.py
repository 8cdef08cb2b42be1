"""Formats: readers and writers of quantized models."""

from lowbit.io.lowbit_format import load_quantized, save_quantized

__all__ = ["load_quantized", "save_quantized"]
