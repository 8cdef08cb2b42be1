"""The codec interface: how numbers are stored.

A codec turns a float weight into codes plus scale data and back, and knows its exact byte
layout. Algorithms (RTN, GPTQ, AWQ, ...) only ever call the two steps below, so any algorithm
can target any codec:

* :meth:`Codec.fit` -- the scale data of each group, for a range shrunk by ``shrink``;
* :meth:`Codec.encode` / :meth:`Codec.decode` -- values <-> codes, given scale data.

All three work on the grouped view ``(R, G, g)`` of :mod:`lowbit.codecs.grouping` (or on any
slice of it, e.g. one column ``(R, G, 1)``); scale data tensors have shape ``(R, G)`` and are
returned already in their storage dtype, so that encoding with them is exactly what a reader
of the stored file decodes.

Codecs are pydantic models: their fields are their parameters, and a recipe stores them as is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import Field, model_validator

from lowbit.codecs.grouping import Granularity, Grouping
from lowbit.codecs.quantized_tensor import QuantizedTensor
from lowbit.registry import Registered

ScaleData = dict[str, torch.Tensor]


class GroupHessian:
    """Error weights that couple the values of a group: ``blocks`` ``(G, g, g)``, the diagonal
    blocks of the input Hessian ``X^T X / n`` in the grouped view (zero on padding). The error of
    a group's difference ``d`` is then ``d^T H_g d``, its share of the layer's output error."""

    def __init__(self, hessian: torch.Tensor, grouping: Grouping, cols: int) -> None:
        if grouping.granularity == "tensor":
            raise ValueError("a per-tensor grouping has no per-group Hessian")
        _, G, g = grouping.grid((1, cols))
        h = torch.zeros(G * g, G * g, dtype=torch.float32, device=hessian.device)
        h[:cols, :cols] = hessian.to(torch.float32)
        self.blocks = h.view(G, g, G, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


class Codec(Registered, ABC):
    """A number format. Subclasses declare ``name: Literal[...]`` and their parameters."""

    registry: ClassVar[dict[str, type["Codec"]]] = {}

    # -- layout -------------------------------------------------------------------------
    @property
    @abstractmethod
    def grouping(self) -> Grouping:
        """How weights are cut into groups that share scale data."""

    @property
    @abstractmethod
    def code_bits(self) -> int:
        """Bits per stored code."""

    @property
    def whole_tensor_fit(self) -> bool:
        """Whether the scale data carries a whole-tensor state (fit the full weight once, then
        encode slices with it) rather than independent per-group scales."""
        return False

    @property
    def rows_independent(self) -> bool:
        """Whether each output row is fitted and encoded from that row alone (scale data per
        row or per group, no whole-tensor state): weights stacked row-wise then quantize exactly
        as each would alone, and the scale data's first dimension is the row."""
        return self.grouping.granularity != "tensor" and not self.whole_tensor_fit

    @abstractmethod
    def scale_dtypes(self) -> dict[str, torch.dtype]:
        """Name -> storage dtype of each scale-data tensor (each of shape ``(R, G)``)."""

    # -- the two steps ------------------------------------------------------------------
    @abstractmethod
    def fit(self, groups: torch.Tensor, shrink: float | torch.Tensor = 1.0) -> ScaleData:
        """Scale data for ``groups`` ``(R, G, g)`` whose range is scaled by ``shrink``
        (a float, or a ``(R, G)`` tensor of per-group factors in ``(0, 1]``)."""

    @abstractmethod
    def encode(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        """Codes (uint8, same shape as ``values`` ``(R, G, k)``) for values under ``scale``."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        """Float32 values of ``codes`` ``(R, G, k)`` under ``scale``."""

    # -- generic machinery --------------------------------------------------------------
    def quantize_dequantize(self, values: torch.Tensor, scale: ScaleData) -> torch.Tensor:
        """``decode(encode(values))``: the values this format stores for ``values``."""
        return self.decode(self.encode(values, scale), scale)

    def fit_group_scales(
        self,
        groups: torch.Tensor,
        weights: "torch.Tensor | GroupHessian",
        shrink_grid: torch.Tensor | None = None,
    ) -> ScaleData:
        """Scale data per group; with ``shrink_grid``, the shrink factor of each group that
        gives the lowest ``weights``-weighted squared error (``weights`` broadcasts against
        ``groups``, or is a :class:`GroupHessian`; the factor 1.0 is always a candidate)."""
        best = self.fit(groups, 1.0)
        if shrink_grid is None or shrink_grid.numel() == 0:
            return best
        best_err = self._group_error(groups, weights, best)
        for s in shrink_grid.tolist():
            if s == 1.0:
                continue
            cand = self.fit(groups, float(s))
            err = self._group_error(groups, weights, cand)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better, cand[k], best[k]) for k in best}
        return best

    def importance_weights(self, groups: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The search's per-value error weights when an importance is given: ``weights`` (the
        importance in the grouped view) as is; codecs of another tool's format override this to
        weigh as that tool does. ``groups`` ``(R, G, g)``; the result broadcasts against it."""
        return weights

    def _group_error(self, groups: torch.Tensor, weights: "torch.Tensor | GroupHessian", scale: ScaleData) -> torch.Tensor:
        diff = self.quantize_dequantize(groups, scale) - groups
        if isinstance(weights, GroupHessian):
            return torch.einsum("rgi,gij,rgj->rg", diff, weights.blocks, diff)
        return (diff.square() * weights).sum(dim=-1)

    def quantize(
        self,
        weight: torch.Tensor,
        importance: torch.Tensor | None = None,
        shrink_grid: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Round-to-nearest quantization of a 2-D weight ``(out, in)``.

        ``importance`` ``(in,)`` weights the error of each input column in the scale search.
        """
        w = self.check_weight(weight)
        g = self.grouping
        groups = g.split(w)
        weights = g.weights(tuple(w.shape), importance, w.device)
        if importance is not None:
            weights = self.importance_weights(groups, weights)
        scale = self.fit_group_scales(groups, weights, shrink_grid)
        codes = self.encode(groups, scale)
        return self.pack(g.merge(codes, tuple(w.shape)), scale, tuple(w.shape))

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        """The float32 ``(out, in)`` values round-to-nearest stores for ``weight``, without
        packing (equal to ``quantize(weight).dequantize()``; for searches that try many)."""
        w = self.check_weight(weight)
        g = self.grouping
        groups = g.split(w)
        return g.merge(self.quantize_dequantize(groups, self.fit(groups)), tuple(w.shape))

    def check_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as float32 ``(out, in)``, or a ValueError that says what is wrong."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not weight.dtype.is_floating_point:
            raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
        w = weight.detach().to(torch.float32)
        if not torch.isfinite(w).all():
            raise ValueError("weight contains NaN or Inf")
        return w

    def pack(self, codes: torch.Tensor, scale: ScaleData, shape: tuple[int, int]) -> QuantizedTensor:
        """Store codes ``(out, in)`` and scale data as a :class:`QuantizedTensor`."""
        from lowbit.codecs.packing import pack_codes

        data = {"codes": pack_codes(codes, self.code_bits)}
        dtypes = self.scale_dtypes()
        for k, v in scale.items():
            data[k] = v.to(dtypes[k]).contiguous()
        return QuantizedTensor(codec=self.model_dump(), shape=shape, data=data)

    def unpack(self, qt: QuantizedTensor) -> tuple[torch.Tensor, ScaleData]:
        """Codes in the grouped view ``(R, G, g)`` and scale data of a stored tensor."""
        from lowbit.codecs.packing import unpack_codes

        rows, cols = qt.shape
        codes = unpack_codes(qt.data["codes"], self.code_bits, rows * cols).view(rows, cols)
        scale = {k: v for k, v in qt.data.items() if k != "codes"}
        return self.grouping.split(codes), scale

    def dequantize(self, qt: QuantizedTensor) -> torch.Tensor:
        """Float32 ``(out, in)`` weight of a stored tensor.

        With a ``g_idx`` part (GPTQ act-order), codes are in column order and column ``c``
        belongs to group ``g_idx[c]``: the columns are gathered group by group, decoded, and
        scattered back."""
        g_idx = qt.data.get("g_idx")
        if g_idx is None:
            codes, scale = self.unpack(qt)
            return self.grouping.merge(self.decode(codes, scale), qt.shape)
        inner = QuantizedTensor(qt.codec, qt.shape, {k: v for k, v in qt.data.items() if k != "g_idx"})
        codes, scale = self.unpack(inner)
        order = group_order(g_idx, self.grouping, qt.shape)
        flat = self.grouping.merge(codes, qt.shape)[:, order]
        values = self.grouping.merge(self.decode(self.grouping.split(flat), scale), qt.shape)
        out = torch.empty_like(values)
        out[:, order] = values
        return out

    def stored_parts(self, shape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a weight of ``shape`` is stored as: the packed
        codes (1-D uint8) and the scale data (``(R, G)`` in :meth:`scale_dtypes`); exactly what
        :meth:`pack` makes, so that a reader can check a file's tensors before decoding them."""
        from lowbit.codecs.packing import packed_nbytes

        R, G, _ = self.grouping.grid(shape)
        parts = {"codes": ((packed_nbytes(shape[0] * shape[1], self.code_bits),), torch.uint8)}
        parts.update({k: ((R, G), d) for k, d in self.scale_dtypes().items()})
        return parts

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Exact stored bytes of a weight of ``shape``: packed codes plus scale data."""
        total = 0
        for dims, dtype in self.stored_parts(shape).values():
            n = torch.empty((), dtype=dtype).element_size()
            for d in dims:
                n *= d
            total += n
        return total

    def describe(self) -> str:
        """Short human-readable name, e.g. ``int4 g128 sym``."""
        return self.name


def group_order(g_idx: torch.Tensor, grouping: Grouping, shape: tuple[int, int]) -> torch.Tensor:
    """Column order that makes the groups of ``g_idx`` ``(in,)`` contiguous; ValueError unless
    every group holds exactly the columns the grouping gives it."""
    rows, cols = shape
    if grouping.granularity != "group" or g_idx.shape != (cols,):
        raise ValueError(f"g_idx of shape {tuple(g_idx.shape)} does not fit a grouped weight of shape {shape}")
    g = g_idx.to(torch.long)
    order = torch.argsort(g, stable=True)
    assert grouping.group_size is not None
    if not torch.equal(g[order], torch.arange(cols, device=g.device) // grouping.group_size):
        raise ValueError("g_idx does not assign group_size columns to each group")
    return order


class GroupedCodec(Codec):
    """A codec whose scale data is per tensor, per output channel or per group of the input
    dimension, as the user chooses. Subclasses may redeclare the two fields to change defaults."""

    granularity: Granularity = Field("group", description="tensor, channel (per output row) or group")
    group_size: int | None = Field(128, gt=0, description="values per group along the input dimension")

    @model_validator(mode="after")
    def _group_size_matches(self) -> "GroupedCodec":
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs a group_size")
        if self.granularity != "group" and self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        return self

    @property
    def grouping(self) -> Grouping:
        return Grouping(self.granularity, self.group_size)

    def granularity_label(self) -> str:
        """``per-tensor``, ``per-channel`` or ``g128``."""
        return {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
