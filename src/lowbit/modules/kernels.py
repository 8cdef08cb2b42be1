"""Fast CPU paths behind :class:`QuantLinear`: PyTorch's own packed int4 and int8 matmuls, and lowbit's
own int4 operator (:mod:`lowbit.modules.int4_rows_kernel`), which takes 4-bit weights where this CPU has
AVX-512 BF16 (faster than torch's at every row count measured: BENCHMARKS.md "Speed and memory").

A kernel is built once from a stored :class:`QuantizedTensor` (at load time, never per call)
and holds the weight in the operator's layout; :func:`enable_fast_kernels` then drops the
layer's own packed codes, so the weights' resident memory stays at their bits per weight. The
stored tensor is always recoverable exactly (:meth:`Int4PackedKernel.codes`), so saving and the
reference path keep working.

All of them take bf16 inputs on their fast paths (torch's float32 paths are scalar loops, 20-30x
slower), so activations are rounded to bf16 at each kernel-backed linear. With more than
:data:`INT4_MAX_ROWS` (lowbit's int4 operator: ``INT4_ROWS_MAX_ROWS``) / :data:`INT8_MAX_ROWS` rows
(prefill) the packed operators lose to a bf16 matmul: the kernel then dequantizes its weight to bf16
and calls ``F.linear``.

Which codecs run here: those whose weight is ``w = scale * q + offset`` per group (lowbit's
``int`` codec, GGUF's Q4_0, Q4_1 and Q4_K), with 4-bit codes and 32/64/128/256-wide groups
(ragged last groups and act-order ``g_idx`` included: the input is padded / permuted), or with
8-bit codes per channel or per tensor (optionally W8A8: int8 activations too, through
``torch._int_mm``; the input's rounding and the output's rescale run as two fused operators of
lowbit's own, :mod:`lowbit.modules.native`, where they could be built: bit for bit the eager
chain's results). Everything else stays on the reference path.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from lowbit.codecs import QuantizedTensor
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs.base import ScaleData, group_order
from lowbit.modules.int4_rows_kernel import Int4RowsKernel, layer_columns
from lowbit.modules.native import int4_rows, native_ops, row_products

#: rows of the input up to which each packed operator runs; above it, dequantize + bf16 matmul
#: (the crossover table of ``scripts/benchmark_speed.py``, BENCHMARKS.md "Speed and memory")
INT4_MAX_ROWS = 96
INT8_MAX_ROWS = 32
#: rows up to which the int8 kernel calls lowbit's row operator (``torch.ops.lowbit.int8_rows``:
#: faster than torch's at one row, slower on a block's small weights from two; benchmark_speed.py's
#: decode-operator table)
INT8_NATIVE_MAX_ROWS = 1
KERNEL_DTYPE = torch.bfloat16
_INT4_GROUPS = (32, 64, 128, 256)
_NATIVE_DTYPES = (torch.bfloat16, torch.float32)  # the input dtypes of native_ops' fused W8A8 operators


class LinearKernel(Protocol):
    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    quantizes_input: bool  # the kernel quantizes its input itself (W8A8): the layer must not

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    def dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    def codes(self) -> torch.Tensor: ...

    def dense(self, dtype: torch.dtype) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...


def affine_form(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(codes (N, K) uint8 in stored column order, scale (N, G), offset (N, G))`` float32 with
    ``w = scale * q + offset`` per group, for a codec whose decoding is affine in the code (the
    ``int`` codec, GGUF's Q4_0/Q4_1/Q4_K, ...: found by decoding every code with each group's
    scale data); None for any other (code books, shared exponents, ...)."""
    codec = qt.get_codec()
    grouping = getattr(codec, "grouping", None)
    if grouping is None or codec.code_bits not in (4, 8):
        return None
    inner = QuantizedTensor(qt.codec, qt.shape, {k: v for k, v in qt.data.items() if k != "g_idx"})
    codes, scale_data = codec.unpack(inner)
    R, G, _ = codes.shape
    n = 1 << codec.code_bits
    # rows at a time where the scale data is per row: a token embedding's 49152 rows x 256 codes in float64
    # at once would hold hundreds of MB for a moment
    per_row = all(t.dim() > 0 and t.shape[0] == R for t in scale_data.values())
    step = max(1, (1 << 20) // (G * n)) if per_row else R
    offsets, scales = [], []
    for r0 in range(0, R, step):
        part = {k: v[r0:r0 + step] for k, v in scale_data.items()} if per_row else scale_data
        every_code = torch.arange(n, dtype=torch.uint8).expand(min(step, R - r0), G, -1)
        values = codec.decode(every_code, part).to(torch.float64)  # (rows, G, codes)
        # the step from the two ends: float32 scales decode each value with its own rounding, and a
        # step taken from two neighbouring codes would carry theirs 255-fold
        offset, scale = values[..., 0], (values[..., -1] - values[..., 0]) / (n - 1)
        line = offset.unsqueeze(-1) + every_code.to(torch.float64) * scale.unsqueeze(-1)
        if not bool(((values - line).abs() <= 1e-6 * values.abs().amax(-1, keepdim=True) + 1e-30).all()):
            return None
        offsets.append(offset.to(torch.float32))
        scales.append(scale.to(torch.float32))
    rows = qt.shape[0]
    return (grouping.merge(codes, qt.shape), torch.cat(scales).expand(rows, -1), torch.cat(offsets).expand(rows, -1))


class Int4PackedKernel:
    """``torch.ops.aten._weight_int4pack_mm_for_cpu``: 4-bit codes in the operator's tiled layout,
    ``(scale, zero)`` per group as ``w = (q - 8) * scale + zero``."""

    name = "int4-packed-cpu"
    quantizes_input = False

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                 order: torch.Tensor | None) -> None:
        rows, cols = codes.shape
        self.shape = (rows, cols)
        self.group_size = group_size
        self.padded = -(-cols // group_size) * group_size
        # padded columns meet zero inputs, so their code (8) and their group's zero never count
        padded_codes = F.pad(codes.to(torch.int32), (0, self.padded - cols), value=8)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded_codes.contiguous(), 1)
        zero = offset + 8 * scale
        self.scale_zero = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(KERNEL_DTYPE).contiguous()
        self.order = order
        self._blocked_affine: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        extra = [] if self.order is None else [self.order]
        extra += [] if self._blocked_affine is None else list(self._blocked_affine)
        return self.packed.numel() + self.scale_zero.numel() * 2 + sum(t.numel() * t.element_size() for t in extra)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` input in bf16, the operator's column order and padded width."""
        if x.dtype != KERNEL_DTYPE:
            x = x.to(KERNEL_DTYPE)
        if self.order is not None:
            x = x.index_select(-1, self.order)
        if self.padded != self.shape[1]:
            x = F.pad(x, (0, self.padded - self.shape[1]))
        return x

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` in bf16 through the packed operator."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(self._prepare(x), self.packed, self.group_size,
                                                          self.scale_zero)

    def dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` in bf16 through a dequantized copy of the weight (AMX), made for this
        call and dropped after it. In the operator's 64-row blocked layout the copy is made block
        by block, ``(N / 64, K, 64)``, and multiplied as such: no transposing copy of the weight."""
        rows = self.shape[0]
        if not _blocked_layout(rows, self.padded):
            return F.linear(x.to(KERNEL_DTYPE), self.dense(KERNEL_DTYPE))
        if self._blocked_affine is None:
            groups = self.padded // self.group_size
            sz = self.scale_zero.view(groups, rows // 64, 64, 2).permute(1, 0, 2, 3).unsqueeze(2)
            scale, zero = sz[..., 0].contiguous(), sz[..., 1].contiguous()
            self._blocked_affine = (scale, (zero - 8 * scale).contiguous())  # w = q * scale + (zero - 8 scale)
        scale, shift = self._blocked_affine
        q = self._blocked_nibbles().view(rows // 64, -1, self.group_size, 64).to(KERNEL_DTYPE)
        w = torch.addcmul(shift, q, scale).view(rows // 64, self.padded, 64)
        return torch.matmul(self._prepare(x), w).permute(1, 0, 2).reshape(x.shape[0], rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step calls this ~200 times per token: every skipped no-op counts
        flat = x.reshape(-1, self.shape[1])
        y = self.dequantized_matmul(flat) if flat.shape[0] > INT4_MAX_ROWS else self.packed_matmul(flat)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.view(*x.shape[:-1], self.shape[0])

    def _blocked_nibbles(self) -> torch.Tensor:
        """The codes of the 64-row blocked layout (rows i and i + 32 of a block share a byte) as
        ``(N / 64, padded K, 2, 32)``: block, column, then the block's rows."""
        flat = self.packed.view(-1, 32)
        return torch.stack([flat & 15, flat >> 4], dim=1).view(self.shape[0] // 64, self.padded, 2, 32)

    def _padded_codes(self) -> torch.Tensor:
        """``(N, padded K)`` codes in the operator's column order, from its packed layout."""
        rows = self.shape[0]
        if _blocked_layout(rows, self.padded):
            return self._blocked_nibbles().permute(0, 2, 3, 1).reshape(rows, self.padded)
        nibbles = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).reshape(-1)
        return nibbles[_int4_gather_index(rows, self.padded)].view(rows, self.padded)

    def codes(self) -> torch.Tensor:
        """The ``(N, K)`` codes in the layer's column order (``g_idx`` order when permuted)."""
        return layer_columns(self._padded_codes()[:, : self.shape[1]], self.order)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The ``(N, K)`` weight as the operator sees it (scale and zero rounded to bf16), in
        ``dtype`` and the layer's column order."""
        rows, cols = self.shape
        q = self._padded_codes().view(rows, -1, self.group_size).to(dtype)
        sz = self.scale_zero.transpose(0, 1).to(dtype)
        w = (q - 8) * sz[..., 0:1] + sz[..., 1:2]
        w = w.reshape(rows, self.padded)[:, :cols]
        return layer_columns(w, self.order)


@functools.lru_cache(maxsize=64)
def _blocked_layout(rows: int, cols: int) -> bool:
    """Whether this torch build packs a ``(rows, cols)`` weight in 64-row blocks, value ``(b * 64
    + h * 32 + i, k)`` in nibble ``h`` of byte ``(b * cols + k) * 32 + i`` (checked against the
    operator itself once per shape; else the general gather index is used)."""
    if rows % 64:
        return False
    index = torch.arange(rows * cols, dtype=torch.int64).view(rows // 64, 2, 32, cols).permute(0, 3, 1, 2)
    # nibble position of each value under that layout, against the one the operator reports
    blocked = torch.empty(rows * cols, dtype=torch.int64)
    blocked[index.reshape(-1)] = torch.arange(rows * cols, dtype=torch.int64).view(-1, 32, 2).transpose(1, 2).reshape(-1)
    return torch.equal(blocked.to(_int4_gather_index(rows, cols).dtype), _int4_gather_index(rows, cols))


@functools.lru_cache(maxsize=16)
def _int4_gather_index(rows: int, cols: int) -> torch.Tensor:
    """For each value of a ``(rows, cols)`` weight (row-major), the position of its nibble in
    the operator's packed layout (low nibble first). Found by packing the digits of each value's
    own index, so it follows whatever layout this torch build uses."""
    src = torch.zeros(rows * cols, dtype=torch.int64)
    index = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    shift = 0
    while (1 << shift) < rows * cols:
        digit = ((index >> shift) & 15).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit.contiguous(), 1)
        src |= torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1).to(torch.int64) << shift
        shift += 4
    gather = torch.empty_like(src)
    gather[src] = torch.arange(rows * cols, dtype=torch.int64)
    return gather.to(torch.int32 if rows * cols < 2**31 else torch.int64)


class Int8PackedKernel:
    """``torch.ops.aten._weight_int8pack_mm``: int8 ``q - 128`` per row times a per-row scale,
    plus ``offset + 128 * scale`` times the input's row sum when the zero point is not 128."""

    name = "int8-cpu"
    scale_dtype = KERNEL_DTYPE  # of the per-row scale and shift, as the operator takes them
    quantizes_input = False  # whether the kernel quantizes its input itself (W8A8)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        self.shape = tuple(codes.shape)
        self.weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        self.scale = scale[:, 0].to(self.scale_dtype).contiguous()
        shift = offset[:, 0] + 128 * scale[:, 0]
        self.shift = None if torch.all(shift == 0) else shift.to(self.scale_dtype)
        # the row operator's scale: the operator's own (rounded to bf16), as float32
        self.row_scale = self.scale.to(torch.float32) if not self.quantizes_input and row_products() else None

    @property
    def nbytes(self) -> int:
        extra = (self.shift, self.row_scale, getattr(self, "w_sums", None), getattr(self, "kept", None))
        parts = [self.weight, self.scale] + [t for t in extra if t is not None]
        return sum(t.numel() * t.element_size() for t in parts)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` in bf16 through the int8 operator."""
        x = x.to(KERNEL_DTYPE)
        if self.row_scale is not None and x.shape[0] <= INT8_NATIVE_MAX_ROWS:
            y = torch.ops.lowbit.int8_rows(x.contiguous(), self.weight, self.row_scale)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        return y if self.shift is None else y + x.sum(-1, keepdim=True) * self.shift

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        y = self.dequantized_matmul(flat) if flat.shape[0] > INT8_MAX_ROWS else self.packed_matmul(flat)
        return y.to(x.dtype).reshape(*lead, self.shape[0])

    def dequantized_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` in bf16 through a dequantized copy of the weight (AMX)."""
        return F.linear(x.to(KERNEL_DTYPE), self.dense(KERNEL_DTYPE))

    def codes(self) -> torch.Tensor:
        return (self.weight.to(torch.int16) + 128).to(torch.uint8)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.to(dtype) * self.scale.to(dtype)[:, None]
        return w if self.shift is None else w + self.shift.to(dtype)[:, None]


