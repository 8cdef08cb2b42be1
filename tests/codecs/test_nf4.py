"""NF4 codec: the QLoRA code book, bitsandbytes' encoding and byte layout, double quantization,
and (where bitsandbytes installs) a bit-for-bit comparison with bitsandbytes itself."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from lowbit.codecs import NF4Codec, QuantizedTensor, codec_from_dict
from lowbit.codecs.nf4 import (
    DYNAMIC_MAP,
    NF4_DELTA,
    NF4_TABLE,
    derive_nf4_table,
    double_quantize,
    pack_nibbles_high_first,
    unpack_nibbles_high_first,
)

from codec_references import student_t

# QLoRA (Dettmers et al. 2023), appendix E: the NF4 data type's values.
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def nearest_index(values: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest table value, lowest on ties; distance), by float64 brute force."""
    d = (values.to(torch.float64).reshape(-1, 1) - table.to(torch.float64).reshape(1, -1)).abs()
    dist, idx = d.min(dim=1)  # min returns the first (lowest) index among equals
    return idx.reshape(values.shape), dist.reshape(values.shape)


def weight(dist: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    if dist == "normal":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return student_t(shape, 2, seed) * 0.02


# -- code books ---------------------------------------------------------------------------
def test_table_derivation_equals_published_table() -> None:
    published = torch.tensor(PUBLISHED_NF4, dtype=torch.float32)
    assert torch.equal(derive_nf4_table(), published)
    assert torch.equal(NF4_TABLE, published)


def test_table_is_normal_quantiles() -> None:
    # delta: QLoRA's 1 - (1/2)(1/30 + 1/32), to bitsandbytes' 7 digits
    assert abs(NF4_DELTA - (1 - 0.5 * (1 / 30 + 1 / 32))) < 5e-8
    nd = NormalDist()
    top = nd.inv_cdf(NF4_DELTA)
    pos = [nd.inv_cdf(NF4_DELTA - i * (NF4_DELTA - 0.5) / 8) / top for i in range(8)]
    neg = [-nd.inv_cdf(NF4_DELTA - i * (NF4_DELTA - 0.5) / 7) / top for i in range(7)]
    expect = sorted(pos + neg + [0.0])
    assert torch.allclose(NF4_TABLE.to(torch.float64), torch.tensor(expect, dtype=torch.float64), rtol=0, atol=1e-6)
    assert NF4_TABLE[7].item() == 0.0 and (NF4_TABLE.diff() > 0).all()


def test_dynamic_map_structure() -> None:
    # Dettmers' dynamic tree: for exponent i in 0..6, 2**i fractions (midpoints of
    # linspace(0.1, 1, 2**i + 1)) times 10**(i - 6), both signs, plus 0 and 1 (float64 here).
    vals = [0.0, 1.0]
    for i in range(7):
        b = [0.1 + 0.9 * k / 2**i for k in range(2**i + 1)]
        for k in range(2**i):
            m = (b[k] + b[k + 1]) / 2 * 10.0 ** (i - 6)
            vals += [m, -m]
    expect = torch.tensor(sorted(vals), dtype=torch.float64)
    assert DYNAMIC_MAP.shape == (256,) and (DYNAMIC_MAP.diff() > 0).all()
    assert torch.allclose(DYNAMIC_MAP.to(torch.float64), expect, rtol=1e-6, atol=0)
    assert DYNAMIC_MAP[127].item() == 0.0 and DYNAMIC_MAP[255].item() == 1.0


# -- encoding -----------------------------------------------------------------------------
def test_encode_is_nearest_code() -> None:
    codec = NF4Codec()
    g = torch.Generator().manual_seed(1)
    values = torch.randn(8, 4, 64, generator=g)
    absmax = values.abs().amax(-1) * (torch.rand(8, 4, generator=g) * 0.5 + 0.75)  # some clipping
    codes = codec.encode(values, {"absmax": absmax})
    n = (values / absmax.unsqueeze(-1)).clamp(-1, 1)
    ref, _ = nearest_index(n, NF4_TABLE)
    mids = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2).to(torch.float64)
    near_mid = ((n.to(torch.float64).unsqueeze(-1) - mids).abs() < 1e-6).any(-1)
    assert torch.equal(codes.long()[~near_mid], ref[~near_mid])
    # exact float32 midpoints take the lower code, as bitsandbytes' bucketize does
    mids32 = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2
    tie_codes = codec.encode(mids32.reshape(1, 1, 15), {"absmax": torch.ones(1, 1)})
    assert tie_codes.reshape(-1).tolist() == list(range(15))


