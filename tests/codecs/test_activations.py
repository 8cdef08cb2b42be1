"""Activation codecs: int8 and FP8 on inputs, per token / tensor / group / channel, dynamic or from
a static range, against float64 references and torch's float8 dtypes."""

from __future__ import annotations

import pytest
import torch

from lowbit.codecs.activations import ActivationQuantizer


def _x(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 64, generator=gen) * torch.exp(torch.randn(64, generator=gen))
    x[0, 2, 5] = 40.0  # an outlier
    return x


def test_int8_per_token_is_absmax_over_127_rounded_half_even() -> None:
    x = _x()
    got = ActivationQuantizer("int8", "token").fake_quantize(x)
    flat = x.reshape(-1, 64).double()
    s = flat.abs().amax(1, keepdim=True) / 127
    want = (torch.round(flat / s).clamp(-127, 127) * s).reshape(x.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    assert got.dtype == x.dtype and got.shape == x.shape
    # every token's largest magnitude survives exactly (scale absmax / 127: nothing clips)
    assert torch.allclose(got.reshape(-1, 64).abs().amax(1), x.reshape(-1, 64).abs().amax(1), rtol=1e-6)


def test_int8_asymmetric_per_tensor_and_groups() -> None:
    x = _x(1) + 3.0  # mostly positive: an asymmetric range uses its codes better
    sym = ActivationQuantizer("int8", "tensor").fake_quantize(x)
    asym = ActivationQuantizer("int8", "tensor", symmetric=False).fake_quantize(x)
    assert (asym - x).square().mean() < (sym - x).square().mean()
    grouped = ActivationQuantizer("int8", "group", group_size=16).fake_quantize(x)
    flat = x.reshape(-1, 4, 16).double()
    s = flat.abs().amax(-1, keepdim=True) / 127
    torch.testing.assert_close(grouped.double(), (torch.round(flat / s) * s).reshape(x.shape), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("fmt", "dtype", "fmax"), [("fp8_e4m3", torch.float8_e4m3fn, 448.0),
                                                    ("fp8_e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_per_token_matches_torch_float8(fmt: str, dtype: torch.dtype, fmax: float) -> None:
    x = _x(2)
    got = ActivationQuantizer(fmt, "token").fake_quantize(x)  # type: ignore[arg-type]
    flat = x.reshape(-1, 64)
    s = flat.abs().amax(1, keepdim=True) / fmax
    want = ((flat / s).to(dtype).to(torch.float32) * s).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_static_scales_from_a_range_are_the_dynamic_fit_of_those_extremes() -> None:
    q = ActivationQuantizer("int8", "tensor")
    x = _x(3)
    static = q.from_range(x.min(), x.max())
    assert torch.equal(q.fake_quantize(x, static), q.fake_quantize(x))
    y = x * 2  # beyond the static range: saturated at int8's ends, as vLLM's static_scaled_int8_quant
    s = static["scale"].double()
    want = (torch.round(y.double() / s).clamp(-128, 127) * s).to(torch.float32)
    assert float(y.min() / s) < -129 and float(y.max() / s) > 128  # both ends saturate
    torch.testing.assert_close(q.fake_quantize(y, static), want, rtol=0, atol=0)
    per_channel = ActivationQuantizer("int8", "channel")
    flat = x.reshape(-1, 64)
    scale = per_channel.from_range(flat.amin(0), flat.amax(0))
    assert scale["scale"].shape == (64, 1)
    torch.testing.assert_close(per_channel.fake_quantize(x, scale).reshape(-1, 64).double(),
                               torch.round(flat.double() / (flat.abs().amax(0).double() / 127)) * (flat.abs().amax(0).double() / 127),
                               rtol=1e-6, atol=1e-7)


def test_bad_combinations_are_refused() -> None:
    with pytest.raises(ValueError, match="group_size"):
        ActivationQuantizer("int8", "group")
    with pytest.raises(ValueError, match="symmetric"):
        ActivationQuantizer("fp8_e4m3", "token", symmetric=False)
    with pytest.raises(ValueError, match="static"):
        ActivationQuantizer("int8", "channel").fit(_x())
    with pytest.raises(ValueError, match="per tensor or per channel"):
        ActivationQuantizer("int8", "token").from_range(torch.tensor(-1.0), torch.tensor(1.0))


def test_fixed_outlier_channels_keep_their_values_and_leave_the_scale_to_the_rest() -> None:
    x = _x()  # (..., 64)
    x[..., 9] *= 100
    x[..., 30] *= 60
    q = ActivationQuantizer("int8", "token", outlier_channels=2)
    abs_max = x.reshape(-1, 64).abs().amax(0)
    channels = q.choose_channels(abs_max)
    assert channels.tolist() == [9, 30]  # sorted, the two largest
    y = q.fake_quantize(x, None, channels)
    assert torch.equal(y[..., channels], x[..., channels])
    # float64: every token's scale is the absmax of its other features
    rest = x.double().index_fill(-1, channels, 0)
    s = rest.abs().amax(-1, keepdim=True) / 127
    want = (torch.round(rest / s) * s).index_copy(-1, channels, x.double().index_select(-1, channels))
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-7)
    # without channels (what an observer measures) every feature is quantized
    assert not torch.equal(q.fake_quantize(x)[..., channels], x[..., channels])
    assert "2 fixed channels in 16-bit" in q.describe()
    with pytest.raises(ValueError, match="leave none"):
        ActivationQuantizer("int8", "tensor", outlier_channels=64).choose_channels(abs_max)
    with pytest.raises(ValueError, match="symmetric int8"):
        ActivationQuantizer("fp8_e4m3", "token", outlier_channels=2)
    with pytest.raises(ValueError, match="not both"):
        ActivationQuantizer("int8", "token", outlier_threshold=6.0, outlier_channels=2)