class Int8DynamicActivationKernel(Int8PackedKernel):
    """W8A8: the input is quantized too, per row (token) and symmetric, ``x = sx * xq`` with
    ``sx = absmax / 127``, and ``xq @ (q - 128).T`` runs in int8 with int32 sums
    (``torch._int_mm``, AMX int8 here); ``y = sx * s_w * sums (+ shift * sum(x))``. Faster than
    bf16 at every batch size on this CPU, and less exact: the activations lose precision."""

    name = "w8a8-int8-cpu"
    scale_dtype = torch.float32
    quantizes_input = True
    fused = True  # whether __call__ may run native_ops' fused quantize and rescale instead of packed_matmul

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
        super().__init__(codes, scale, offset)
        self.fused = self.fused and self.shift is None  # the fused rescale has no zero-point term
        if self.fused:
            native_ops()  # built (first use on a machine) while the model loads, not in its first timed forward
        # one row (decode): lowbit's exact int8 row product (VNNI) instead of torch._int_mm, which needs each
        # weight row's sum of codes
        self.w_sums = self.weight.to(torch.int32).sum(1, dtype=torch.int32) if row_products() else None

    def int_mm(self, xq: torch.Tensor) -> torch.Tensor:
        """``xq (M, K) int8 @ W.T`` as exact int32 sums: lowbit's row product at one row, else torch's."""
        if self.w_sums is not None and xq.shape[0] <= INT8_NATIVE_MAX_ROWS:
            return torch.ops.lowbit.int8_int8_rows(xq.contiguous(), self.weight, self.w_sums)
        return torch._int_mm(xq, self.weight.t())

    def input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, 1)`` float32: each row's ``absmax / 127``."""
        return x.abs().amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / 127

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x (M, K) @ W.T`` in float32 from int8 activations and weights."""
        x = x.to(torch.float32)
        sx = self.input_scale(x)
        # a fitted scale keeps every row within [-127, 127]; a static one saturates at int8's ends, as
        # vLLM's static_scaled_int8_quant does
        xq = torch.round(x / sx).clamp_(-128, 127).to(torch.int8)
        y = self.int_mm(xq).to(torch.float32).mul_(sx).mul_(self.scale)
        return y if self.shift is None else y.addcmul_(x.sum(-1, keepdim=True), self.shift)

    def static_scale(self) -> float:
        """The fixed input scale, 0 when each row's is computed (dynamic)."""
        return 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.shape[1])
        # under torch.compile the eager chain is traced and fused by inductor; an opaque operator would break the graph
        fusable = self.fused and x.dtype in _NATIVE_DTYPES and not torch.compiler.is_compiling()
        ops = native_ops() if fusable else None
        if ops is None:
            y = self.packed_matmul(flat).to(x.dtype)
        else:  # the same arithmetic in two fused passes, bit for bit
            xq, sx = ops.quantize_rows(flat.contiguous(), self.static_scale())
            y = ops.dequantize_rows(self.int_mm(xq), sx, self.scale, x.dtype)
        return y.view(*x.shape[:-1], self.shape[0])


