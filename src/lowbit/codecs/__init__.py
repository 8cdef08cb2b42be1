"""Codecs: how numbers are stored. Pure tensor math; imports nothing else of lowbit."""

from lowbit.codecs.base import Codec, ScaleData
from lowbit.codecs.grouping import Grouping
from lowbit.codecs.integer import IntCodec
from lowbit.codecs.packing import pack_codes, packed_nbytes, unpack_codes
from lowbit.codecs.quantized_tensor import QuantizedTensor
from lowbit.codecs.registry import codec_from_dict, codec_names

__all__ = [
    "Codec",
    "Grouping",
    "IntCodec",
    "QuantizedTensor",
    "ScaleData",
    "codec_from_dict",
    "codec_names",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
]

# Floating-point and microscaling codecs (importing them registers them).
from lowbit.codecs.fp4 import FP4Codec  # noqa: E402
from lowbit.codecs.fp8 import FP8Codec  # noqa: E402
from lowbit.codecs.mx import MXFP4Codec, MXFP8Codec  # noqa: E402
from lowbit.codecs.nf4 import NF4Codec  # noqa: E402
from lowbit.codecs.nvfp4 import NVFP4Codec  # noqa: E402

__all__ += ["FP4Codec", "FP8Codec", "MXFP4Codec", "MXFP8Codec", "NF4Codec", "NVFP4Codec"]

# llama.cpp's legacy block types.
from lowbit.codecs.ggml_legacy import Q4_0Codec, Q4_1Codec, Q5_0Codec, Q5_1Codec, Q8_0Codec  # noqa: E402

__all__ += ["Q4_0Codec", "Q4_1Codec", "Q5_0Codec", "Q5_1Codec", "Q8_0Codec"]

# llama.cpp's k-quants (256-value super-blocks).
from lowbit.codecs.ggml_kquants import Q2_KCodec, Q3_KCodec, Q4_KCodec, Q5_KCodec, Q6_KCodec  # noqa: E402

__all__ += ["Q2_KCodec", "Q3_KCodec", "Q4_KCodec", "Q5_KCodec", "Q6_KCodec"]
