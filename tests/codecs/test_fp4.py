"""FP4 (E2M1) codec: the OCP value table, nearest-even rounding, fp16 scales, nibble layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from lowbit.codecs import FP4Codec, QuantizedTensor, codec_from_dict
from lowbit.codecs.minifloat import E2M1_VALUES, e2m1_decode, e2m1_encode

from codec_references import student_t, weighted_group_error

# OCP Microscaling Formats v1.0, FP4 E2M1: exponent bias 1, max normal 6, no Inf/NaN.
SPEC_E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_from_bits(code: int) -> float:
    """Decode a code from its bit fields: S EE M, bias 1, subnormal when E == 0."""
    s, e, m = code >> 3, (code >> 1) & 3, code & 1
    mag = (m / 2) * 2.0 ** (1 - 1) if e == 0 else (1 + m / 2) * 2.0 ** (e - 1)
    return -mag if s else mag


def ref_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Independent reference: nearest E2M1 value of the same sign, ties to even mantissa,
    saturating (float64 brute force)."""
    vals = torch.tensor(SPEC_E2M1, dtype=torch.float64)
    a = y.to(torch.float64).abs().clamp(max=6.0).reshape(-1, 1)
    dist = (a - vals.reshape(1, -1)).abs()
    best = dist.min(dim=1, keepdim=True).values
    score = (dist == best).to(torch.int64) * 2 + (torch.arange(8) % 2 == 0).to(torch.int64).reshape(1, -1)
    mag = score.argmax(dim=1)
    return (mag | (torch.signbit(y.reshape(-1)).to(torch.int64) << 3)).to(torch.uint8).reshape(y.shape)


def test_value_table_matches_spec() -> None:
    assert E2M1_VALUES.tolist() == SPEC_E2M1 + [-v for v in SPEC_E2M1]
    assert [e2m1_from_bits(c) for c in range(16)] == E2M1_VALUES.tolist()
    assert torch.signbit(E2M1_VALUES[8])  # code 8 is -0
    assert torch.equal(e2m1_decode(torch.arange(16, dtype=torch.uint8)), E2M1_VALUES)


def test_rounding_hand_examples() -> None:
    # ties go to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01, 6.0, 7.0, 1e30, -0.1, -2.9, -100.0])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, 6.0, 6.0, 6.0, -0.0, -3.0, -6.0])
    codes = e2m1_encode(y)
    assert torch.equal(e2m1_decode(codes), expect)
    assert codes[12].item() == 8  # a small negative value keeps its sign: -0


@settings(max_examples=500, deadline=None)
@given(x=st.floats(allow_nan=False, width=32))
def test_rounding_any_float(x: float) -> None:
    y = torch.tensor([x], dtype=torch.float32)
    assert torch.equal(e2m1_encode(y), ref_e2m1(y))


def test_rounding_dense_sweep() -> None:
    y = torch.linspace(-7, 7, 56001)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    y = torch.cat([y, mids, -mids, torch.nextafter(mids, torch.zeros(7)), torch.nextafter(mids, torch.full((7,), 9.0))])
    assert torch.equal(e2m1_encode(y), ref_e2m1(y))


def test_scale_rule_and_storage_dtype() -> None:
    w = torch.randn(6, 70, generator=torch.Generator().manual_seed(1))
    codec = FP4Codec()
    groups = codec.grouping.split(w)
    scale = codec.fit(groups)["scale"]
    assert scale.shape == (6, 3) and scale.dtype == torch.float16
    expect = (groups.abs().amax(-1).to(torch.float64) / 6).to(torch.float16)
    assert torch.equal(scale, expect)
    zero = codec.fit(torch.zeros(1, 1, 32))["scale"]
    assert zero.item() == 2.0**-24
    assert torch.equal(codec.quantize_dequantize(torch.zeros(1, 1, 32), {"scale": zero}), torch.zeros(1, 1, 32))


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32), ("group", 20)])
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_error_within_format_bound(granularity: str, group_size: int | None, dist: str) -> None:
    shape = (16, 150)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)) if dist == "normal" else student_t(shape, 2, 2)
    codec = FP4Codec(granularity=granularity, group_size=group_size)
    w_hat = codec.quantize(w).dequantize().to(torch.float64)
    g = codec.grouping
    groups = g.split(w)
    s = codec.fit(groups)["scale"].to(torch.float64).unsqueeze(-1).expand(groups.shape)
    s = g.merge(s, shape)
    y = (w.to(torch.float64) / s).abs()
    # half the spacing around |y| on the grid 0, .5, 1, 1.5, 2, 3, 4, 6; beyond 6 (scale
    # rounded down to fp16) the excess saturates
    half_step = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
    bound = (half_step + (y - 6).clamp(min=0)) * s
    assert ((w_hat - w.to(torch.float64)).abs() <= bound * (1 + 1e-9)).all()
    assert (y - 6).clamp(min=0).max() < 6 * 2.0**-10  # fp16 rounding of the scale only


