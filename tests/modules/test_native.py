"""lowbit's fused CPU operators: bit for bit what the eager operators compute, and an eager
fallback (same results) where they cannot be built."""

from __future__ import annotations

import pytest
import torch

from lowbit.codecs import IntCodec
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.modules import native
from lowbit.modules.kernels import build_kernel

ops = native.native_ops()
needs_ops = pytest.mark.skipif(ops is None, reason="no C++ compiler: the fused operators could not be built")


def _inputs(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    # columns over five decades (outlier channels) and a row of zeros (the tiny clamp)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 2, cols)
    if rows > 1:
        x[rows // 2] = 0
    return x.to(dtype)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_quantize_rows_equals_the_eager_chain(dtype: torch.dtype, rows: int) -> None:
    x = _inputs(rows, 1536, dtype)
    xf = x.to(torch.float32)
    sx = xf.abs().amax(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny) / 127
    q, s = ops.quantize_rows(x, 0.0)
    assert torch.equal(s, sx)
    assert torch.equal(q, torch.round(xf / sx).clamp_(-128, 127).to(torch.int8))
    # a static scale: one for every row, values beyond it saturate at int8's ends
    q, s = ops.quantize_rows(x, 0.37)
    assert s.shape == (1, 1) and float(s) == pytest.approx(0.37)
    assert torch.equal(q, torch.round(xf / s).clamp_(-128, 127).to(torch.int8))
    assert q.min() == -128 and q.max() == 127


@needs_ops
def test_quantize_rows_rounds_halves_to_even() -> None:
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]])  # absmax 127: scale 1
    q, _ = ops.quantize_rows(x, 0.0)
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


@needs_ops
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_dequantize_rows_equals_the_eager_chain(out_dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(2**20), 2**20, (rows, 96), generator=g, dtype=torch.int32)
    col = torch.rand(96, generator=g)
    for row in (torch.rand(rows, 1, generator=g) * 1e-2, torch.tensor([[3e-3]])):
        expected = acc.to(torch.float32).mul_(row).mul_(col).to(out_dtype)
        assert torch.equal(ops.dequantize_rows(acc, row, col, out_dtype), expected)


@needs_ops
@pytest.mark.parametrize("granularity", ["token", "tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_w8a8_kernels_give_the_eager_results_bit_for_bit(granularity: str, dtype: torch.dtype,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    qt = IntCodec(bits=8, granularity="channel").quantize(torch.randn(96, 576, generator=torch.Generator().manual_seed(0)))
    quantizer = ActivationQuantizer("int8", granularity)
    scale = quantizer.from_range(torch.tensor(-2.0), torch.tensor(2.0)) if granularity == "tensor" else None
    kernel = build_kernel(qt, quantizer, scale)
    assert kernel is not None and kernel.fused
    calls = []

    class Counting:  # the operators, counting the calls that reach them
        def __getattr__(self, name: str) -> object:
            calls.append(name)
            return getattr(ops, name)

    for rows in (1, 7, 200):
        x = _inputs(rows, 576, dtype, seed=rows).reshape(1, rows, 576)
        monkeypatch.setattr(native, "_loaded", [Counting()])
        fused = kernel(x)
        assert calls[-2:] == ["quantize_rows", "dequantize_rows"]
        monkeypatch.setattr(native, "_loaded", [None])  # as where the operators cannot be built
        try:
            eager = kernel(x)
        finally:
            monkeypatch.setattr(native, "_loaded", [ops])
        assert fused.dtype == eager.dtype == dtype and torch.equal(fused, eager)


def test_a_failed_build_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def broken(**kwargs: object) -> None:
        raise RuntimeError("Error building extension 'lowbit_native': g++ not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : none (a machine not seen before)")
    monkeypatch.setattr(native, "_loaded", [])
    with pytest.warns(RuntimeWarning, match="could not be built .*g\\+\\+ not found.*same results"):
        assert native.native_ops() is None
    assert native.native_ops() is None  # decided once per process


def test_lowbit_native_0_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", [])
    assert native.native_ops() is None


@needs_ops
def test_a_compiled_w8a8_kernel_traces_the_eager_chain() -> None:
    # the fused operators are opaque to torch.compile: under it the kernel runs the eager chain, one graph
    qt = IntCodec(bits=8, granularity="channel").quantize(torch.randn(96, 576, generator=torch.Generator().manual_seed(0)))
    kernel = build_kernel(qt, ActivationQuantizer("int8", "token"))
    x = _inputs(4, 576, torch.bfloat16).reshape(1, 4, 576)
    compiled = torch.compile(lambda t: kernel(t), fullgraph=True)
    torch.testing.assert_close(compiled(x), kernel(x), rtol=1e-2, atol=1e-2)


def test_every_operator_source_ships_with_the_package() -> None:
    # the operators compile on first use from the installed sources: a source missing from the package data
    # builds here (an editable install reads the tree) and fails in an installed wheel
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    shipped = set(pyproject["tool"]["setuptools"]["package-data"]["lowbit.modules"])
    assert {p.name for p in native._SOURCES} <= shipped
