"""NVFP4 codec against compressed-tensors' convention: tensor and block scales, E2M1 elements,
hand-computed blocks, layout with one FP32 tensor scale."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from lowbit.codecs import NVFP4Codec, QuantizedTensor, codec_from_dict

from codec_references import E2M1, ref_e2m1, student_t, weighted_group_error


def compressed_tensors_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global_scale, fp8 block scales, dequantized weight) written out step by step as
    compressed-tensors' generate_gparam / calculate_qparams / _quantize / _dequantize do."""
    amax = w.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    global_scale = torch.nan_to_num(448.0 * 6.0 / amax, nan=1.0, posinf=1.0, neginf=1.0)
    blocks = w.reshape(w.shape[0], -1, 16)
    scales = blocks.abs().amax(-1) / 6.0
    scales = global_scale * scales
    scales = torch.clamp(scales, -448.0, 448.0).to(torch.float8_e4m3fn).to(torch.float32)
    scales = torch.where(scales == 0, torch.tensor(0.125), scales).to(torch.float8_e4m3fn)
    eff = scales.to(torch.float32) / global_scale
    q = ref_e2m1(torch.clamp(blocks / eff.unsqueeze(-1), -6.0, 6.0)).to(torch.float32)
    return global_scale, scales, (q * eff.unsqueeze(-1)).reshape(w.shape)


def test_hand_computed_blocks() -> None:
    # tensor amax 2688 = 448 * 6: global scale 1.0.
    # block 0: amax 2688 -> block scale 448 (fp8 max), step 448: 2688 -> 6, 700/448 = 1.5625 -> 1.5 -> 672
    # block 1: amax 1.3 -> 1.3/6 = 0.21667 -> E4M3 (3 mantissa bits in [0.125, 0.25): step 1/64)
    #          0.21875; 1.3/0.21875 = 5.94 -> 6 -> 1.3125; 0.2/0.21875 = 0.914 -> 1 -> 0.21875
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 2688.0, 700.0
    w[0, 16], w[0, 17] = 1.3, 0.2
    codec = NVFP4Codec()
    qt = codec.quantize(w)
    assert qt.data["global_scale"].tolist() == [1.0]
    assert qt.data["block_scale"].to(torch.float32).tolist() == [[448.0, 0.21875]]
    d = qt.dequantize()
    assert d[0, :2].tolist() == [2688.0, 672.0]
    assert d[0, 16:18].tolist() == [1.3125, 0.21875]
    assert torch.equal(d[0, 2:16], torch.zeros(14)) and torch.equal(d[0, 18:], torch.zeros(14))


@pytest.mark.parametrize("dist", ["normal", "student_t", "mixed_magnitudes"])
def test_matches_compressed_tensors_convention(dist: str) -> None:
    shape = (32, 128)
    if dist == "normal":
        w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    elif dist == "student_t":
        w = student_t(shape, 2, 1) * 0.02
    else:  # rows spanning 1e-6..1: tiny blocks underflow the fp8 block scale to zero
        w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 0, 32).unsqueeze(1)
    codec = NVFP4Codec()
    qt = codec.quantize(w)
    g, b, deq = compressed_tensors_reference(w)
    assert torch.equal(qt.data["global_scale"], g.reshape(1))
    assert torch.equal(qt.data["block_scale"].view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(qt.dequantize(), deq)
    if dist == "mixed_magnitudes":
        assert (qt.data["block_scale"].to(torch.float32) == 0.125).any()


def test_block_scale_rounding_order() -> None:
    """compressed-tensors computes g * (amax / 6), not (g * amax) / 6: near an fp8 rounding
    boundary the two orders give different block scales; lowbit must give the former."""
    g = torch.tensor(2688.0 / 3.0)  # tensor amax 3.0
    amaxes = []
    for mid in [1.0625, 1.1875, 0.53125, 0.2109375, 3.25, 13.0]:  # fp8 rounding boundaries
        a = torch.tensor(mid * 6.0 / g.item(), dtype=torch.float32)
        for step in range(-20, 21):
            b = a
            for _ in range(abs(step)):
                b = torch.nextafter(b, torch.tensor(float("inf") if step > 0 else 0.0))
            amaxes.append(b.item())
    a = torch.tensor(amaxes)
    ct = (g * (a / 6.0)).to(torch.float8_e4m3fn)
    alt = ((g * a) / 6.0).to(torch.float8_e4m3fn)
    assert (ct.to(torch.float32) != alt.to(torch.float32)).any()  # the case is sharp
    w = torch.zeros(a.numel() + 1, 16)
    w[:-1, 0] = a
    w[-1, 0] = 3.0
    qt = NVFP4Codec().quantize(w)
    assert qt.data["global_scale"].item() == g.item()
    assert torch.equal(qt.data["block_scale"][:-1, 0].view(torch.uint8), ct.view(torch.uint8))


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_error_within_format_bound(dist: str) -> None:
    shape = (16, 256)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)) if dist == "normal" else student_t(shape, 2, 2)
    codec = NVFP4Codec()
    qt = codec.quantize(w)
    step = (qt.data["block_scale"].to(torch.float64) / qt.data["global_scale"].to(torch.float64)).unsqueeze(-1)
    x = codec.grouping.split(w).to(torch.float64)
    y = (x / step).abs()
    half = torch.where(y < 2, 0.25, torch.where(y < 4, 0.5, 1.0))
    d = codec.grouping.split(qt.dequantize()).to(torch.float64)
    # plus the float32 rounding of the decoded product itself
    bound = torch.where(y <= 6, half, y - 6) * step + d.abs() * 2.0**-23
    assert ((d - x).abs() <= bound).all()
    # saturation only from the fp8 rounding of the block scale (< 1/16 relative for E4M3)
    assert y.amax() < 6 * (1 + 2.0**-4)