def test_idempotent_on_grid_values() -> None:
    codec = FP4Codec(group_size=32)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (5, 3, 32), generator=g, dtype=torch.uint8)
    scale = {"scale": (torch.rand(5, 3, generator=g) + 0.1).to(torch.float16)}
    v = codec.decode(codes, scale)
    again = codec.encode(v, scale)
    assert torch.equal(codec.decode(again, scale), v)
    assert torch.equal(again, codes)  # -0 (code 8) stays -0


def test_nibble_order_low_first() -> None:
    codec = FP4Codec(granularity="tensor")
    w = torch.tensor([[0.5, 1.0, -6.0]])  # scale 1: codes 1, 2, 15
    qt = codec.quantize(w)
    assert qt.data["scale"].item() == 1.0
    assert qt.data["codes"].tolist() == [0x21, 0x0F]


def test_shrink_search_with_importance() -> None:
    codec = FP4Codec(group_size=16)
    w = student_t((8, 64), 3, 4)
    imp = torch.rand(64, generator=torch.Generator().manual_seed(4)) + 0.05
    grid = torch.linspace(0.6, 1.0, 9)
    groups = codec.grouping.split(w)
    weights = codec.grouping.weights(tuple(w.shape), imp)

    def err(scale: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_group_error(codec, groups, weights, scale)

    best = codec.fit_group_scales(groups, weights, grid)
    floor = torch.stack([err(codec.fit(groups, float(s))) for s in grid.tolist()]).min(0).values
    assert torch.all(err(best) <= floor * (1 + 1e-6))
    assert (best["scale"] != codec.fit(groups)["scale"]).any()  # the search found better scales
    assert torch.equal(codec.quantize(w, importance=imp, shrink_grid=grid).data["scale"], best["scale"])


@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 32), ("group", 24)])
def test_serialization_roundtrip(granularity: str, group_size: int | None) -> None:
    w = torch.randn(7, 101, generator=torch.Generator().manual_seed(5))  # odd count: half a byte
    codec = FP4Codec(granularity=granularity, group_size=group_size)
    qt = codec.quantize(w)
    blob = save(qt.state_dict("w"), metadata={"w": qt.header()})
    back = QuantizedTensor.from_state_dict(qt.header(), load(blob), "w")
    assert codec_from_dict(back.codec) == codec
    assert torch.equal(back.dequantize(), qt.dequantize())
    groups = codec.grouping.split(w)
    direct = codec.grouping.merge(codec.quantize_dequantize(groups, codec.fit(groups)), (7, 101))
    assert torch.equal(qt.dequantize(), direct)
    R, G, _ = codec.grouping.grid((7, 101))
    assert qt.nbytes == codec.nbytes((7, 101)) == (7 * 101 + 1) // 2 + 2 * R * G


def test_bits_per_weight() -> None:
    codec = FP4Codec()
    assert (codec.granularity, codec.group_size, codec.describe()) == ("group", 32, "fp4 e2m1 g32")
    nbytes = 576 * 1536 // 2 + 2 * 576 * 48
    assert codec.nbytes((576, 1536)) == nbytes
    qt = codec.quantize(torch.randn(576, 1536, generator=torch.Generator().manual_seed(6)))
    assert qt.nbytes == nbytes and qt.bits_per_weight == 4.5


@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[float("-inf"), 1.0]]), "NaN or Inf"),
        (torch.ones(2, 4, dtype=torch.int8), "floating-point"),
        (torch.ones(2, 2, 2), "2-D"),
    ],
)
def test_bad_weights(weight: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FP4Codec().quantize(weight)


def test_bad_params() -> None:
    with pytest.raises(ValueError, match="group_size"):
        FP4Codec(group_size=None)
    with pytest.raises(ValueError):
        FP4Codec(group_size=0)