@settings(max_examples=300, deadline=None)
@given(x=st.floats(min_value=-4, max_value=4, width=32), a=st.floats(min_value=2.0**-10, max_value=4, width=32))
def test_encode_any_value(x: float, a: float) -> None:
    codec = NF4Codec()
    code = codec.encode(torch.tensor([[[x]]]), {"absmax": torch.tensor([[a]])}).item()
    n = torch.tensor([x], dtype=torch.float32) * (1.0 / torch.tensor([a], dtype=torch.float32))
    n = n.clamp(-1, 1)
    idx, dist = nearest_index(n, NF4_TABLE)
    # equal to the exact nearest unless n is within float32 rounding of a midpoint
    other = (n.to(torch.float64) - NF4_TABLE[code].to(torch.float64)).abs()
    assert code == idx.item() or abs(other.item() - dist.item()) < 1e-7


def test_nibble_order_high_first() -> None:
    w = torch.zeros(1, 64)
    w[0, :3] = torch.tensor([-1.0, 1.0, 0.0])  # absmax 1: codes 0, 15, 7
    qt = NF4Codec().quantize(w)
    assert qt.data["codes"][:2].tolist() == [0x0F, 0x77]
    assert qt.data["absmax"].tolist() == [[1.0]]


@settings(max_examples=100, deadline=None)
@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=50))
def test_nibble_pack_roundtrip(codes: list[int]) -> None:
    c = torch.tensor(codes, dtype=torch.uint8)
    packed = pack_nibbles_high_first(c)
    assert packed.numel() == (len(codes) + 1) // 2
    assert packed[0].item() >> 4 == codes[0]
    assert torch.equal(unpack_nibbles_high_first(packed, len(codes)), c)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_error_is_distance_to_nearest_code(double_quant: bool, dist: str) -> None:
    w = weight(dist, (32, 256), 2)
    codec = NF4Codec(double_quant=double_quant)
    qt = codec.quantize(w)
    groups = codec.grouping.split(w)
    scale = codec.fit(groups)
    a = codec.absmax(scale).to(torch.float64).unsqueeze(-1)
    x = groups.to(torch.float64)
    # the best any NF4 code can do with this absmax, +-1 float32 ulp of the midpoint search
    _, dist_n = nearest_index((x / a).clamp(-1, 1), NF4_TABLE)
    clip = (x.abs() - a.abs()).clamp(min=0)
    bound = dist_n * a.abs() + clip + a.abs() * 2.0**-22
    err = (codec.grouping.split(qt.dequantize()).to(torch.float64) - x).abs()
    assert (err <= bound).all()
    assert (err <= 0.5 * (NF4_TABLE.diff().max().item()) * a.abs() + clip + 1e-12).all()


def test_idempotent_on_grid_values() -> None:
    codec = NF4Codec()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 3, 64), generator=g, dtype=torch.uint8)
    scale = {"absmax": torch.rand(4, 3, generator=g) + 0.01}
    v = codec.decode(codes, scale)
    again = codec.encode(v, scale)
    assert torch.equal(again, codes) and torch.equal(codec.decode(again, scale), v)


# -- double quantization ------------------------------------------------------------------
@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_double_quant_state(dist: str) -> None:
    w = weight(dist, (64, 640), 4)  # 640 blocks: runs of 256, 256, 128
    codec = NF4Codec(double_quant=True)
    groups = codec.grouping.split(w)
    raw = groups.abs().amax(-1)
    state = codec.fit(groups)
    flat = raw.reshape(-1)
    off = state["absmax_offset"].reshape(-1)
    assert (off == off[0]).all()
    assert abs(off[0].item() - flat.to(torch.float64).mean().item()) <= 1e-6 * flat.abs().max().item()
    v = flat - off[0]
    runs = [v[i : i + 256] for i in range(0, v.numel(), 256)]
    expect_scale = torch.cat([r.abs().max().expand(r.numel()) for r in runs])
    assert torch.equal(state["absmax_scale"].reshape(-1), expect_scale)
    idx, _ = nearest_index(v / expect_scale, DYNAMIC_MAP)
    assert torch.equal(state["absmax_q"].reshape(-1).long(), idx)
    # the reconstructed absmax is within half the map's largest gap of each run's scale
    a = codec.absmax(state).reshape(-1).to(torch.float64)
    half_gap = DYNAMIC_MAP.diff().max().item() / 2
    assert ((a - flat.to(torch.float64)).abs() <= half_gap * expect_scale.to(torch.float64) * (1 + 1e-6)).all()


