"""GPTQ: error reduction over RTN on every codec, the blocked algorithm against a float64
column-by-column reference, act-order with g_idx, dead columns and singular Hessians."""

from __future__ import annotations

import pytest
import torch

from lowbit.algorithms import GPTQ, RTN, LayerStats, SingularHessianError
from lowbit.algorithms.gptq import gptq_quantize, inverse_hessian_factor
from lowbit.codecs import Codec, QuantizedTensor
from lowbit.codecs.registry import codec_from_dict


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Inputs ``(n, cols)`` with strongly correlated columns and uneven scales, like activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    scales = torch.exp(torch.randn(cols, generator=gen))
    return (torch.randn(n, cols, generator=gen) @ mix + 0.1 * torch.randn(n, cols, generator=gen)) * scales


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ (w - q).t()).square().sum() / (x @ w.t()).square().sum())


CODECS = [
    {"name": "int", "bits": 4, "group_size": 64},
    {"name": "int", "bits": 3, "group_size": 64, "symmetric": False},
    {"name": "int", "bits": 2, "group_size": 32},
    {"name": "int", "bits": 4, "granularity": "channel"},
    {"name": "int", "bits": 4, "group_size": 128},  # ragged last group on 200 columns
    {"name": "nf4", "double_quant": True},
    {"name": "fp4", "group_size": 32},
    {"name": "mxfp4"},
    {"name": "nvfp4"},
    {"name": "fp8", "granularity": "channel"},
    {"name": "q4_0"},  # llama.cpp's block types: GPTQ on the GGUF grid
    {"name": "q4_1"},
    {"name": "q5_0"},
    {"name": "q8_0"},
    {"name": "q2_k"},  # k-quants: scales fitted per super-block up front
    {"name": "q4_k"},
    {"name": "q6_k"},
]


@pytest.mark.parametrize("spec", CODECS, ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(spec: dict, act_order: bool) -> None:
    cols = 200 if spec.get("group_size") == 128 else 256
    x = correlated_inputs(2048, cols)
    w = torch.randn(96, cols, generator=torch.Generator().manual_seed(1)) * 0.05
    codec = codec_from_dict(spec)
    h = x.t() @ x / x.shape[0]
    rtn = output_error(x, w, RTN().quantize(w, codec).dequantize())
    qt = GPTQ(act_order=act_order, block_size=64).quantize(w, codec, LayerStats(hessian=h))
    gptq = output_error(x, w, qt.dequantize())
    assert gptq < 0.8 * rtn, (gptq, rtn)


@pytest.mark.parametrize("bits", [3, 4])
def test_dynamic_groups_beat_rtn_too(bits: int) -> None:
    x = correlated_inputs(2048, 256)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    codec = codec_from_dict({"name": "int", "bits": bits, "group_size": 32})
    rtn = output_error(x, w, RTN().quantize(w, codec).dequantize())
    qt = GPTQ(act_order=False, static_groups=False).quantize(w, codec, LayerStats(hessian=x.t() @ x / 2048))
    assert output_error(x, w, qt.dequantize()) < 0.8 * rtn
    assert "g_idx" not in qt.data  # no act-order: groups stay contiguous


def naive_gptq_codes(w: torch.Tensor, h: torch.Tensor, codec: Codec, dampening: float) -> torch.Tensor:
    """Textbook GPTQ in float64: quantize column j with the scales fitted up front, then update
    every later column with the full inverse Hessian (no blocks, no lazy updates)."""
    rows, cols = w.shape
    grouping = codec.grouping
    scale = codec.fit_group_scales(grouping.split(w), grouping.weights((rows, cols), None))
    hd = h.to(torch.float64).clone()
    hd.diagonal().add_(dampening * hd.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    wd = w.to(torch.float64).clone()
    codes = torch.empty(rows, cols, dtype=torch.uint8)
    gs = grouping.group_size
    for j in range(cols):
        s = {k: v[:, j // gs : j // gs + 1] for k, v in scale.items()}
        c = codec.encode(wd[:, j].to(torch.float32).view(rows, 1, 1), s)
        q = codec.decode(c, s).view(rows).to(torch.float64)
        codes[:, j] = c.view(rows)
        e = (wd[:, j] - q) / u[j, j]
        wd[:, j:] -= e.unsqueeze(1) * u[j, j:].unsqueeze(0)
    return codes


def test_blocked_gptq_matches_the_column_by_column_reference() -> None:
    x = correlated_inputs(1024, 128, seed=3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    h = (x.t() @ x / x.shape[0]).to(torch.float64)
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 32})
    qt, damp = gptq_quantize(w, h, codec, block_size=32, dampening=0.01, static_groups=True)
    assert damp == 0.01
    codes, _ = codec.unpack(qt)
    got = codec.grouping.merge(codes, (64, 128))
    ref = naive_gptq_codes(w, h, codec, 0.01)
    # float32 blocked updates vs float64: only codes whose value sits on a rounding boundary may differ
    assert (got == ref).float().mean() > 0.995


def test_act_order_stores_g_idx_and_round_trips() -> None:
    x = correlated_inputs(1024, 192, seed=5)
    w = torch.randn(32, 192, generator=torch.Generator().manual_seed(6)) * 0.05
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 64})
    qt = GPTQ(act_order=True, static_groups=False).quantize(w, codec, LayerStats(hessian=x.t() @ x / 1024))
    g_idx = qt.data["g_idx"]
    assert g_idx.dtype == torch.int32 and g_idx.shape == (192,)
    assert torch.bincount(g_idx.long()).tolist() == [64, 64, 64]
    assert not torch.equal(g_idx.long(), torch.arange(192) // 64)  # columns really were regrouped
    dq = qt.dequantize()
    # Each column decodes with the scale of the group g_idx gives it: re-encoding is idempotent.
    codes = codec.grouping.merge(codec.unpack(QuantizedTensor(qt.codec, qt.shape, {k: v for k, v in qt.data.items()
                                                                                       if k != "g_idx"}))[0], qt.shape)
    scale = qt.data["scale"].to(torch.float32)
    expected = (codes.to(torch.float32) - 8) * scale[:, g_idx.long()]
    assert torch.equal(dq, expected)
    # and through the stored form
    header, tensors = qt.header(), qt.state_dict("w")
    back = QuantizedTensor.from_state_dict(header, tensors, "w")
    assert torch.equal(back.dequantize(), dq)
    assert back.nbytes == codec.nbytes(qt.shape) + 4 * 192


def test_g_idx_that_does_not_fill_groups_is_rejected() -> None:
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 4})
    qt = codec.quantize(torch.randn(2, 8))
    qt.data["g_idx"] = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="group_size columns"):
        qt.dequantize()