class LLMInt8Kernel(Int8DynamicActivationKernel):
    """LLM.int8() (Dettmers et al., 2022), as bitsandbytes computes it: the input columns where
    some token's ``|x|`` reaches ``threshold`` (for the whole input at hand: the batch) multiply the
    dequantized weight's columns in floating point; every other column goes through int8, each
    token scaled by its largest value outside the outlier elements. At one row (decode) the whole split
    is one operator, ``lowbit::llm_int8_rows`` (same columns, int8 rows and exact int32 sums; the
    16-bit columns summed in another float32 order); above it, the eager chain below."""

    name = "llm-int8-cpu"
    fused = False  # its outlier columns are not in the fused operators

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, threshold: float) -> None:
        super().__init__(codes, scale, offset)
        self.threshold = threshold
        self.outlier_counts = [0, 0]  # outlier columns seen, columns seen (for reports)

    def packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_sums is not None and self.shift is None and x.shape[0] <= INT8_NATIVE_MAX_ROWS:
            # decode: the whole split in one operator (the eager chain below is a dozen operators a call)
            y, outliers = torch.ops.lowbit.llm_int8_rows(x.contiguous(), self.weight, self.scale, self.w_sums,
                                                         self.threshold)
            if not torch.compiler.is_compiling():  # a count read back would break a compiled graph
                self.outlier_counts[0] += int(outliers)
                self.outlier_counts[1] += x.shape[1]
            return y
        x = x.to(torch.float32)
        elements = x.abs() >= self.threshold
        cols = elements.any(0).nonzero().view(-1)
        self.outlier_counts[0] += int(cols.numel())
        self.outlier_counts[1] += x.shape[1]
        inner = x.masked_fill(elements, 0) if cols.numel() else x
        sx = self.input_scale(inner)
        xq = torch.round(inner / sx).clamp_(-127, 127)
        if cols.numel():
            xq[:, cols] = 0
        y = self.int_mm(xq.to(torch.int8)).to(torch.float32).mul_(sx).mul_(self.scale)
        if self.shift is not None:
            y.addcmul_((xq * sx).sum(-1, keepdim=True), self.shift)
        if cols.numel():
            w = self.weight[:, cols].to(torch.float32) * self.scale.unsqueeze(1)
            if self.shift is not None:
                w = w + self.shift.unsqueeze(1)
            y.addmm_(x[:, cols], w.t())
        return y


