"""MXFP4 / MXFP8 codecs against the OCP Microscaling v1.0 spec: E8M0 table, scale rule,
hand-computed blocks, element casts, layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from lowbit.codecs import MXFP4Codec, MXFP8Codec, QuantizedTensor, codec_from_dict
from lowbit.codecs.minifloat import e8m0_decode

from codec_references import ref_e2m1, student_t

FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0, 8), "e5m2": (torch.float8_e5m2, 57344.0, 15)}


def spec_shared_exp(block: list[float], emax_elem: int) -> int:
    """Spec 6.3 in float64: floor(log2(max |V|)) - emax_elem, clamped to E8M0's [-127, 127]
    (an all-zero block as microxcaling: log2 of the smallest normal float32)."""
    amax = max(abs(v) for v in block)
    e = math.frexp(amax)[1] - 1 if amax > 0 else -126
    return max(-127, min(127, e - emax_elem))


def test_e8m0_table() -> None:
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    dec = e8m0_decode(codes)
    assert all(dec[c].item() == 2.0 ** (c - 127) for c in range(255))
    assert math.isnan(dec[255].item())
    if hasattr(torch, "float8_e8m0fnu"):  # torch's own E8M0 dtype as a second reference
        ref = codes.view(torch.float8_e8m0fnu).to(torch.float32)
        assert torch.equal(dec[:255], ref[:255]) and math.isnan(ref[255].item())


def test_mxfp4_hand_computed_blocks() -> None:
    codec = MXFP4Codec()
    # amax 7.9: floor(log2 7.9) = 2, shared exp 2 - 2 = 0, X = 1 (code 127). Elements round to
    # nearest even on 0, .5, 1, 1.5, 2, 3, 4, 6; 7.9 saturates to 6.
    a = [0.0, 0.26, -0.75, 1.25, 1.75, -2.5, 3.5, 5.0, 5.9, 7.9] + [0.0] * 22
    a_dec = [0.0, 0.5, -1.0, 1.0, 2.0, -2.0, 4.0, 4.0, 6.0, 6.0] + [0.0] * 22
    # amax 0.1: floor(log2 0.1) = -4, shared exp -6 (code 121), X = 1/64; 0.1 * 64 = 6.4 -> 6,
    # decoded 6/64 = 0.09375; 0.03 * 64 = 1.92 -> 2 -> 0.03125; -0.004 * 64 = -0.256 -> -0.5.
    b = [0.1, 0.03, -0.004] + [0.0] * 29
    b_dec = [0.09375, 0.03125, -0.0078125] + [0.0] * 29
    # amax 4.0 exactly: floor(log2 4) = 2, X = 1 -> exact.
    c = [4.0, -4.0, 0.5] + [0.0] * 29
    w = torch.tensor([a, b, c])
    qt = codec.quantize(w)
    assert qt.data["scale"].tolist() == [[127], [121], [127]]
    assert qt.dequantize().tolist() == [a_dec, b_dec, c]


def test_mxfp8_hand_computed_blocks() -> None:
    codec = MXFP8Codec()
    # amax 1000: floor(log2 1000) = 9, shared exp 9 - 8 = 1 (code 128), X = 2: 1000/2 = 500
    # saturates to 448 -> 896; 3/2 = 1.5 exact -> 3; 0.01/2 = 0.005 is E4M3 subnormal
    # (step 2**-9): 2.56 steps -> 3 * 2**-9 -> decoded 0.01171875; 0.0009/2 = 0.23 steps -> 0;
    # -250/2 = -125 lies in [64, 128) where the spacing is 8: 128 is nearer than 120 -> -256.
    a = [1000.0, 3.0, 0.01, 0.0009, -250.0] + [0.0] * 27
    a_dec = [896.0, 3.0, 0.01171875, 0.0, -256.0] + [0.0] * 27
    w = torch.tensor([a])
    qt = codec.quantize(w)
    assert qt.data["scale"].tolist() == [[128]]
    assert qt.dequantize().tolist() == [a_dec]


@pytest.mark.parametrize("codec,emax", [(MXFP4Codec(), 2), (MXFP8Codec(), 8), (MXFP8Codec(element="e5m2"), 15)])
@settings(max_examples=200, deadline=None)
@given(
    block=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=32, max_size=32)
)
def test_scale_rule_matches_spec(codec, emax: int, block: list[float]) -> None:
    w = torch.tensor([block], dtype=torch.float32)
    code = codec.fit(codec.grouping.split(w))["scale"].item()
    assert code == spec_shared_exp(w[0].tolist(), emax) + 127


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_mxfp8_elements_are_torch_casts(element: str) -> None:
    dtype, fmax, _ = FP8[element]
    codec = MXFP8Codec(element=element)
    w = student_t((20, 96), 2, 1) * 0.05
    groups = codec.grouping.split(w)
    scale = codec.fit(groups)
    x = e8m0_decode(scale["scale"]).unsqueeze(-1)
    expected = torch.clamp(groups / x, -fmax, fmax).to(dtype)  # V / X is exact: X is a power of two
    codes = codec.encode(groups, scale)
    assert torch.equal(codes, expected.view(torch.uint8))
    assert torch.equal(codec.decode(codes, scale), expected.to(torch.float32) * x)


def test_mxfp4_elements_nearest_even() -> None:
    codec = MXFP4Codec()
    w = torch.cat([student_t((20, 64), 2, 2), torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 1e-3])
    groups = codec.grouping.split(w)
    scale = codec.fit(groups)
    x = e8m0_decode(scale["scale"]).unsqueeze(-1).to(torch.float64)
    ref = ref_e2m1(groups.to(torch.float64) / x) * x
    assert torch.equal(codec.quantize_dequantize(groups, scale).to(torch.float64), ref)


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec(), MXFP8Codec(element="e5m2")])
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_error_within_format_bound(codec, dist: str) -> None:
    shape = (16, 256)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) if dist == "normal" else student_t(shape, 2, 3)
    qt = codec.quantize(w)
    groups = codec.grouping.split(w).to(torch.float64)
    x = e8m0_decode(qt.data["scale"]).to(torch.float64).unsqueeze(-1)
    y = (groups / x).abs()
    if isinstance(codec, MXFP4Codec):
        fmax, mant, emin = 6.0, 1, 0
    else:
        _, fmax, _ = FP8[codec.element]
        mant, emin = {"e4m3": (3, -6), "e5m2": (2, -14)}[codec.element]
    # y < 2**(emax_elem + 1) by the scale rule; below max: half a spacing; above: saturation
    e = torch.floor(torch.log2(y.clamp(min=1e-300))).clamp(min=emin)
    bound = (torch.where(y <= fmax, 2.0 ** (e - mant) / 2, y - fmax)) * x
    err = (codec.grouping.split(qt.dequantize()).to(torch.float64) - groups).abs()
    assert (err <= bound).all()
    amax_ratio = y.amax(-1)
    emax = 2 if isinstance(codec, MXFP4Codec) else FP8[codec.element][2]
    assert ((amax_ratio >= 2.0**emax) & (amax_ratio < 2.0 ** (emax + 1))).all()


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec()])
def test_requantization_is_idempotent(codec) -> None:
    w = student_t((12, 128), 3, 4)
    qt = codec.quantize(w)
    again = codec.quantize(qt.dequantize())
    assert torch.equal(again.data["scale"], qt.data["scale"])
    assert torch.equal(again.dequantize(), qt.dequantize())


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec()])
def test_edge_blocks(codec) -> None:
    emax = 2 if isinstance(codec, MXFP4Codec) else 8
    w = torch.zeros(4, 32)
    w[1, 0] = 3e38  # floor(log2) = 127
    w[2, 0] = 2.0**-140  # float32 subnormal
    w[3, :] = 1.0
    qt = codec.quantize(w)
    assert qt.data["scale"].reshape(-1).tolist() == [0, 127 + 127 - emax, 0, 127 - emax]
    d = qt.dequantize()
    assert torch.isfinite(d).all()
    assert torch.equal(d[0], torch.zeros(32)) and torch.equal(d[3], torch.ones(32))


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec()])
def test_shrink_is_ignored(codec) -> None:
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    groups = codec.grouping.split(w)
    spec = codec.fit(groups)
    assert torch.equal(codec.fit(groups, 0.5)["scale"], spec["scale"])
    weights = codec.grouping.weights((6, 64), torch.rand(64))
    assert torch.equal(codec.fit_group_scales(groups, weights, torch.linspace(0.5, 1, 6))["scale"], spec["scale"])


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec()])
def test_short_last_block_is_its_own_block(codec) -> None:
    w = student_t((3, 45), 2, 6)  # 45 = 32 + 13
    qt = codec.quantize(w)
    assert qt.data["scale"].shape == (3, 2)
    full = codec.quantize(w[:, :32]).dequantize()
    tail = codec.quantize(torch.nn.functional.pad(w[:, 32:], (0, 19))).dequantize()[:, :13]
    assert torch.equal(qt.dequantize(), torch.cat([full, tail], dim=1))
    assert qt.nbytes == codec.nbytes((3, 45)) == (3 * 45 * codec.code_bits + 7) // 8 + 3 * 2


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec(), MXFP8Codec(element="e5m2")])
def test_serialization_roundtrip(codec) -> None:
    w = student_t((9, 77), 3, 7)
    qt = codec.quantize(w)
    blob = save(qt.state_dict("m"), metadata={"m": qt.header()})
    back = QuantizedTensor.from_state_dict(qt.header(), load(blob), "m")
    assert codec_from_dict(back.codec) == codec
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.data["scale"].dtype == torch.uint8


def test_mxfp4_nibble_order() -> None:
    w = torch.zeros(1, 32)
    w[0, :3] = torch.tensor([0.5, 1.0, -6.0])  # X = 1: codes 1, 2, 15
    qt = MXFP4Codec().quantize(w)
    assert qt.data["codes"][:2].tolist() == [0x21, 0x0F]


def test_bits_per_weight_and_describe() -> None:
    n = 576 * 1536
    assert MXFP4Codec().nbytes((576, 1536)) == n // 2 + 576 * 48
    assert MXFP8Codec().nbytes((576, 1536)) == n + 576 * 48
    qt = MXFP4Codec().quantize(torch.randn(576, 1536, generator=torch.Generator().manual_seed(8)))
    assert qt.bits_per_weight == 4.25
    assert MXFP8Codec().quantize(torch.randn(64, 64)).bits_per_weight == 8.25
    assert MXFP4Codec().describe() == "mxfp4 (e2m1, b32 e8m0)"
    assert MXFP8Codec().describe() == "mxfp8 (e4m3, b32 e8m0)"


@pytest.mark.parametrize("codec", [MXFP4Codec(), MXFP8Codec()])
@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 4, dtype=torch.int64), "floating-point"),
        (torch.ones(4), "2-D"),
    ],
)
def test_bad_weights(codec, weight: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        codec.quantize(weight)


def test_bad_params_and_nan_scale() -> None:
    with pytest.raises(ValueError):
        MXFP8Codec(element="e2m1")
    with pytest.raises(ValueError):
        MXFP4Codec(block_size=16)
    with pytest.raises(ValueError, match="NaN"):
        MXFP4Codec().encode(torch.ones(1, 1, 32), {"scale": torch.full((1, 1), 255, dtype=torch.uint8)})