def test_idempotent_on_grid_values() -> None:
    codec = NVFP4Codec()
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 3, 16), generator=gen, dtype=torch.uint8)
    scale = {
        "block_scale": (torch.rand(4, 3, generator=gen) * 400 + 1).to(torch.float8_e4m3fn),
        "global_scale": torch.full((4, 3), 37.5),
    }
    v = codec.decode(codes, scale)
    again = codec.encode(v, scale)
    assert torch.equal(again, codes)
    assert torch.equal(codec.decode(again, scale), v)


def test_shrink_search_keeps_one_tensor_scale() -> None:
    codec = NVFP4Codec()
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
    base = codec.fit(groups)
    assert (best["block_scale"].to(torch.float32) != base["block_scale"].to(torch.float32)).any()
    assert torch.equal(best["global_scale"], base["global_scale"])
    qt = codec.quantize(w, importance=imp, shrink_grid=grid)
    assert torch.equal(qt.data["block_scale"].view(torch.uint8), best["block_scale"].view(torch.uint8))
    assert torch.equal(qt.dequantize(), codec.grouping.merge(codec.quantize_dequantize(groups, best), (8, 64)))


def test_layout_and_serialization() -> None:
    w = student_t((6, 48), 3, 5)
    codec = NVFP4Codec()
    qt = codec.quantize(w)
    assert qt.data["block_scale"].dtype == torch.float8_e4m3fn and qt.data["block_scale"].shape == (6, 3)
    assert qt.data["global_scale"].dtype == torch.float32 and qt.data["global_scale"].shape == (1,)
    assert qt.nbytes == codec.nbytes((6, 48)) == 6 * 48 // 2 + 18 + 4
    blob = save(qt.state_dict("p"), metadata={"p": qt.header()})
    back = QuantizedTensor.from_state_dict(qt.header(), load(blob), "p")
    assert codec_from_dict(back.codec) == codec
    assert torch.equal(back.dequantize(), qt.dequantize())
    # a stored tensor whose tensor scale holds two values is rejected, naming the part
    bad = dict(load(blob))
    bad["p.global_scale"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"p.global_scale is float32 \[2\], but nvfp4 .* stores float32 \[1\]"):
        QuantizedTensor.from_state_dict(qt.header(), bad, "p")


def test_nibble_order_low_first() -> None:
    w = torch.zeros(1, 16)
    w[0, :3] = torch.tensor([0.5, 1.0, -6.0]) * 448  # global 1, block scale 448: codes 1, 2, 15
    qt = NVFP4Codec().quantize(w)
    assert qt.data["codes"][:2].tolist() == [0x21, 0x0F]


def test_pack_rejects_slices_fitted_separately() -> None:
    codec = NVFP4Codec()
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(6))
    w[:, 16:] *= 10
    groups = codec.grouping.split(w)
    s0, s1 = codec.fit(groups[:, :1]), codec.fit(groups[:, 1:])
    scale = {k: torch.cat([s0[k], s1[k]], dim=1) for k in s0}
    codes = codec.grouping.merge(codec.encode(groups, scale), (4, 32))
    with pytest.raises(ValueError, match="global_scale"):
        codec.pack(codes, scale, (4, 32))


def test_zero_tensor_and_short_block() -> None:
    codec = NVFP4Codec()
    qt = codec.quantize(torch.zeros(2, 16))
    assert qt.data["global_scale"].item() == 1.0
    assert torch.equal(qt.dequantize(), torch.zeros(2, 16))
    w = student_t((3, 21), 2, 7)  # 21 = 16 + 5
    qt = codec.quantize(w)
    assert qt.data["block_scale"].shape == (3, 2) and qt.nbytes == codec.nbytes((3, 21)) == (63 + 1) // 2 + 6 + 4
    padded = torch.nn.functional.pad(w, (0, 11))
    assert torch.equal(qt.dequantize(), codec.quantize(padded).dequantize()[:, :21])


def test_bits_per_weight_and_describe() -> None:
    codec = NVFP4Codec()
    nbytes = 576 * 1536 // 2 + 576 * 96 + 4
    assert codec.nbytes((576, 1536)) == nbytes
    qt = codec.quantize(torch.randn(576, 1536, generator=torch.Generator().manual_seed(8)))
    assert qt.nbytes == nbytes and qt.bits_per_weight == 8 * nbytes / (576 * 1536)
    assert codec.describe() == "nvfp4 (e2m1, b16 e4m3, fp32 tensor scale)"


@pytest.mark.parametrize(
    "weight,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 4, dtype=torch.uint8), "floating-point"),
        (torch.ones(4), "2-D"),
    ],
)
def test_bad_weights(weight: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NVFP4Codec().quantize(weight)