def test_double_quant_packs_one_state_and_rejects_mixed_states() -> None:
    codec = NF4Codec(double_quant=True)
    w = student_t((40, 512), 3, 5)  # 320 blocks: 2 runs
    qt = codec.quantize(w)
    assert qt.data["absmax_q"].shape == (40, 8) and qt.data["absmax_q"].dtype == torch.uint8
    assert qt.data["absmax_scale"].shape == (2,) and qt.data["absmax_offset"].shape == (1,)
    groups = codec.grouping.split(w)
    halves = [codec.fit(groups[:20]), codec.fit(groups[20:])]
    mixed = {k: torch.cat([h[k] for h in halves]) for k in halves[0]}
    codes = codec.grouping.merge(codec.encode(groups, mixed), (40, 512))
    with pytest.raises(ValueError, match="double-quantization state"):
        codec.pack(codes, mixed, (40, 512))


def test_double_quant_shrink_search() -> None:
    codec = NF4Codec(double_quant=True)
    w = student_t((16, 256), 3, 6)
    imp = torch.rand(256, generator=torch.Generator().manual_seed(6)) + 0.1
    grid = torch.linspace(0.7, 1.0, 7)
    groups = codec.grouping.split(w)
    weights = codec.grouping.weights((16, 256), imp)
    raw = NF4Codec().fit_group_scales(groups, weights, grid)["absmax"]
    assert (raw != groups.abs().amax(-1)).any()  # the search shrank some blocks
    best = codec.fit_group_scales(groups, weights, grid)
    expect = double_quantize(raw)
    assert all(torch.equal(best[k], expect[k]) for k in expect)
    qt = codec.quantize(w, importance=imp, shrink_grid=grid)  # one consistent state: packs
    assert torch.equal(qt.dequantize(), codec.grouping.merge(codec.quantize_dequantize(groups, best), (16, 256)))


# -- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(12, 256), (5, 100), (3, 63)])
def test_serialization_roundtrip(double_quant: bool, shape: tuple[int, int]) -> None:
    codec = NF4Codec(double_quant=double_quant)
    w = student_t(shape, 3, 7)
    qt = codec.quantize(w)
    blob = save(qt.state_dict("q"), metadata={"q": qt.header()})
    back = QuantizedTensor.from_state_dict(qt.header(), load(blob), "q")
    assert codec_from_dict(back.codec) == codec
    assert torch.equal(back.dequantize(), qt.dequantize())
    groups = codec.grouping.split(w)
    direct = codec.grouping.merge(codec.quantize_dequantize(groups, codec.fit(groups)), shape)
    assert torch.equal(qt.dequantize(), direct)
    assert qt.nbytes == codec.nbytes(shape)


