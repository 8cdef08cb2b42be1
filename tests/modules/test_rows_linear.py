"""lowbit's row operators (a decode step's dense and int8 products) against float64 references,
and the RowsLinear layer that uses them for a few rows only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.codecs import IntCodec
from lowbit.modules import native
from lowbit.modules.kernels import INT8_NATIVE_MAX_ROWS, Int8PackedKernel, build_kernel
from lowbit.modules.rows_linear import (DENSE_MAX_ROWS, RowsLinear, dense_linear, enable_row_products,
                                       fast_dense_linears, onednn_linear)

needs_rows = pytest.mark.skipif(native.native_ops() is None, reason="no C++ compiler: the operators could not be built")


def _bf16_rounded(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float64)


@needs_rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("cols", [576, 37, 1000])  # whole 32-column steps, a ragged end shorter than 16, and 16 + 8
def test_dense_rows_matches_a_float64_product(dtype: torch.dtype, rows: int, cols: int) -> None:
    g = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    w = torch.randn(70, cols, generator=g).to(dtype)
    bias = torch.randn(70, generator=g).to(dtype)
    ref = x.double() @ w.double().T + bias.double()
    y = torch.ops.lowbit.dense_rows(x, w, bias)
    assert y.dtype == dtype and y.shape == (rows, 70)
    # float32 sums in another order: a few float32 ulps of the sum of |products|; bf16: one rounding of the output
    scale = (x.double().abs() @ w.double().abs().T + bias.double().abs())
    if dtype == torch.float32:
        assert ((y.double() - ref).abs() <= 1e-6 * scale).all()
    else:
        assert ((y.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6 * scale).all()
    assert torch.equal(torch.ops.lowbit.dense_rows(x, w, None), torch.ops.lowbit.dense_rows(x, w, bias * 0))


@needs_rows
@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16])
def test_int8_rows_matches_a_float64_product(out: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1000, generator=g).to(out)
    w = torch.randint(-128, 128, (50, 1000), generator=g, dtype=torch.int8)
    scale = torch.rand(50, generator=g) * 0.01
    ref = (x.double() @ w.double().T) * scale.double()
    y = torch.ops.lowbit.int8_rows(x, w, scale)
    bound = 1e-6 * (x.double().abs() @ w.double().abs().T) * scale.double()
    if out == torch.bfloat16:
        bound = bound + 2 ** -8 * ref.abs()
    assert y.dtype == out and ((y.double() - ref).abs() <= bound).all()


@needs_rows
def test_the_operators_refuse_bad_input_clearly() -> None:
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="x's K columns"):
        torch.ops.lowbit.dense_rows(x, torch.randn(8, 63), None)
    with pytest.raises(RuntimeError, match="one value per row"):
        torch.ops.lowbit.int8_rows(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(7))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.lowbit.dense_rows(x.double(), torch.randn(8, 64).double(), None)


def _model() -> nn.Module:
    torch.manual_seed(0)
    emb = nn.Embedding(100, 64)
    head = nn.Linear(64, 100, bias=False)
    head.weight = emb.weight  # tied, as a small LM's head
    return nn.ModuleDict({"emb": emb, "proj": nn.Linear(64, 64), "head": head})


@needs_rows
def test_enable_row_products_keeps_parameters_and_ties() -> None:
    model = _model()
    if not native.row_products():
        assert enable_row_products(model) == 0
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert enable_row_products(model) == 2
    assert type(model["proj"]) is RowsLinear and type(model["head"]) is RowsLinear
    assert model["head"].weight is model["emb"].weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@needs_rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_linear_uses_torch_above_its_row_limit(dtype: torch.dtype) -> None:
    layer = nn.Linear(64, 48).to(dtype)
    plain = nn.Linear(64, 48).to(dtype)
    plain.load_state_dict(layer.state_dict())
    layer.__class__ = RowsLinear
    many = torch.randn(2, DENSE_MAX_ROWS[dtype] + 1, 64).to(dtype)
    y = layer(many)  # with gradients: torch's own product, bit for bit, and its backward
    assert torch.equal(y, plain(many))
    y.sum().backward()
    assert layer.weight.grad is not None
    one = torch.randn(1, 1, 64).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(layer(one), plain(one), rtol=tol, atol=tol)


@pytest.mark.skipif(not onednn_linear(), reason="oneDNN's linear is not in this torch build")
@pytest.mark.parametrize("shape", [(1, 600, 576), (37, 40), (2, 3, 100)])
def test_dense_linear_float32_without_gradients_matches_a_float64_product(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g)
    w, bias = torch.randn(70, shape[-1], generator=g), torch.randn(70, generator=g)
    ref = x.double() @ w.double().T + bias.double()
    scale = x.double().abs() @ w.double().abs().T + bias.double().abs()
    with torch.inference_mode():
        y = dense_linear(x, w, bias)
    assert y.dtype == torch.float32 and y.shape == (*shape[:-1], 70)
    assert ((y.double() - ref).abs() <= 1e-6 * scale).all()  # float32 sums: a few ulps of the sum of |products|


def test_fast_dense_linears_is_undone_after_the_block() -> None:
    from lowbit.modules import QuantLinear

    model = _model()
    model["q"] = QuantLinear(IntCodec(bits=4, group_size=32).quantize(torch.randn(16, 64)), None)
    x = torch.randn(3, 7, 64)
    with torch.inference_mode():
        before = model["q"](x)
        with fast_dense_linears(model):
            inside = {type(model["proj"]), type(model["head"])}
            fast = model["q"].fast_dense
            during = model["q"](x)
    assert type(model["proj"]) is nn.Linear and type(model["head"]) is nn.Linear and not model["q"].fast_dense
    here = native.row_products() or onednn_linear()
    assert inside == ({RowsLinear} if here else {nn.Linear}) and fast == here
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)  # oneDNN's float32 product: same up to rounding


@needs_rows
def test_rows_linear_compiles_without_a_graph_break() -> None:
    layer = nn.Linear(64, 48)
    layer.__class__ = RowsLinear
    x = torch.randn(1, 64)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_rows
def test_int8_kernel_rows_path_matches_the_torch_operator() -> None:
    if not native.row_products():
        pytest.skip("the row operators are not vectorized here: the kernel keeps torch's operator")
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    kernel = build_kernel(IntCodec(bits=8, granularity="channel", group_size=None).quantize(w))
    assert isinstance(kernel, Int8PackedKernel) and kernel.row_scale is not None
    x = torch.randn(INT8_NATIVE_MAX_ROWS, 256).to(torch.bfloat16)
    ours = kernel.packed_matmul(x)
    theirs = torch.ops.aten._weight_int8pack_mm(x, kernel.weight, kernel.scale)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-2, atol=2e-2)


@needs_rows
@pytest.mark.parametrize("cols", [576, 1536, 100, 37])  # whole 64-byte steps, and ragged ends
def test_int8_int8_rows_gives_the_exact_int32_sums(cols: int) -> None:
    g = torch.Generator().manual_seed(cols)
    x = torch.randint(-128, 128, (3, cols), generator=g, dtype=torch.int8)
    x[0] = -128  # the extremes: x + 128 spans the unsigned range
    w = torch.randint(-128, 128, (70, cols), generator=g, dtype=torch.int8)
    w[5] = 127
    sums = w.to(torch.int32).sum(1, dtype=torch.int32)
    exact = (x.to(torch.int64) @ w.to(torch.int64).T).to(torch.int32)
    assert torch.equal(torch.ops.lowbit.int8_int8_rows(x, w, sums), exact)


@needs_rows
def test_the_w8a8_kernel_takes_the_int8_row_product_at_one_row() -> None:
    if not native.row_products():
        pytest.skip("the row operators are not vectorized here")
    from lowbit.codecs.activations import ActivationQuantizer

    qt = IntCodec(bits=8, granularity="channel").quantize(torch.randn(64, 576, generator=torch.Generator().manual_seed(0)))
    kernel = build_kernel(qt, ActivationQuantizer("int8", "token"))
    assert kernel.fused and kernel.w_sums is not None
    x = torch.randn(1, 576).to(torch.bfloat16)
    xq = torch.round(x.float() / (x.float().abs().amax() / 127)).clamp(-128, 127).to(torch.int8)
    assert torch.equal(torch.ops.lowbit.int8_int8_rows(xq, kernel.weight, kernel.w_sums),
                       torch._int_mm(xq.repeat(17, 1), kernel.weight.t())[:1])