def test_dead_input_columns_are_zeroed_and_ignored() -> None:
    x = correlated_inputs(512, 64, seed=7)
    x[:, [3, 40]] = 0
    w = torch.randn(16, 64) * 0.05
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 32})
    qt = GPTQ().quantize(w, codec, LayerStats(hessian=x.t() @ x / 512))
    dq = qt.dequantize()
    assert torch.isfinite(dq).all()
    assert (dq[:, [3, 40]] == 0).all()


def test_dampening_is_raised_until_cholesky_succeeds() -> None:
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(32, 32, generator=gen)
    h = a @ a.t() / 32
    h -= 0.5 * h.diagonal().mean() * torch.eye(32)  # indefinite: needs damp > 0.5 * mean diag
    if torch.linalg.eigvalsh(h).min() >= 0:
        pytest.skip("random matrix happened to stay positive definite")
    _, damp = inverse_hessian_factor(h, 0.01, 4)
    assert damp == pytest.approx(1.0)


def test_hessian_that_stays_singular_raises() -> None:
    h = -torch.eye(16)
    with pytest.raises(SingularHessianError):
        inverse_hessian_factor(h, 0.01, 2)


def test_gptq_needs_a_hessian() -> None:
    codec = codec_from_dict({"name": "int", "bits": 4, "group_size": 32})
    with pytest.raises(ValueError, match="Hessian"):
        GPTQ().quantize(torch.randn(4, 64), codec, LayerStats())
    with pytest.raises(ValueError, match="shape"):
        GPTQ().quantize(torch.randn(4, 64), codec, LayerStats(hessian=torch.eye(32)))


@pytest.mark.parametrize("codec", [
    {"name": "int", "bits": 4, "group_size": 64},
    {"name": "int", "bits": 3, "group_size": 48, "symmetric": False},  # ragged last group
    {"name": "int", "bits": 8, "granularity": "channel", "symmetric": False},
])
@pytest.mark.parametrize("act_order", [False, True])
def test_int_column_fast_path_gives_the_codec_path_bit_for_bit(codec: dict, act_order: bool,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.algorithms.gptq as gptq

    x = correlated_inputs(512, 200, seed=3)
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(4))
    c = codec_from_dict(codec)
    h = x.t() @ x / 512
    taken = []
    real = gptq._int_columns
    monkeypatch.setattr(gptq, "_int_columns", lambda *a: taken.append(real(*a)) or taken[-1])
    fast, _ = gptq_quantize(w, h, c, block_size=64, act_order=act_order, static_groups=True)
    assert taken and taken[0] is not None  # the fast path ran
    monkeypatch.setattr(gptq, "_int_columns", lambda *a: None)
    slow, _ = gptq_quantize(w, h, c, block_size=64, act_order=act_order, static_groups=True)
    assert fast.data.keys() == slow.data.keys()
    assert all(torch.equal(fast.data[k], slow.data[k]) for k in fast.data)


