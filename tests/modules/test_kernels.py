"""Fast CPU kernels behind QuantLinear: same weights as the reference path (up to the bf16
rounding of scales the operators need), codes kept exactly, large batches through the
dequantized path, and a tiny model whose logits follow the reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms import GPTQ, LayerStats
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs import IntCodec, QuantizedTensor
from lowbit.codecs.registry import codec_from_dict
from lowbit.modules import QuantLinear, enable_fast_kernels
from lowbit.modules import kernels
from lowbit.modules.kernels import INT4_MAX_ROWS, INT8_MAX_ROWS, affine_form, build_kernel
from lowbit.modules.native import int4_rows
from lowbit.pipeline import quantize_model
from lowbit.recipes import resolve_recipe

# bf16 keeps 8 significant bits: a scale (and so every weight of its group) moves by at most
# 2**-9 of itself, zero points by 2**-9 of theirs
BF16_REL = 2.0**-8
# the int4 kernel this machine runs: lowbit's row operator where it is built with AVX-512 BF16, else torch's
INT4_KERNEL = "int4-rows-cpu" if int4_rows() else "int4-packed-cpu"

CODECS = {
    "int4 g128 sym (ragged 576)": dict(bits=4, group_size=128),
    "int4 g32 asym": dict(bits=4, group_size=32, symmetric=False),
    "int4 g64 float zero": dict(bits=4, group_size=64, symmetric=False, zero_point="float"),
    "int4 channel": dict(bits=4, granularity="channel"),
    "int8 channel sym": dict(bits=8, granularity="channel"),
    "int8 channel asym": dict(bits=8, granularity="channel", symmetric=False),
    "int8 tensor": dict(bits=8, granularity="tensor"),
}


def _weight(rows: int = 96, cols: int = 576, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _act_order_qt() -> QuantizedTensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 192, generator=g) @ torch.randn(192, 192, generator=g)
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 64})
    qt = GPTQ(act_order=True, static_groups=False).quantize(_weight(128, 192), codec, LayerStats(hessian=x.t() @ x))
    assert "g_idx" in qt.data
    return qt


def _cases() -> list[tuple[str, QuantizedTensor]]:
    ggml = [(name, codec_from_dict({"name": name}).quantize(_weight(cols=512))) for name in ("q4_0", "q4_1", "q4_k")]
    # 128 rows: whole 64-row blocks of the operator's layout, whose dequantized path is blocked too
    blocked = [("int4 g128, 64-row blocks", IntCodec(bits=4, group_size=128).quantize(_weight(rows=128))),
               ("int4 g32 asym, 64-row blocks", IntCodec(bits=4, group_size=32, symmetric=False).quantize(_weight(128)))]
    return ([(k, IntCodec(**v).quantize(_weight())) for k, v in CODECS.items()] + [("act-order", _act_order_qt())]
            + ggml + blocked)


@pytest.mark.parametrize("own_int4", [True, False], ids=["lowbit int4", "torch int4"])
@pytest.mark.parametrize("label,qt", _cases(), ids=[c[0] for c in _cases()])
def test_kernel_matches_reference(label: str, qt: QuantizedTensor, own_int4: bool,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if own_int4 and not int4_rows():
        pytest.skip("lowbit's int4 operator is not built with AVX-512 BF16 here")
    monkeypatch.setattr(kernels, "int4_rows", lambda: own_int4)  # each int4 kernel where both run
    kernel = build_kernel(qt)
    assert kernel is not None, label
    ref = qt.dequantize()
    dense = kernel.dense(torch.float32)
    # the operator's weight: the reference's up to bf16 scales (relative to the group's size)
    assert (dense - ref).abs().max() <= BF16_REL * ref.abs().max() * 1.01
    # the codes come back exactly, in the stored column order
    codec = qt.get_codec()
    inner = QuantizedTensor(qt.codec, qt.shape, {k: v for k, v in qt.data.items() if k != "g_idx"})
    assert torch.equal(kernel.codes(), codec.grouping.merge(codec.unpack(inner)[0], qt.shape))
    g = torch.Generator().manual_seed(1)
    for rows in (1, 3, max(INT4_MAX_ROWS, INT8_MAX_ROWS) + 5):  # the operator, and dequantize + matmul
        x = torch.randn(2, rows, qt.shape[1], generator=g)
        y = kernel(x)
        assert y.shape == (2, rows, qt.shape[0]) and y.dtype == torch.float32
        expected = F.linear(x.to(torch.bfloat16).double(), dense.double())
        assert ((y.double() - expected).norm() / expected.norm()) < 1e-2


@pytest.mark.parametrize("codec", [dict(name="int", bits=3, group_size=64), dict(name="int", bits=4, group_size=48),
                                   dict(name="int", bits=8, group_size=64), dict(name="nf4"), dict(name="mxfp4"),
                                   dict(name="fp4"), dict(name="q8_0"), dict(name="q5_k"), dict(name="q6_k")])
def test_codecs_without_a_kernel_stay_on_the_reference_path(codec: dict) -> None:
    # 4-bit code books and shared exponents are not affine in the code: no kernel computes them
    assert build_kernel(codec_from_dict(codec).quantize(_weight(cols=512))) is None


@pytest.mark.parametrize("codec", [dict(name="int", bits=4, group_size=64, symmetric=False), dict(name="q4_k")])
def test_quant_linear_with_kernel_releases_codes_and_keeps_its_state(codec: dict) -> None:
    qt = codec_from_dict(codec).quantize(_weight(cols=512))
    bias = torch.randn(96)
    model = nn.Sequential(QuantLinear(qt, bias))
    before = copy.deepcopy(model.state_dict())
    assert enable_fast_kernels(model) == {INT4_KERNEL: 1}
    layer = model[0]
    assert layer.qweight_codes.numel() == 0  # the kernel holds the only copy of the codes
    assert f"kernel={INT4_KERNEL}" in repr(layer)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(layer.qweight.data["codes"], qt.data["codes"])
    x = torch.randn(4, 512)
    y = layer(x)
    expected = F.linear(x.to(torch.bfloat16).float(), layer.kernel.dense(torch.float32), bias)
    assert torch.allclose(y, expected, rtol=1e-2, atol=1e-2)
    layer.use_kernel(None)  # back to the reference path, codes restored
    assert torch.equal(layer.qweight_codes, qt.data["codes"])
    assert torch.equal(layer(x), F.linear(x, qt.dequantize(), bias))


def test_tiny_model_logits_follow_the_reference(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    quantize_model(model, resolve_recipe("w4a16", group_size=32), progress=False)
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(ids).logits
        fast = copy.deepcopy(model)
        counts = enable_fast_kernels(fast)
        assert counts.get(INT4_KERNEL, 0) > 0 and "reference" not in counts
        got = fast(ids).logits
        # prefill (12 rows) and one decode step (1 row) go through both paths
        step = fast(ids[:, :1]).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (step - ref[:, :1]).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a8_is_int8_activations_times_the_stored_weight(symmetric: bool) -> None:
    qt = IntCodec(bits=8, granularity="channel", symmetric=symmetric).quantize(_weight())
    kernel = build_kernel(qt, ActivationQuantizer("int8", "token"))
    assert kernel is not None and kernel.name == "w8a8-int8-cpu"
    assert torch.equal(kernel.codes(), codec_from_dict(qt.codec).unpack(qt)[0].reshape(qt.shape))
    x = torch.randn(2, 5, 576, generator=torch.Generator().manual_seed(2)) * 3
    y = kernel(x)
    assert y.shape == (2, 5, 96) and y.dtype == torch.float32
    # float64: each token's row rounded to int8 steps of absmax / 127, times the stored weight; an
    # asymmetric zero point's part, shift * sum(x), takes the exact inputs
    xd = x.double().reshape(-1, 576)
    sx = xd.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(xd / sx).clamp(-127, 127) * sx
    _, scale, offset = affine_form(qt)
    shift = (offset[:, 0] + 128 * scale[:, 0]).double()
    expected = xq @ qt.dequantize().double().t() + (xd - xq).sum(-1, keepdim=True) * shift
    assert torch.allclose(y.reshape(-1, 96).double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    exact = xd @ qt.dequantize().double().t()  # and close to the unquantized activations' product
    assert ((y.reshape(-1, 96).double() - exact).norm() / exact.norm()) < 1e-2


def test_static_w8a8_uses_the_calibrated_scale_and_clips_beyond_it() -> None:
    qt = IntCodec(bits=8, granularity="channel").quantize(_weight())
    quantizer = ActivationQuantizer("int8", "tensor")
    x = torch.randn(7, 576, generator=torch.Generator().manual_seed(3))
    scale = quantizer.from_range(torch.tensor(-2.0), torch.tensor(2.0))  # the tails beyond 2 clip
    kernel = build_kernel(qt, quantizer, scale)
    assert kernel is not None and kernel.name == "w8a8-static-int8-cpu"
    xd = x.double()
    sx = 2.0 / 127
    # vLLM's static_scaled_int8_quant: round, then saturate to int8's own range
    expected = (torch.round(xd / sx).clamp(-128, 127) * sx) @ qt.dequantize().double().t()
    assert torch.allclose(kernel(x).double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    # a layer that runs the kernel computes what its reference path computes
    layer = QuantLinear(qt, None, quantizer, scale)
    ref = layer(x)
    layer.use_kernel(kernel)
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    # other input formats stay on the layer: it quantizes, the plain int8 kernel multiplies
    fp8 = build_kernel(qt, ActivationQuantizer("fp8_e4m3", "token"))
    assert fp8 is not None and fp8.name == "int8-cpu" and not fp8.quantizes_input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_w8a8_with_fixed_channels_multiplies_them_exactly(static: bool, rows: int, dtype: torch.dtype) -> None:
    qt = IntCodec(bits=8, granularity="channel").quantize(_weight())
    quantizer = ActivationQuantizer("int8", "tensor" if static else "token", outlier_channels=3)
    channels = torch.tensor([5, 100, 400])
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(4))
    x[:, channels] *= 50  # outliers a shared scale could not hold
    x = x.to(dtype)
    scale = quantizer.from_range(torch.tensor(-2.5), torch.tensor(2.5)) if static else None
    kernel = build_kernel(qt, quantizer, scale, channels)
    assert kernel is not None and kernel.name == ("w8a8-static-int8-channels-cpu" if static else "w8a8-int8-channels-cpu")
    # float64: the other features rounded to int8 (each token's scale from them alone when dynamic), the kept
    # ones exact, times the stored weight
    xd = x.double()
    rest = xd.index_fill(1, channels, 0)
    sx = torch.tensor(2.5 / 127, dtype=torch.float64) if static else rest.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(rest / sx).clamp(-128, 127) * sx
    xq[:, channels] = xd[:, channels]
    expected = xq @ qt.dequantize().double().t()
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7  # bf16 outputs keep 8 significant bits
    y = kernel(x)
    assert y.dtype == dtype
    assert torch.allclose(y.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    if dtype != torch.float32:
        return
    # the layer's reference path computes the same; without its channels a layer refuses the quantizer
    layer = QuantLinear(qt, None, quantizer, scale, channels)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="3 expected, got none"):
        QuantLinear(qt, None, quantizer, scale)
    # asymmetric int8 weights have no such kernel: the reference path runs
    asym = IntCodec(bits=8, granularity="channel", symmetric=False).quantize(_weight())
    assert build_kernel(asym, quantizer, scale, channels) is None
