"""FP8 codec: torch float8 casts, an independent nearest-even grid search, scale rule, layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from lowbit.codecs import FP8Codec, QuantizedTensor, codec_from_dict
from lowbit.codecs.minifloat import fp8_decode, fp8_encode

from codec_references import student_t, weighted_group_error

DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MAX = {"e4m3": 448.0, "e5m2": 57344.0}
MANT = {"e4m3": 3, "e5m2": 2}
EMIN = {"e4m3": -6, "e5m2": -14}  # exponent of the smallest normal


def grid(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float64 values) of every finite fp8 value, from the dtype's own bit patterns."""
    codes = torch.arange(256, dtype=torch.int64)
    vals = codes.to(torch.uint8).view(DTYPE[fmt]).to(torch.float64)
    keep = torch.isfinite(vals)
    return codes[keep], vals[keep]


def ref_encode(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """Independent reference: nearest finite fp8 value of the same sign, ties to the even
    mantissa, after saturating at +-max (float64 brute force over all codes)."""
    codes, vals = grid(fmt)
    y64 = y.to(torch.float64).clamp(-MAX[fmt], MAX[fmt]).reshape(-1, 1)
    same_sign = torch.signbit(vals).reshape(1, -1) == torch.signbit(y.reshape(-1, 1))
    dist = torch.where(same_sign, (y64 - vals.reshape(1, -1)).abs(), torch.tensor(float("inf"), dtype=torch.float64))
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    # among tied candidates prefer the even code (mantissa LSB 0)
    score = cand.to(torch.int64) * 2 + ((codes.reshape(1, -1) & 1) == 0).to(torch.int64)
    return codes[score.argmax(dim=1)].to(torch.uint8).reshape(y.shape)


def half_ulp_bound(y: torch.Tensor, fmt: str) -> torch.Tensor:
    """Largest |y - fp8(y)| for |y| <= max: half the spacing at |y| (float64)."""
    a = y.abs().to(torch.float64)
    e = torch.floor(torch.log2(a.clamp(min=1e-300))).clamp(min=EMIN[fmt])
    return 2.0 ** (e - MANT[fmt]) / 2


def special_values(fmt: str) -> torch.Tensor:
    """Grid values, exact midpoints between neighbours (ties), subnormals, beyond max."""
    _, vals = grid(fmt)
    pos = vals[vals > 0].sort().values
    mids = (pos[:-1] + pos[1:]) / 2
    extra = [0.0, -0.0, MAX[fmt] * 1.03, MAX[fmt] * 1.2, 1e30, 3e38, 2.0**-30, -(2.0**-30)]
    extra = torch.tensor(extra, dtype=torch.float64)
    y = torch.cat([pos, -pos, mids, -mids, extra, mids * (1 + 2.0**-20), mids * (1 - 2.0**-20)])
    return y.to(torch.float32)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_encode_matches_torch_cast_and_grid_search(fmt: str) -> None:
    y = torch.cat([special_values(fmt), torch.randn(5000, generator=torch.Generator().manual_seed(1)) * MAX[fmt] / 3])
    codes = fp8_encode(y, fmt)
    assert torch.equal(codes, ref_encode(y, fmt))
    inside = y.abs() <= MAX[fmt]
    assert torch.equal(codes[inside], y[inside].to(DTYPE[fmt]).view(torch.uint8))
    # saturating: never NaN or Inf, and beyond max gives exactly +-max
    dec = fp8_decode(codes, fmt)
    assert torch.isfinite(dec).all()
    assert torch.equal(dec[~inside], torch.sign(y[~inside]) * MAX[fmt])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@settings(max_examples=300, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_encode_any_float(fmt: str, x: float) -> None:
    y = torch.tensor([x], dtype=torch.float32)
    assert torch.equal(fp8_encode(y, fmt), ref_encode(y, fmt))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_codec_encode_is_torch_cast_of_scaled_values(fmt: str) -> None:
    g = torch.Generator().manual_seed(2)
    values = torch.randn(5, 3, 16, generator=g) * 10
    scale = {"scale": torch.rand(5, 3, generator=g) * 0.01 + 1e-4}
    codec = FP8Codec(fmt=fmt, granularity="group", group_size=16)
    scaled = values / scale["scale"].unsqueeze(-1)
    expected = torch.clamp(scaled, -MAX[fmt], MAX[fmt]).to(DTYPE[fmt])
    codes = codec.encode(values, scale)
    assert torch.equal(codes, expected.view(torch.uint8))
    assert torch.equal(codec.decode(codes, scale), expected.to(torch.float32) * scale["scale"].unsqueeze(-1))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize(
    "granularity,group_size,grid_shape",
    [("tensor", None, (1, 1)), ("channel", None, (12, 1)), ("group", 32, (12, 3))],
)
def test_scale_rule(fmt: str, granularity: str, group_size: int | None, grid_shape: tuple[int, int]) -> None:
    w = torch.randn(12, 80, generator=torch.Generator().manual_seed(3))
    codec = FP8Codec(fmt=fmt, granularity=granularity, group_size=group_size)
    groups = codec.grouping.split(w)
    scale = codec.fit(groups)["scale"]
    assert scale.shape == grid_shape and scale.dtype == torch.float32
    amax = groups.abs().amax(dim=-1).to(torch.float64)
    # absmax / max, correctly rounded to float32
    assert torch.allclose(scale.to(torch.float64), amax / MAX[fmt], rtol=2.0**-24, atol=0)
    # each group's largest value lands on the largest fp8 value
    idx = groups.abs().argmax(dim=-1, keepdim=True)
    peak = codec.quantize_dequantize(groups, {"scale": scale}).gather(-1, idx)
    assert torch.equal(peak.abs().squeeze(-1), MAX[fmt] * scale)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity,group_size", [("tensor", None), ("channel", None), ("group", 64), ("group", 48)])
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_error_within_format_bound(fmt: str, granularity: str, group_size: int | None, dist: str) -> None:
    shape = (24, 200)
    if dist == "normal":
        w = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 0.02
    else:
        w = student_t(shape, df=2, seed=4) * 0.02
    codec = FP8Codec(fmt=fmt, granularity=granularity, group_size=group_size)
    qt = codec.quantize(w)
    w_hat = qt.dequantize()
    g = codec.grouping
    s = g.merge(codec.fit(g.split(w))["scale"].unsqueeze(-1).expand(g.split(w).shape), tuple(shape)).to(torch.float64)
    y = w.to(torch.float64) / s
    over = (y.abs() - MAX[fmt]).clamp(min=0)  # only from rounding of the scale itself
    # plus the float32 rounding of the decoded product itself
    bound = (half_ulp_bound(y.clamp(-MAX[fmt], MAX[fmt]), fmt) + over) * s + w_hat.abs().to(torch.float64) * 2.0**-23
    err = (w_hat.to(torch.float64) - w.to(torch.float64)).abs()
    assert (err <= bound).all()
    assert over.max() <= MAX[fmt] * 2.0**-23


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_idempotent_on_grid_values(fmt: str) -> None:
    codec = FP8Codec(fmt=fmt, granularity="group", group_size=32)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (6, 4, 32), generator=g, dtype=torch.uint8)
    finite = torch.isfinite(fp8_decode(codes, fmt))
    codes = torch.where(finite, codes, torch.zeros_like(codes))
    scale = {"scale": torch.rand(6, 4, generator=g) + 0.5}
    grid_values = codec.decode(codes, scale)
    again = codec.encode(grid_values, scale)
    assert torch.equal(codec.decode(again, scale), grid_values)
    # codes are equal too, except -0/+0 which both decode to zero
    nz = grid_values != 0
    assert torch.equal(again[nz], codes[nz])


def test_shrink_search_with_importance_is_optimal_per_group() -> None:
    codec = FP8Codec(fmt="e4m3", granularity="group", group_size=16)
    gen = torch.Generator().manual_seed(6)
    w = student_t((8, 64), df=3, seed=6) * 1e-3  # small values: the subnormal range matters
    imp = torch.rand(64, generator=gen) + 0.1
    grid_ = torch.linspace(0.5, 1.0, 11)
    groups = codec.grouping.split(w)
    weights = codec.grouping.weights(tuple(w.shape), imp)
    best = codec.fit_group_scales(groups, weights, grid_)

    def err(scale: dict[str, torch.Tensor]) -> torch.Tensor:
        return weighted_group_error(codec, groups, weights, scale)

    errs = torch.stack([err(codec.fit(groups, float(s))) for s in grid_.tolist()])
    chosen = err(best)
    assert torch.all(chosen <= errs.min(dim=0).values * (1 + 1e-6) + 1e-30)
    assert torch.all(chosen <= err(codec.fit(groups, 1.0)) + 1e-30)
    # the weighted optimum differs from the unweighted one somewhere: importance is used
    unweighted = codec.fit_group_scales(groups, torch.ones_like(weights), grid_)
    assert not torch.equal(unweighted["scale"], best["scale"])
    # quantize() runs the same search
    qt = codec.quantize(w, importance=imp, shrink_grid=grid_)
    assert torch.equal(qt.data["scale"], best["scale"])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize(
    "granularity,group_size", [("tensor", None), ("channel", None), ("group", 128), ("group", 100)]
)
def test_serialization_roundtrip(fmt: str, granularity: str, group_size: int | None) -> None:
    w = torch.randn(10, 300, generator=torch.Generator().manual_seed(7))
    codec = FP8Codec(fmt=fmt, granularity=granularity, group_size=group_size)
    qt = codec.quantize(w)
    blob = save(qt.state_dict("layer.weight"), metadata={"layer.weight": qt.header()})
    back = QuantizedTensor.from_state_dict(qt.header(), load(blob), "layer.weight")
    assert codec_from_dict(back.codec) == codec
    assert torch.equal(back.dequantize(), qt.dequantize())
    g = codec.grouping
    groups = g.split(w)
    direct = g.merge(codec.quantize_dequantize(groups, codec.fit(groups)), tuple(w.shape))
    assert torch.equal(qt.dequantize(), direct)
    # codes are the fp8 bytes themselves, one per weight, row-major
    assert qt.data["codes"].dtype == torch.uint8 and qt.data["codes"].numel() == w.numel()
    R, G, _ = g.grid(tuple(w.shape))
    assert qt.nbytes == codec.nbytes(tuple(w.shape)) == w.numel() + 4 * R * G


@pytest.mark.parametrize(
    "kwargs,nbytes",
    [
        ({}, 576 * 1536 + 4 * 576),
        ({"fmt": "e5m2"}, 576 * 1536 + 4 * 576),
        ({"granularity": "tensor"}, 576 * 1536 + 4),
        ({"granularity": "group", "group_size": 128}, 576 * 1536 + 4 * 576 * 12),
    ],
)
def test_bits_per_weight(kwargs: dict, nbytes: int) -> None:
    codec = FP8Codec(**kwargs)
    assert codec.nbytes((576, 1536)) == nbytes
    qt = codec.quantize(torch.randn(576, 1536, generator=torch.Generator().manual_seed(8)))
    assert qt.nbytes == nbytes and qt.bits_per_weight == 8 * nbytes / (576 * 1536)


def test_defaults_and_describe() -> None:
    c = FP8Codec()
    assert (c.fmt, c.granularity, c.group_size) == ("e4m3", "channel", None)
    assert c.describe() == "fp8 e4m3 per-channel"
    assert FP8Codec(fmt="e5m2", granularity="group", group_size=128).describe() == "fp8 e5m2 g128"


@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 4, dtype=torch.int32), "floating-point"),
        (torch.ones(8), "2-D"),
    ],
)
def test_bad_weights(weight: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FP8Codec().quantize(weight)


def test_bad_params() -> None:
    with pytest.raises(ValueError, match="group_size"):
        FP8Codec(granularity="group")
    with pytest.raises(ValueError):
        FP8Codec(fmt="e3m4")
    with pytest.raises(ValueError, match="importance"):
        FP8Codec().quantize(torch.randn(4, 8), importance=torch.ones(7))
