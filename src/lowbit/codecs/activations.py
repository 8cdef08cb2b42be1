"""Codecs on activations: the inputs of a linear, ``(..., features)``, rather than 2-D weights.

An :class:`ActivationQuantizer` is a number format (int8 or FP8, the codecs of the weights) and a
granularity along the input, applied through the same fit / encode / decode steps:

* ``token``: one scale per row (token) of the flattened input ``(N, K)``: the codec's per-channel
  grouping on ``(N, K)``;
* ``tensor``: one scale for the whole input;
* ``group``: one scale per ``group_size`` features of each token;
* ``channel``: one scale per input feature, static only (from calibration): the per-channel
  grouping on ``(K, N)``.

With ``outlier_channels = k`` (int8, symmetric, per token or per tensor), each linear keeps ``k``
input features in 16-bit, the same features for every input: the ones with the largest calibrated
``|x|``, chosen once from calibration (the indices travel with the layer, beside its static scale).
The other features are quantized as usual, their scale fitted without the kept ones. It is
LLM.int8()'s decomposition with its columns fixed in advance, which lets a static per-tensor scale
cover the rest: SmolLM2's massive activations sit in a few fixed features.

Scales are dynamic (fitted to each input as it comes, :meth:`ActivationQuantizer.fit`) or static:
fitted once to a range an observer chose (:meth:`ActivationQuantizer.from_range`, the same fit
applied to the two values ``lo, hi``), then applied to every input. Symmetric int8 uses the
``scale = absmax / 127`` (codes within ``[-127, 127]``), as vLLM and bitsandbytes quantize
activations, and a static scale saturates beyond its range at ``[-128, 127]``, as vLLM's static int8
kernel does; FP8 ``scale = absmax / 448`` (E4M3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lowbit.codecs.base import GroupedCodec, ScaleData
from lowbit.codecs.fp8 import FP8Codec
from lowbit.codecs.integer import IntCodec

ActivationFormat = Literal["int8", "fp8_e4m3", "fp8_e5m2"]
ActivationGranularity = Literal["token", "tensor", "group", "channel"]


@dataclass(frozen=True)
class ActivationQuantizer:
    format: ActivationFormat = "int8"
    granularity: ActivationGranularity = "token"
    group_size: int | None = None
    symmetric: bool = True
    outlier_threshold: float | None = None  # LLM.int8(): columns with some |x| >= it stay exact
    outlier_channels: int | None = None  # this many input features (fixed from calibration) stay exact

    def __post_init__(self) -> None:
        if self.granularity == "group" and not self.group_size:
            raise ValueError("activation granularity 'group' needs a group_size")
        if not self.symmetric and self.format != "int8":
            raise ValueError(f"{self.format} activations are symmetric")
        if self.outlier_threshold is not None and (self.format, self.granularity, self.symmetric) != ("int8", "token", True):
            raise ValueError("an outlier threshold (LLM.int8()) needs symmetric int8 per-token inputs")
        if self.outlier_channels is not None:
            if self.outlier_channels < 1:
                raise ValueError(f"outlier_channels must be at least 1, got {self.outlier_channels}")
            if (self.format, self.symmetric) != ("int8", True) or self.granularity not in ("token", "tensor"):
                raise ValueError("fixed outlier channels need symmetric int8 inputs per token or per tensor")
            if self.outlier_threshold is not None:
                raise ValueError("outlier channels are fixed (outlier_channels) or chosen per input (outlier_threshold), "
                                 "not both")

    @property
    def codec(self) -> GroupedCodec:
        """The codec applied to the 2-D view of the input (:meth:`view`)."""
        granularity = {"token": "channel", "channel": "channel", "tensor": "tensor", "group": "group"}[self.granularity]
        group = self.group_size if self.granularity == "group" else None
        if self.format == "int8":
            return IntCodec(bits=8, symmetric=self.symmetric, restricted=self.symmetric, granularity=granularity,  # type: ignore[arg-type]
                            group_size=group, scale_dtype="float32")
        return FP8Codec(fmt=self.format.removeprefix("fp8_"), granularity=granularity, group_size=group)  # type: ignore[arg-type]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., K)`` as the 2-D tensor the codec groups: ``(N, K)``, or ``(K, N)`` per channel."""
        flat = x.reshape(-1, x.shape[-1])
        return flat.t() if self.granularity == "channel" else flat

    def unview(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (v.t() if self.granularity == "channel" else v).reshape(like.shape)

    def fit(self, x: torch.Tensor) -> ScaleData:
        """Dynamic scale data for ``x`` ``(..., K)``."""
        if self.granularity == "channel":
            raise ValueError("per-channel activation scales are static (from calibration), not dynamic")
        v = self.view(x.to(torch.float32))
        return self.codec.fit(self.codec.grouping.split(v))

    def from_range(self, lo: torch.Tensor, hi: torch.Tensor) -> ScaleData:
        """Static scale data for inputs within ``[lo, hi]``: scalars (per tensor) or ``(K,)``
        (per channel); exactly the scales a dynamic fit gives an input whose extremes they are."""
        lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
        ends = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=-1)  # (R, 2)
        if self.granularity == "tensor":
            if ends.shape[0] != 1:
                raise ValueError(f"a per-tensor range is two numbers, got {tuple(lo.shape)}")
        elif self.granularity != "channel":
            raise ValueError(f"static activation scales are per tensor or per channel, not per {self.granularity}")
        return self.codec.fit(ends.unsqueeze(1))

    def encode(self, x: torch.Tensor, scale: ScaleData | None = None) -> tuple[torch.Tensor, ScaleData]:
        """Codes of ``x`` in the 2-D grouped view ``(R, G, g)`` and the scale data used (``scale``
        when given: static, else fitted to ``x``)."""
        v = self.view(x.to(torch.float32))
        groups = self.codec.grouping.split(v)
        s = self.codec.fit(groups) if scale is None else scale
        return self.codec.encode(groups, s), s

    def outlier_columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM.int8()'s decomposition of ``x`` ``(..., K)`` as bitsandbytes makes it: the elements
        with ``|x| >= threshold`` ``(N, K)`` and the columns ``(K,)`` that hold one (for this whole
        input: the batch)."""
        assert self.outlier_threshold is not None
        flat = x.reshape(-1, x.shape[-1])
        elements = flat.abs() >= self.outlier_threshold
        return elements, elements.any(0)

    def choose_channels(self, abs_max: torch.Tensor) -> torch.Tensor:
        """The ``outlier_channels`` input features with the largest calibrated ``abs_max`` ``(K,)``:
        sorted int64 indices ``(k,)``."""
        assert self.outlier_channels is not None
        if self.outlier_channels >= abs_max.numel():
            raise ValueError(f"{self.outlier_channels} outlier channels of {abs_max.numel()} input features leave none "
                             "to quantize")
        return abs_max.to(torch.float32).topk(self.outlier_channels).indices.sort().values

    def check_channels(self, channels: torch.Tensor, width: int) -> None:
        """ValueError unless ``channels`` are ``outlier_channels`` distinct integer indices ``(k,)`` of
        an input's ``width`` features."""
        k = self.outlier_channels
        if k is None:
            raise ValueError("this input quantization keeps no channels in 16-bit")
        if tuple(channels.shape) != (k,) or channels.dtype.is_floating_point or channels.unique().numel() != k \
                or int(channels.min()) < 0 or int(channels.max()) >= width:
            raise ValueError(f"input channels kept in 16-bit: {k} distinct indices within 0..{width - 1} expected, got "
                             f"{tuple(channels.shape)} {channels.dtype}")

    def fake_quantize(self, x: torch.Tensor, scale: ScaleData | None = None,
                      channels: torch.Tensor | None = None) -> torch.Tensor:
        """The values ``x`` takes through this format, in ``x``'s dtype and shape. With an outlier
        threshold (LLM.int8(), as bitsandbytes): each token's scale comes from its values without
        the outlier elements, and the outlier columns keep their exact values. ``channels``
        (int64 ``(k,)``, with ``outlier_channels``): the fixed features that keep their values;
        the others are quantized, a dynamic scale fitted without the kept ones (without
        ``channels`` every feature is quantized: what an observer measures)."""
        if channels is not None:
            plain = ActivationQuantizer(self.format, self.granularity, self.group_size, self.symmetric)
            q = plain.fake_quantize(x.index_fill(-1, channels, 0), scale)
            return q.index_copy(-1, channels, x.index_select(-1, channels))
        if self.outlier_threshold is not None:
            elements, cols = self.outlier_columns(x)
            flat = x.reshape(-1, x.shape[-1])
            plain = ActivationQuantizer(self.format, self.granularity, self.group_size, self.symmetric)
            q = plain.fake_quantize(flat.masked_fill(elements, 0), scale)
            return torch.where(cols, flat, q).reshape(x.shape)
        codes, s = self.encode(x, scale)
        shape = tuple(self.view(x).shape)
        values = self.codec.grouping.merge(self.codec.decode(codes, s), shape)
        return self.unview(values, x).to(x.dtype)

    def describe(self) -> str:
        kind = {"token": "per-token", "tensor": "per-tensor", "channel": "per-channel"}.get(
            self.granularity, f"g{self.group_size}")
        outliers = f", |x| >= {self.outlier_threshold:g} in 16-bit" if self.outlier_threshold is not None else ""
        if self.outlier_channels is not None:
            outliers = f", {self.outlier_channels} fixed channels in 16-bit"
        return f"{self.format} {kind}{'' if self.symmetric else ' asym'}{outliers}"
