"""lowbit: quantize large language models and measure exactly what each quantization costs."""

from lowbit.errors import LowbitError

__version__ = "0.1.0"
__all__ = ["LowbitError", "__version__"]
