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
        """The tensor whose :meth:`header` is ``header`` and whose parts are ``{prefix}.{part}`` in
        ``tensors``; ValueError saying what does not fit when the header is damaged or a part's
        shape or dtype is not what its codec stores (:meth:`Codec.stored_parts`)."""
        from pydantic import ValidationError

        from lowbit.codecs.base import group_order
        from lowbit.codecs.registry import codec_from_dict
        from lowbit.errors import validation_message

        try:
            meta = json.loads(header)
        except (TypeError, ValueError):
            raise ValueError(f"{prefix}: its header is not JSON") from None
        parts, dims, spec = (meta.get(k) for k in ("parts", "shape", "codec")) if isinstance(meta, dict) else (None,) * 3
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts) or not isinstance(spec, dict):
            raise ValueError(f"{prefix}: its header lacks the codec and the list of parts")
        if not (isinstance(dims, list) and len(dims) == 2
                and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)):
            raise ValueError(f"{prefix}: shape {str(dims)[:40]} is not two positive integers")
        shape = (dims[0], dims[1])
        try:
            codec = codec_from_dict(spec)
        except ValidationError as e:
            raise ValueError(f"{prefix}: codec: {validation_message(e)}") from None
        expected = codec.stored_parts(shape)
        if "g_idx" in parts:
            expected["g_idx"] = ((shape[1],), torch.int32)
        if sorted(parts) != sorted(expected):
            raise ValueError(f"{prefix}: parts {sorted(parts)}, but {codec.describe()} stores {sorted(expected)}")
        data = {}
        for part, (want, dtype) in expected.items():
            t = tensors.get(f"{prefix}.{part}")
            if t is None:
                raise ValueError(f"{prefix}: missing tensor {prefix}.{part}")
            if tuple(t.shape) != want or t.dtype != dtype:
                raise ValueError(f"{prefix}.{part} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, but "
                                 f"{codec.describe()} stores {str(dtype).removeprefix('torch.')} {list(want)} for a "
                                 f"{shape[0]}x{shape[1]} weight")
            data[part] = t
        if "g_idx" in data:
            group_order(data["g_idx"], codec.grouping, shape)
        return cls(codec=codec.model_dump(), shape=shape, data=data)
