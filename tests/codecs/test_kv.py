"""KV-cache codecs against float64 references and torch's float8 dtypes."""

from __future__ import annotations

import pytest
import torch

from lowbit.codecs.kv import KVQuantizer


def _kv(seed: int = 0, tokens: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, tokens, 64, generator=gen)
    x[..., 7] *= 15  # an outlier channel, as keys have
    return x


def _asym_reference(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Round trip of each group (last dim) over [min(min, 0), max(max, 0)] with a fp16 scale and
    integer zero, float64."""
    g = groups.double()
    qmax = (1 << bits) - 1
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / qmax).to(torch.float16).double().clamp(min=2.0**-24)
    z = torch.round(-lo / s).clamp(0, qmax)
    return (torch.round(g / s + z).clamp(0, qmax) - z) * s


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_groups_along_the_head(bits: int) -> None:
    x = _kv()
    got = KVQuantizer("int", bits, "token", 32).fake_quantize(x)
    want = _asym_reference(x.reshape(2, 3, 64, 2, 32), bits).reshape(x.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_groups_along_the_tokens(bits: int) -> None:
    x = _kv(1)
    x[..., 3] += 6  # channels of one sign over many tokens, as keys have after rotary
    x[..., 4] -= 6
    got = KVQuantizer("int", bits, "channel", 16).fake_quantize(x)
    grouped = x.reshape(2, 3, 4, 16, 64).transpose(-1, -2)  # each channel over 16 tokens
    want = _asym_reference(grouped, bits).transpose(-1, -2).reshape(x.shape)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # no value is clamped: each is within a step (the zero point is rounded too) of the group's
    # range, zero included
    reach = torch.maximum(grouped.amax(-1).clamp(min=0) - grouped.amin(-1).clamp(max=0), torch.tensor(0.0))
    step = (reach / ((1 << bits) - 1)).unsqueeze(-1)
    got_grouped = got.reshape(2, 3, 4, 16, 64).transpose(-1, -2)
    assert torch.all((got_grouped - grouped).abs() <= step * 1.01)
    # the outlier channel has its own scale: the others keep their precision
    err = (got - x).square().mean((0, 1, 2))
    per_token = (KVQuantizer("int", bits, "token", 32).fake_quantize(x) - x).square().mean((0, 1, 2))
    assert err[torch.arange(64) != 7].mean() < per_token[torch.arange(64) != 7].mean()


def test_symmetric_int8_is_llama_cpps_q8_0_rounding() -> None:
    x = _kv(2)
    got = KVQuantizer("int", 8, "token", 32, symmetric=True).fake_quantize(x)
    g = x.reshape(2, 3, 64, 2, 32).double()
    d = (g.abs().amax(-1, keepdim=True) / 127).to(torch.float16).double()  # q8_0: fp16 d = absmax / 127
    torch.testing.assert_close(got.double(), (torch.round(g / d) * d).reshape(x.shape), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("fmt", "dtype", "fmax"), [("fp8_e4m3", torch.float8_e4m3fn, 448.0),
                                                    ("fp8_e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_matches_torch_float8(fmt: str, dtype: torch.dtype, fmax: float) -> None:
    x = _kv(3)
    got = KVQuantizer(fmt, 8, "token", None, True).fake_quantize(x)  # type: ignore[arg-type]
    s = (x.abs().amax(-1, keepdim=True) / fmax)
    torch.testing.assert_close(got, (x / s).to(dtype).float() * s, rtol=0, atol=0)
    static = KVQuantizer(fmt, 8, "token", None, True, static_scale=0.05).fake_quantize(x)  # type: ignore[arg-type]
    torch.testing.assert_close(static, (x / 0.05).clamp(-fmax, fmax).to(dtype).float() * 0.05, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4])
def test_codes_and_zeros_are_packed_into_whole_bytes(bits: int) -> None:
    q = KVQuantizer("int", bits, "token", 32)
    x = _kv(4)
    stored = q.encode(x)
    assert stored["codes"].shape == (2, 3, 64, 64 * bits // 8) and stored["codes"].dtype == torch.uint8
    assert q.nbytes(stored) * 8 / x.numel() == pytest.approx(q.bits_per_value(64))


def test_bad_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="2, 4 or 8 bits"):
        KVQuantizer("int", 3)
    with pytest.raises(ValueError, match="group_size"):
        KVQuantizer("int", 4, "channel")
    with pytest.raises(ValueError, match="do not divide a head of 80"):
        KVQuantizer("int", 4, "token", 32).check_head_dim(80)


@pytest.mark.parametrize("quantizer", [
    KVQuantizer("int", 4, "channel", 32), KVQuantizer("int", 2, "token", 32), KVQuantizer("int", 8, "token", None, True),
    KVQuantizer("fp8_e4m3", 8, "token", 32, True), KVQuantizer("fp8_e5m2", 8, "token", None, True, 0.25),
], ids=lambda q: q.describe())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decoding_into_a_slice_rounds_the_float32_values_once(quantizer: KVQuantizer, dtype: torch.dtype) -> None:
    from lowbit.codecs.minifloat import fp8_decode

    x = _kv()
    stored = quantizer.encode(x)
    codes = quantizer._grouped(quantizer._unpack(stored["codes"])).double()
    if quantizer.format == "int":
        zero = 128.0 if quantizer.symmetric else \
            quantizer._unpack(stored["zero"], stored["scale"].shape[-1]).double().unsqueeze(-1)
        values = (codes - zero) * stored["scale"].double().unsqueeze(-1)  # exact in float32 too
    else:
        values = fp8_decode(codes, quantizer.format.removeprefix("fp8_")).double()
        values = values * (quantizer.static_scale or stored["scale"].double().unsqueeze(-1))
    reference = quantizer._ungrouped(values, x.shape).float().to(dtype)
    out = torch.full((2, 3, 70, 64), 7.0, dtype=dtype)
    quantizer.decode_into(stored, out[..., :64, :])  # the cache decodes its past ahead of its window
    assert torch.equal(out[..., :64, :], reference)
    assert torch.all(out[..., 64:, :] == 7.0)
