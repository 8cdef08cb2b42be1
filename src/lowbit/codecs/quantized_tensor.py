"""QuantizedTensor: packed codes, scale data and the codec that reads them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lowbit.codecs.base import Codec


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight.

    ``codec`` is the codec's parameters (``Codec.model_dump()``), ``shape`` the logical
    ``(out, in)`` shape, ``data`` the stored tensors: ``codes`` (packed uint8, 1-D), the
    codec's scale data (e.g. ``scale`` and ``zero``, fp16, ``(R, G)``) and, for GPTQ's
    act-order, ``g_idx`` (int32 ``(in,)``: the group of each input column).
    """

    codec: dict[str, Any]
    shape: tuple[int, int]
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    def get_codec(self) -> "Codec":
        from lowbit.codecs.registry import codec_from_dict

        return codec_from_dict(self.codec)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight these codes stand for."""
        return self.get_codec().dequantize(self).to(dtype)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Exact stored bytes: packed codes plus every scale-data tensor."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # -- serialization --------------------------------------------------------------------
    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to store, named ``{prefix}.{part}``."""
        return {f"{prefix}.{k}": v for k, v in self.data.items()}

    def header(self) -> str:
        """JSON metadata (codec and shape) that, with :meth:`state_dict`, rebuilds the tensor."""
        return json.dumps({"codec": self.codec, "shape": list(self.shape), "parts": sorted(self.data)})

    @classmethod
    def from_state_dict(cls, header: str, tensors: dict[str, torch.Tensor], prefix: str) -> "QuantizedTensor":
        meta = json.loads(header)
        missing = [p for p in meta["parts"] if f"{prefix}.{p}" not in tensors]
        if missing:
            raise ValueError(f"quantized tensor {prefix!r} is missing parts {missing}")
        data = {p: tensors[f"{prefix}.{p}"] for p in meta["parts"]}
        qt = cls(codec=meta["codec"], shape=(int(meta["shape"][0]), int(meta["shape"][1])), data=data)
        expected = qt.get_codec().nbytes(qt.shape) + (4 * qt.shape[1] if "g_idx" in data else 0)
        if qt.nbytes != expected:
            raise ValueError(f"quantized tensor {prefix!r} holds {qt.nbytes} bytes, its codec needs {expected}")
        return qt
