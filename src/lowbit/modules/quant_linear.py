"""QuantLinear: a linear layer whose weight is a packed :class:`QuantizedTensor`.

The reference path dequantizes to the input's dtype and calls ``F.linear`` (during evaluation
:func:`lowbit.modules.rows_linear.dense_linear`: float32 through oneDNN's GEMM). A fast kernel
(:mod:`lowbit.modules.kernels`, attached by :func:`enable_fast_kernels`) replaces it where one
holds the codec; the kernel then owns the codes. During evaluation,
:func:`cache_dequantized_weights` keeps one dense copy per layer (reference path) so that
repeated forwards do not unpack again.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.codecs import QuantizedTensor
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs.base import ScaleData
from lowbit.codecs.packing import pack_codes
from lowbit.modules.kernels import Int8PackedKernel, LinearKernel, build_kernel
from lowbit.modules.rows_linear import dense_linear

_PART_PREFIX = "qweight_"


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored as codes and scale data (module buffers)."""

    kernel_capable = True  # whether enable_fast_kernels may give it a kernel
    fast_dense = False  # the reference path's product through dense_linear (set by rows_linear's fast_dense_linears)

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                 input_quant: ActivationQuantizer | None = None, input_scale: ScaleData | None = None,
                 input_channels: torch.Tensor | None = None) -> None:
        super().__init__()
        self.codec = dict(qweight.codec)
        self.out_features, self.in_features = qweight.shape
        self.parts = sorted(qweight.data)
        for part, t in qweight.data.items():
            self.register_buffer(_PART_PREFIX + part, t)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._dense: torch.Tensor | None = None
        self.kernel: LinearKernel | None = None
        # how the input is quantized (None: it is not); static scale data (float32), None when dynamic;
        # the input features kept in 16-bit (int64 indices) when the quantizer has fixed outlier channels
        self.input_quant: ActivationQuantizer | None = None
        self.input_scale: ScaleData | None = None
        self.input_channels: torch.Tensor | None = None
        if input_quant is not None:
            self.set_input_quant(input_quant, input_scale, input_channels)

    def set_input_quant(self, quantizer: ActivationQuantizer | None, scale: ScaleData | None = None,
                        channels: torch.Tensor | None = None) -> None:
        """Quantize the input with ``quantizer`` (static ``scale`` data, or dynamic when None), or
        not at all (None); ``channels``: the input features kept in 16-bit, int64 ``(k,)``, exactly
        when the quantizer has ``outlier_channels = k``. A kernel already built is dropped: its
        choice depends on the input's."""
        want = None if quantizer is None else quantizer.outlier_channels
        if (want is None) != (channels is None):
            got = "none" if channels is None else channels.numel()
            raise ValueError(f"input channels kept in 16-bit: {want or 0} expected, got {got}")
        if channels is not None:
            assert quantizer is not None
            channels = channels.detach().to(torch.int64).reshape(-1)
            quantizer.check_channels(channels, self.in_features)
        self.input_quant = quantizer
        self.input_scale = None if scale is None else {k: v.detach().to(torch.float32) for k, v in scale.items()}
        self.input_channels = channels
        if self.kernel is not None:
            self.use_kernel(None)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the layer's input quantization leaves it (unchanged when there is none)."""
        if self.input_quant is None:
            return x
        return self.input_quant.fake_quantize(x, self.input_scale, self.input_channels)

    @property
    def qweight(self) -> QuantizedTensor:
        data = {p: getattr(self, _PART_PREFIX + p) for p in self.parts}
        qt = QuantizedTensor(codec=self.codec, shape=(self.out_features, self.in_features), data=data)
        if self.kernel is not None:
            data["codes"] = pack_codes(self.kernel.codes(), qt.get_codec().code_bits)
        return qt

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32 unless cached in another dtype)."""
        return self._dense if self._dense is not None else self.qweight.dequantize()

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._dense is not None:
            return self._dense if self._dense.dtype == dtype else self._dense.to(dtype)
        return self.qweight.dequantize(torch.float32).to(dtype=dtype, device=self.qweight_codes.device)

    def use_kernel(self, kernel: "LinearKernel | None") -> None:
        """Run through ``kernel`` (which then holds the codes: the layer's own packed copy is
        released) or, with None, go back to the reference path (the codes are restored)."""
        if self.kernel is not None:
            self._buffers[_PART_PREFIX + "codes"] = self.qweight.data["codes"]
            self.kernel = None
        if kernel is not None:
            self._dense = None  # the kernel computes from now on
            self._buffers[_PART_PREFIX + "codes"] = torch.empty(0, dtype=torch.uint8)
            # own copies of the small parts: a part may be a view into a memory-mapped checkpoint,
            # whose pages would otherwise stay resident for the sake of a few scales
            for p in self.parts:
                if p != "codes":
                    self._buffers[_PART_PREFIX + p] = self._buffers[_PART_PREFIX + p].clone()
            self.kernel = kernel

    def state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if self.kernel is None:
            return super().state_dict(*args, **kwargs)
        kernel = self.kernel
        self.use_kernel(None)
        try:
            return super().state_dict(*args, **kwargs)
        finally:
            self.use_kernel(kernel)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # model.to(dtype) must not cast codes or scale data (a bf16 cast of an fp16 scale loses
        # bits): quantized parts follow the module's device only, keeping their storage dtype.
        if self.kernel is not None and fn(torch.empty(0)).device.type != "cpu":
            self.use_kernel(None)  # the kernels are CPU operators
        parts = {p: getattr(self, _PART_PREFIX + p) for p in self.parts}
        super()._apply(fn, recurse)
        for p, t in parts.items():
            moved = getattr(self, _PART_PREFIX + p)
            self._buffers[_PART_PREFIX + p] = t.to(moved.device)
        if self.input_channels is not None:
            self.input_channels = self.input_channels.to(self.qweight_codes.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel(x if self.kernel.quantizes_input else self.quantize_input(x))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        product = dense_linear if self.fast_dense else F.linear
        return product(self.quantize_input(x), self.dense_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        qt = self.qweight
        kernel = "" if self.kernel is None else f", kernel={self.kernel.name}"
        if self.input_quant is not None:
            kernel += f", input={self.input_quant.describe()} {'static' if self.input_scale else 'dynamic'}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"codec={json.dumps(self.codec, sort_keys=True)}, bpw={qt.bits_per_weight:.4f}{kernel}"
        )


#: what ``--w8a8`` gives int8 layers that do not quantize their input already
W8A8_DYNAMIC = ActivationQuantizer("int8", "token")


def enable_fast_kernels(model: nn.Module, w8a8: bool = False) -> dict[str, int]:
    """Give every CPU QuantLinear whose codec a kernel holds that kernel (its layout built now,
    once); ``w8a8``: int8-weight layers that do not quantize their inputs yet quantize them too
    (dynamic, per token). Returns how many layers each kernel (and the reference path) took."""
    counts: dict[str, int] = {}
    # a quantized token embedding (no product of its own) and the tied head that shares its codes
    tables = {id(m.qweight_codes): m for m in model.modules() if isinstance(m, QuantLinear) and not m.kernel_capable}
    tied: dict[int, LinearKernel] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel_capable:
            if w8a8 and m.input_quant is None and m.qweight.get_codec().code_bits == 8:
                m.set_input_quant(W8A8_DYNAMIC)
            kernel = (build_kernel(m.qweight, m.input_quant, m.input_scale, m.input_channels)
                      if m.qweight_codes.device.type == "cpu" else None)
            if kernel is not None and id(m.qweight_codes) in tables:
                tied[id(tables[id(m.qweight_codes)])] = kernel
            m.use_kernel(kernel)
            name = "reference" if kernel is None else kernel.name
            counts[name] = counts.get(name, 0) + 1
    for table in tables.values():
        kernel = tied.get(id(table))
        if kernel is None and table.qweight_codes.device.type == "cpu":
            kernel = build_kernel(table.qweight)  # an untied table: int8 codes of its own to look rows up in
        if isinstance(kernel, Int8PackedKernel) and hasattr(table, "use_rows_of") and table.use_rows_of(kernel):
            name = "embedding rows (int8" + (", the tied head's codes)" if id(table) in tied else ")")
            counts[name] = counts.get(name, 0) + 1
    return counts


def keep_dequantized_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Every QuantLinear without a fast kernel keeps its dequantized weight in ``dtype`` (so
    repeated forwards do not unpack again); returns how many layers do."""
    n = 0
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.kernel is None:
            m._dense = m.dense_weight(dtype)
            n += 1
        elif isinstance(m, QuantLinear) and not m.kernel_capable:  # a table's rows decoded from a kernel's codes
            m.lookup_dtype = dtype  # type: ignore[attr-defined]
    return n


def release_dequantized_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m._dense = None


@contextlib.contextmanager
def cache_dequantized_weights(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Within the block, every QuantLinear without a fast kernel keeps its dequantized weight in
    ``dtype`` (a kernel-backed one keeps running its kernel: its numerics are what is measured)."""
    try:
        keep_dequantized_weights(model, dtype)
        yield
    finally:
        release_dequantized_weights(model)


def dense_tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """Every tensor lowbit stores densely, once each: ``(module name, module, attribute, tensor)``
    for parameters and persistent buffers, tied tensors under their first name, quantized parts
    of :class:`QuantLinear` excluded."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        items = list(module.named_parameters(recurse=False))
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        items += [(n, b) for n, b in module.named_buffers(recurse=False) if n not in non_persistent]
        for name, t in items:
            if isinstance(module, QuantLinear) and name.startswith(_PART_PREFIX):
                continue
            if id(t) in seen:
                continue
            seen.add(id(t))
            yield mod_name, module, name, t