@pytest.mark.parametrize("spec", CODECS + [{"name": "int", "bits": 4, "granularity": "tensor"}],
                         ids=lambda s: "-".join(str(v) for v in s.values()))
@pytest.mark.parametrize("act_order", [False, True])
def test_stacked_weights_get_the_codes_each_would_get_alone(spec: dict, act_order: bool) -> None:
    """q/k/v (or gate/up) share a Hessian and go through one column loop: each weight's codes and
    scale data are those of its own run, up to float summation order in the lazy updates."""
    cols = 200 if spec.get("group_size") == 128 else 256
    x = correlated_inputs(1024, cols)
    h = x.t() @ x / x.shape[0]
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(rows, cols, generator=gen) * 0.05 for rows in (64, 32, 32)]
    codec = codec_from_dict(spec)
    gptq = GPTQ(act_order=act_order, static_groups=not act_order, block_size=64)
    together = gptq.quantize_stacked(weights, codec, LayerStats(hessian=h))
    for w, qt in zip(weights, together):
        alone = gptq.quantize(w, codec, LayerStats(hessian=h))
        assert qt.shape == tuple(w.shape) and qt.data.keys() == alone.data.keys()
        same = (qt.dequantize() == alone.dequantize()).float().mean()
        assert same > 0.995, float(same)
        assert abs(output_error(x, w, qt.dequantize()) - output_error(x, w, alone.dequantize())) < 1e-3 * output_error(
            x, w, alone.dequantize()) + 1e-7


@pytest.mark.parametrize(("limit", "calls"), [(1 << 22, [3]), (100, [1, 1, 1])])
def test_cpu_stacks_only_small_weights(monkeypatch, limit: int, calls: list[int]) -> None:  # type: ignore[no-untyped-def]
    import lowbit.algorithms.gptq as gptq_module

    seen: list[int] = []
    real = gptq_module.gptq_quantize_stacked

    def spy(weights, *a, **k):  # type: ignore[no-untyped-def]
        seen.append(len(weights))
        return real(weights, *a, **k)

    monkeypatch.setattr(gptq_module, "gptq_quantize_stacked", spy)
    monkeypatch.setattr(gptq_module, "STACK_LIMIT", limit)
    x = correlated_inputs(256, 64)
    weights = [torch.randn(r, 64, generator=torch.Generator().manual_seed(r)) for r in (16, 8, 8)]
    GPTQ().quantize_stacked(weights, codec_from_dict({"name": "int", "bits": 4, "group_size": 32}),
                            LayerStats(hessian=x.t() @ x / 256))
    assert seen == calls


def test_stacking_refuses_a_codec_whose_rows_share_scale_data() -> None:
    from lowbit.algorithms.gptq import gptq_quantize_stacked

    h = torch.eye(64)
    with pytest.raises(ValueError, match="rows share scale data"):
        gptq_quantize_stacked([torch.randn(8, 64)] * 2, h, codec_from_dict({"name": "nvfp4"}))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("spec", CODECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_gptq_and_rtn_on_cuda_match_the_cpu(spec: dict) -> None:
    """Every codec quantizes on the GPU: RTN gives the CPU's codes (up to a rare rounding tie)
    and its scale data up to the last bit of a reduction summed in another order (NF4's
    double-quantization offset is a mean), GPTQ the CPU's output error, and the result stays on
    the device it was computed on."""
    cols = 200 if spec.get("group_size") == 128 else 256
    x = correlated_inputs(2048, cols)
    w = torch.randn(96, cols, generator=torch.Generator().manual_seed(1)) * 0.05
    codec = codec_from_dict(spec)
    h = x.t() @ x / x.shape[0]
    rtn_cpu = RTN().quantize(w, codec).dequantize()
    rtn_gpu = RTN().quantize(w.cuda(), codec)
    assert all(t.device.type == "cuda" for t in rtn_gpu.data.values())
    differs = (~torch.isclose(rtn_gpu.dequantize().cpu(), rtn_cpu, rtol=1e-5, atol=0)).float().mean()
    assert differs < 1e-3, float(differs)
    gptq_cpu = output_error(x, w, GPTQ(block_size=64).quantize(w, codec, LayerStats(hessian=h)).dequantize())
    qt = GPTQ(block_size=64).quantize(w.cuda(), codec, LayerStats(hessian=h.cuda()))
    assert all(t.device.type == "cuda" for t in qt.data.values())
    gptq_gpu = output_error(x, w, qt.dequantize().cpu())
    assert gptq_gpu < 1.05 * gptq_cpu + 1e-6, (gptq_gpu, gptq_cpu)
