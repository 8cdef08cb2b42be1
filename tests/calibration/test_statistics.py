"""Input statistics against float64 references."""

from __future__ import annotations

import pytest
import torch

from lowbit.calibration import statistics
from lowbit.calibration.statistics import InputStatistics, StatsRequest


@pytest.fixture(params=[statistics.HESSIAN_BLOCK, 5], ids=["one-block", "ragged-blocks"])
def hessian_block(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Runs a test with 16-column inputs accumulated as one block and as 4 block rows (5, 5, 5, 1)."""
    monkeypatch.setattr(statistics, "HESSIAN_BLOCK", request.param)
    return request.param


def test_hessian_and_means_match_float64(hessian_block: int) -> None:
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 7, 16, generator=gen) * torch.linspace(0.1, 3, 16) for _ in range(3)]
    st = InputStatistics(16, StatsRequest(hessian=True, input_rows=12, means=True), n_batches=3)
    for b in batches:
        st.add(b)
    x = torch.cat([b.reshape(-1, 16) for b in batches]).to(torch.float64)
    assert st.n_tokens == 42
    torch.testing.assert_close(st.hessian.to(torch.float64), x.t() @ x / 42, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.mean_abs.to(torch.float64), x.abs().mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st.mean_square.to(torch.float64), x.square().mean(0), rtol=1e-6, atol=1e-7)
    assert st.rows is not None and st.rows.shape == (12, 16)
    # sampled rows are real input rows
    assert all(any(torch.equal(r, y.to(torch.float32)) for y in x) for r in st.rows)


def test_scale_columns_gives_the_statistics_of_scaled_inputs(hessian_block: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=gen)
    s = torch.rand(8, generator=gen) + 0.5
    a = InputStatistics(8, StatsRequest(hessian=True, input_rows=50, means=True), 1)
    a.add(x)
    a.scale_columns(s)
    b = InputStatistics(8, StatsRequest(hessian=True, input_rows=50, means=True), 1)
    b.add(x / s)
    torch.testing.assert_close(a.hessian, b.hessian, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.mean_abs, b.mean_abs)
    torch.testing.assert_close(a.rows, b.rows)


def test_float64_hessian_on_request() -> None:
    st = InputStatistics(4, StatsRequest(hessian=True, hessian_dtype=torch.float64), 1)
    st.add(torch.randn(3, 4))
    assert st.hessian.dtype == torch.float64


def test_mean_square_comes_from_the_hessian_without_means() -> None:
    x = torch.randn(40, 6)
    st = InputStatistics(6, StatsRequest(hessian=True), 1)
    st.add(x)
    torch.testing.assert_close(st.mean_square, x.square().mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_blocked_hessian_in_other_product_dtypes(hessian_block: int, dtype: torch.dtype) -> None:
    x = torch.randn(64, 16, dtype=torch.float64)
    request = StatsRequest(hessian=True, hessian_dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    st = InputStatistics(16, request, 1, product_dtype=dtype)
    st.add(x)
    ref = x.t() @ x / 64
    assert torch.equal(st.hessian, st.hessian.t())
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(st.hessian.to(torch.float64), ref, rtol=tol, atol=tol)