class Int8StaticActivationKernel(Int8DynamicActivationKernel):
    """W8A8 with a static per-tensor input scale from calibration: ``xq = round(x / sx)`` saturated to
    ``[-128, 127]`` as vLLM's static int8 kernel does (values beyond the calibrated range clip), then as
    the dynamic kernel. No per-call reduction over the input, and the scale vLLM reads as ``input_scale``."""

    name = "w8a8-static-int8-cpu"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, input_scale: torch.Tensor) -> None:
        super().__init__(codes, scale, offset)
        self.sx = input_scale.to(torch.float32).reshape(1, 1)
        self._static = float(self.sx)
        self.fused = self.fused and self._static > 0  # the fused operator reads a scale <= 0 as "dynamic"

    def input_scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.sx

    def static_scale(self) -> float:
        return self._static


class _FixedChannels:
    """W8A8 with fixed 16-bit input channels (``outlier_channels`` from calibration): the weight's
    int8 columns at those channels are zeroed, so whatever codes the input gets there add nothing,
    and ``x[:, channels] @ W[:, channels].T`` is added in float32. A dynamic per-token scale is
    fitted with those channels zeroed, as the reference (``fake_quantize``) fits it."""

    def _keep_channels(self, channels: torch.Tensor) -> None:
        self.channels = channels.to(torch.int64)
        cols = self.weight[:, self.channels].to(torch.float32) * self.scale.reshape(-1, 1)
        self.kept = cols.t().contiguous()  # (k, N) float32
        self._kept_as = {torch.float32: self.kept}  # the kept columns in each output dtype met
        self.weight = self.weight.index_fill(1, self.channels, 0)
        if self.w_sums is not None:
            self.w_sums = self.weight.to(torch.int32).sum(1, dtype=torch.int32)

    def _add_kept(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        flat, out = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        kept_x = flat.index_select(1, self.channels)
        if y.dtype != torch.float32 and flat.shape[0] <= INT8_NATIVE_MAX_ROWS:
            # a few rows (decode): torch's bf16 GEMM costs 2.6x the float32 one at one row here
            return y.add_((kept_x.to(torch.float32) @ self.kept).view(y.shape).to(y.dtype))
        kept = self._kept_as.get(y.dtype)
        if kept is None:
            kept = self._kept_as[y.dtype] = self.kept.to(y.dtype)
        out.addmm_(kept_x.to(y.dtype), kept)  # added inside the small GEMM (beta = 1): no extra pass over y
        return y


class Int8FixedChannelsKernel(_FixedChannels, Int8DynamicActivationKernel):
    """W8A8 dynamic per token, with fixed 16-bit input channels (:class:`_FixedChannels`)."""

    name = "w8a8-int8-channels-cpu"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, channels: torch.Tensor) -> None:
        super().__init__(codes, scale, offset)
        assert self.shift is None, "fixed outlier channels need symmetric int8 weights"
        self._keep_channels(channels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_kept(super().__call__(x.index_fill(-1, self.channels, 0)), x)


class Int8StaticFixedChannelsKernel(_FixedChannels, Int8StaticActivationKernel):
    """W8A8 static per tensor, with fixed 16-bit input channels (:class:`_FixedChannels`): the
    input is rounded whole (its kept channels saturate, against zeroed weight columns)."""

    name = "w8a8-static-int8-channels-cpu"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, input_scale: torch.Tensor,
                 channels: torch.Tensor) -> None:
        super().__init__(codes, scale, offset, input_scale)
        assert self.shift is None, "fixed outlier channels need symmetric int8 weights"
        self._keep_channels(channels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_kept(super().__call__(x), x)


def _int8_activations(q: "ActivationQuantizer | None", granularity: str) -> bool:
    return q is not None and q.format == "int8" and q.symmetric and q.granularity == granularity


def build_kernel(qt: QuantizedTensor, input_quant: "ActivationQuantizer | None" = None,
                 input_scale: "ScaleData | None" = None, input_channels: torch.Tensor | None = None,
                 ) -> LinearKernel | None:
    """The fastest CPU kernel that computes ``x @ W.T`` for this stored weight, or None (the
    reference path) when no kernel holds its codec. ``input_quant``: how the layer quantizes its
    input; int8 weights with symmetric int8 inputs, dynamic per token or static per tensor
    (``input_scale``), multiply in int8 (:class:`Int8DynamicActivationKernel`,
    :class:`Int8StaticActivationKernel`, and their kinds with fixed 16-bit ``input_channels``); for
    other input formats the layer quantizes the input itself before the kernel."""
    codec = qt.get_codec()
    grouping = getattr(codec, "grouping", None)
    if grouping is None:
        return None
    rows, cols = qt.shape
    bits, granularity = codec.code_bits, grouping.granularity
    if bits == 8 and granularity in ("channel", "tensor") and "g_idx" not in qt.data:
        group_size = None
    elif bits == 4 and granularity == "group" and grouping.group_size in _INT4_GROUPS:
        group_size = grouping.group_size
    elif bits == 4 and granularity != "group":  # one scale per row or tensor: operator groups repeat it
        group_size = 256 if int4_rows() else next((g for g in reversed(_INT4_GROUPS) if cols % g == 0), None)
        if group_size is None:
            return None
    else:
        return None
    form = affine_form(qt)
    if form is None:
        return None
    codes, scale, offset = form
    if input_channels is not None:  # fixed 16-bit channels: only the int8 kernels above hold them
        if bits != 8 or bool((offset[:, 0] + 128 * scale[:, 0]).any()):  # symmetric int8 weights only
            return None
        if _int8_activations(input_quant, "token") and input_scale is None:
            return Int8FixedChannelsKernel(codes, scale, offset, input_channels)
        if _int8_activations(input_quant, "tensor") and input_scale is not None:
            return Int8StaticFixedChannelsKernel(codes, scale, offset, input_scale["scale"], input_channels)
        return None
    if bits == 8:
        if _int8_activations(input_quant, "token") and input_scale is None:
            assert input_quant is not None
            if input_quant.outlier_threshold is not None:
                return LLMInt8Kernel(codes, scale, offset, input_quant.outlier_threshold)
            return Int8DynamicActivationKernel(codes, scale, offset)
        if _int8_activations(input_quant, "tensor") and input_scale is not None:
            return Int8StaticActivationKernel(codes, scale, offset, input_scale["scale"])
        return Int8PackedKernel(codes, scale, offset)
    assert group_size is not None
    order = None
    if granularity != "group":  # the operator's groups repeat the row's (or tensor's) one scale
        groups = -(-cols // group_size)
        scale, offset = scale.expand(rows, groups), offset.expand(rows, groups)
    elif "g_idx" in qt.data:
        order = group_order(qt.data["g_idx"], grouping, qt.shape)
        codes = codes[:, order]
    if int4_rows():  # lowbit's own operator: any row width, the codec's own groups
        return Int4RowsKernel(codes, scale, offset, group_size, order)
    if granularity == "group":
        finer, source = grouping.whole_groups(cols)
        if finer != group_size and finer in _INT4_GROUPS:
            # a shorter last group: finer whole groups repeating their scales spare padding each input
            scale, offset, group_size = scale[:, source], offset[:, source], finer
    return Int4PackedKernel(codes, scale, offset, group_size, order)