def test_bits_per_weight() -> None:
    n = 576 * 1536
    blocks = 576 * 24
    plain, dq = NF4Codec(), NF4Codec(double_quant=True)
    assert plain.nbytes((576, 1536)) == n // 2 + 4 * blocks
    assert dq.nbytes((576, 1536)) == n // 2 + blocks + 4 * 54 + 4 == 456412
    w = torch.randn(576, 1536, generator=torch.Generator().manual_seed(8))
    assert plain.quantize(w).bits_per_weight == 4.5
    bpw = dq.quantize(w).bits_per_weight
    assert bpw == 8 * 456412 / n and abs(bpw - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4
    assert plain.describe() == "nf4 b64" and dq.describe() == "nf4 b64 dq"


@pytest.mark.parametrize(
    "weight_,match",
    [
        (torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 4, dtype=torch.int16), "floating-point"),
        (torch.ones(4), "2-D"),
    ],
)
def test_bad_weights(weight_: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NF4Codec().quantize(weight_)


def test_bad_params() -> None:
    with pytest.raises(ValueError, match="block_size"):
        NF4Codec(block_size=48)
    with pytest.raises(ValueError, match="cannot hold 8 NF4 codes"):
        unpack_nibbles_high_first(torch.zeros(3, dtype=torch.uint8), 8)


# -- bitsandbytes, bit for bit ------------------------------------------------------------
def _bnb():
    return pytest.importorskip(
        "bitsandbytes.functional",
        reason="bitsandbytes is not installed (optional; `pip install bitsandbytes` for the bit-exact NF4 check)",
    )


def test_bnb_code_books() -> None:
    F = _bnb()
    assert torch.equal(F.get_4bit_type("nf4", device="cpu"), NF4_TABLE)
    assert torch.equal(F.create_dynamic_map(), DYNAMIC_MAP)


@pytest.mark.parametrize("dist", ["normal", "student_t"])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bnb_nf4_bit_exact(dist: str, block_size: int, dtype: torch.dtype) -> None:
    F = _bnb()
    w = weight(dist, (48, 512), 9).to(dtype)
    qt = NF4Codec(block_size=block_size).quantize(w)
    q, state = F.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    assert torch.equal(qt.data["codes"], q.reshape(-1))
    assert torch.equal(qt.data["absmax"].reshape(-1), state.absmax)
    if dtype == torch.float32:
        assert torch.equal(qt.dequantize(), F.dequantize_4bit(q, state))


@pytest.mark.parametrize("dist", ["normal", "student_t"])
def test_bnb_double_quant(dist: str) -> None:
    F = _bnb()
    w = weight(dist, (96, 768), 10)  # 1152 blocks: 4 full runs of 256 and one of 128
    codec = NF4Codec(double_quant=True)
    qt = codec.quantize(w)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    # the double-quantization statistics are bitsandbytes' own
    assert torch.equal(qt.data["absmax_offset"].reshape(()), state.offset.reshape(()))
    assert torch.equal(qt.data["absmax_scale"], state.state2.absmax)
    # 8-bit absmax codes: equal, except where bitsandbytes' CPU lookup table picks a
    # neighbour of the exact nearest value (then it is one index away and not closer)
    ours, theirs = qt.data["absmax_q"].reshape(-1).long(), state.absmax.long()
    run_scale = state.state2.absmax.repeat_interleave(256)[: ours.numel()]
    v = (codec.grouping.split(w).abs().amax(-1).reshape(-1) - state.offset) / run_scale
    diff = ours != theirs
    assert diff.float().mean() < 0.02 and ((ours - theirs).abs() <= 1).all()
    d_ours = (v.to(torch.float64) - DYNAMIC_MAP[ours].to(torch.float64)).abs()
    d_theirs = (v.to(torch.float64) - DYNAMIC_MAP[theirs].to(torch.float64)).abs()
    assert (d_ours <= d_theirs).all()
    # bitsandbytes decodes lowbit's stored tensors to exactly lowbit's values
    state2 = F.QuantState(absmax=qt.data["absmax_scale"], code=DYNAMIC_MAP.clone(), blocksize=256, dtype=torch.float32)
    ours_state = F.QuantState(
        absmax=qt.data["absmax_q"].reshape(-1),
        shape=w.shape,
        code=NF4_TABLE.clone(),
        blocksize=64,
        quant_type="nf4",
        dtype=torch.float32,
        offset=qt.data["absmax_offset"].reshape(()),
        state2=state2,
    )
    assert torch.equal(F.dequantize_4bit(qt.data["codes"].reshape(-1, 1), ours_state), qt.dequantize())
    # 4-bit codes: lowbit encodes with the absmax a reader reconstructs, bitsandbytes with the
    # raw one; under the reconstructed absmax lowbit's choice is never farther from the weight
    a = codec.absmax(codec.fit(codec.grouping.split(w))).reshape(-1).to(torch.float64)
    x = w.reshape(-1, 64).to(torch.float64)
    c_ours = unpack_nibbles_high_first(qt.data["codes"], w.numel()).view(-1, 64).long()
    c_theirs = unpack_nibbles_high_first(q.reshape(-1), w.numel()).view(-1, 64).long()
    e_ours = (NF4_TABLE[c_ours].to(torch.float64) * a.unsqueeze(-1) - x).abs()
    e_theirs = (NF4_TABLE[c_theirs].to(torch.float64) * a.unsqueeze(-1) - x).abs()
    assert (e_ours <= e_theirs + a.unsqueeze(-1).abs() * 2.0**-22).all()
    assert (c_ours != c_theirs).float().mean() < 0.05
