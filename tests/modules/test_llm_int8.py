"""LLM.int8() against bitsandbytes' own output, on random inputs with planted outlier columns."""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.codecs import IntCodec
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.modules import QuantLinear
from lowbit.modules import kernels, native
from lowbit.modules.kernels import build_kernel

needs_rows = pytest.mark.skipif(not native.row_products(), reason="no vectorized decode operators on this machine")

K, N = 256, 96


def _case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=gen) * 0.05).half().float()
    x = torch.randn(2, 7, K, generator=gen)
    x[..., [5, 77, 200]] *= 20  # planted outlier columns
    x[0, 3, 9] = 6.0  # exactly at the threshold: bitsandbytes counts |x| >= threshold
    return w, x.half().float()


def _bitsandbytes(w: torch.Tensor, x: torch.Tensor, threshold: float) -> torch.Tensor:
    bnb = pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
        lin.weight = bnb.nn.Int8Params(w.half(), requires_grad=False, has_fp16_weights=False)
        lin.eval()  # in training mode its CPU path multiplies dequantized weights, no int8 inputs
        with torch.no_grad():
            return lin(x.half()).float()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llm_int8_matches_bitsandbytes(seed: int) -> None:
    w, x = _case(seed)
    exact = x @ w.t()
    qt = IntCodec(bits=8, granularity="channel", restricted=True, scale_dtype="float32").quantize(w)
    quantizer = ActivationQuantizer("int8", "token", outlier_threshold=6.0)
    layer = QuantLinear(qt, None, quantizer)
    with torch.no_grad():
        ours = layer(x)
        kernel = build_kernel(qt, quantizer)
        assert kernel is not None and kernel.name == "llm-int8-cpu"
        layer.use_kernel(kernel)
        fast = layer(x)
    theirs = _bitsandbytes(w, x, 6.0)
    plain = _bitsandbytes(w, x, 0.0)  # bitsandbytes' W8A8 without the decomposition
    err = lambda y: float((y - exact).norm() / exact.norm())  # noqa: E731
    assert err(theirs) < 0.5 * err(plain)  # the planted outliers matter
    for y in (ours, fast):
        assert float((y - theirs).norm() / exact.norm()) < 0.1 * err(theirs)  # fp16 roundings apart
        assert err(y) == pytest.approx(err(theirs), rel=0.1)
    assert kernel.outlier_counts == [4, K]  # three planted columns and the one at the threshold exactly


def test_outlier_columns_keep_their_exact_values() -> None:
    _, x = _case(0)
    q = ActivationQuantizer("int8", "token", outlier_threshold=6.0)
    out = q.fake_quantize(x)
    flat, got = x.reshape(-1, K), out.reshape(-1, K)
    _, cols = q.outlier_columns(x)
    assert torch.equal(got[:, cols], flat[:, cols]) and int(cols.sum()) == 4
    assert not torch.equal(got[:, ~cols], flat[:, ~cols])
    with pytest.raises(ValueError, match="symmetric int8 per-token"):
        ActivationQuantizer("int8", "tensor", outlier_threshold=6.0)


@needs_rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_the_decode_operator_computes_the_eager_split(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                       rows: int) -> None:
    """``lowbit::llm_int8_rows`` (the kernel's path at one row) against the kernel's eager chain: the same outlier
    columns, the same int8 rows and scales (so the int32 part is exact), the 16-bit columns summed in another order."""
    w, x = _case(rows)
    x = x.reshape(-1, K)[:rows].contiguous()
    x[0, 9] = 6.0  # an element exactly at the threshold is an outlier (as bitsandbytes counts)
    x = x.to(dtype)
    qt = IntCodec(bits=8, granularity="channel", restricted=True, scale_dtype="float32").quantize(w)
    kernel = build_kernel(qt, ActivationQuantizer("int8", "token", outlier_threshold=6.0))
    assert kernel is not None and kernel.w_sums is not None and kernel.shift is None
    y, outliers = torch.ops.lowbit.llm_int8_rows(x, kernel.weight, kernel.scale, kernel.w_sums, 6.0)
    monkeypatch.setattr(kernels, "INT8_NATIVE_MAX_ROWS", 0)  # the eager chain, torch._int_mm
    eager = kernel.packed_matmul(x)
    assert int(outliers) == kernel.outlier_counts[0] == 4  # three planted columns and the one at the threshold
    assert y.dtype == torch.float32 and y.shape == (rows, N)
    # what the two may differ by: float32 rounding of the outlier columns' sum
    xf = x.double()
    cols = (xf.abs() >= 6.0).any(0)
    bound = 1e-6 * (xf[:, cols].abs() @ (kernel.dense(torch.float64)[:, cols]).abs().T) + 1e-6 * eager.abs().double()
    assert ((y.double() - eager.double()).abs() <= bound).all()
    # and the split itself is right: against a float64 product it errs by int8 rounding of the inner columns only
    ref = xf @ kernel.dense(torch.float64).T
    assert float((y.double() - ref).norm() / ref.norm()) < 0.02


@needs_rows
def test_the_kernel_takes_the_operator_at_one_row_and_counts_outliers(monkeypatch: pytest.MonkeyPatch) -> None:
    w, x = _case(3)
    qt = IntCodec(bits=8, granularity="channel", restricted=True, scale_dtype="float32").quantize(w)
    kernel = build_kernel(qt, ActivationQuantizer("int8", "token", outlier_threshold=6.0))
    calls = []
    real = torch.ops.lowbit.llm_int8_rows
    monkeypatch.setattr(torch.ops.lowbit, "llm_int8_rows", lambda *a: calls.append(1) or real(*a))
    one = x.reshape(-1, K)[:1].clone()
    one[0, 5] = 50.0
    kernel(one)
    assert calls == [1] and kernel.outlier_counts[0] >= 1 and kernel.outlier_counts[1] == K
    kernel(x.reshape(-1, K)[:4])  # four rows: the eager chain
    assert calls == [1] and kernel.outlier_counts[1] == 2 * K
