"""lowbit's int4 row operator and its planes layout: codes round-trip exactly, and ``lowbit::int4_rows`` /
``lowbit::int4_dense`` compute ``x @ W.T`` / ``W`` as a float64 computation of the same weight does (the input
rounded to bf16, float32 sums), for every group size, ragged widths, zeros or none, 1..9 input rows."""

from __future__ import annotations

import pytest
import torch

from lowbit.modules.int4_rows_kernel import Int4RowsKernel, pack_planes, unpack_planes
from lowbit.modules.native import int4_rows

needs_operator = pytest.mark.skipif(not int4_rows(), reason="lowbit's int4 operator needs AVX-512 BF16 here")


@pytest.mark.parametrize("cols", [64, 100, 128, 200, 576, 1536])
def test_planes_round_trip(cols: int) -> None:
    codes = torch.randint(0, 16, (7, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.uint8)
    packed = pack_planes(codes)
    assert packed.shape == (7, -(-cols // 64) * 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_planes(packed, cols), codes)


def test_planes_layout_is_the_documented_one() -> None:
    # columns j, 32 + j, 64 + j, 96 + j in the nibbles of word j; a last half chunk of bytes (j, 32 + j)
    codes = torch.zeros(1, 192, dtype=torch.uint8)
    codes[0, 5], codes[0, 37], codes[0, 69], codes[0, 101] = 1, 2, 3, 4
    codes[0, 128 + 7], codes[0, 128 + 39] = 9, 10
    packed = pack_planes(codes)[0]
    assert int(packed[10]) | int(packed[11]) << 8 == 0x4321  # word 5, little-endian
    assert int(packed[64 + 7]) == 0xA9


def _case(rows: int, cols: int, group: int, with_zero: bool, seed: int) -> tuple[Int4RowsKernel, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
    groups = -(-cols // group)
    scale = torch.rand(rows, groups, generator=g) * 0.02 + 1e-3
    offset = -8 * scale + (torch.randn(rows, groups, generator=g) * 0.01 if with_zero else 0)
    kernel = Int4RowsKernel(codes, scale, offset, group, None)
    assert (kernel.zero is None) == (not with_zero)
    col_group = torch.arange(cols) // group
    weight = scale.double()[:, col_group] * codes.double() + offset.double()[:, col_group]
    return kernel, weight


@needs_operator
@pytest.mark.parametrize("with_zero", [False, True], ids=["symmetric", "zero"])
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows,cols", [(67, 576), (20, 200), (9, 1536), (4, 100)])
def test_operator_against_float64(rows: int, cols: int, group: int, with_zero: bool) -> None:
    kernel, weight = _case(rows, cols, group, with_zero, seed=rows * cols + group)
    assert torch.allclose(torch.ops.lowbit.int4_dense(kernel.packed, kernel.scale, kernel.zero, group, cols,
                                                      torch.float32).double(), weight, rtol=1e-6, atol=1e-7)
    g = torch.Generator().manual_seed(1)
    for m in range(1, 10):  # every input-row tiling, and the weight rows left over by four
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, cols, generator=g).to(dtype)
            y = kernel.packed_matmul(x)
            expected = x.to(torch.bfloat16).double() @ weight.T
            assert y.dtype == dtype and y.shape == (m, rows)
            # float32 sums: a few units of float32 rounding; bf16 output: its own rounding
            tol = 1e-5 if dtype == torch.float32 else 2.0**-8
            assert ((y.double() - expected).abs() <= tol * expected.abs().max()).all(), (m, dtype)


@needs_operator
def test_act_order_columns_and_the_dense_path() -> None:
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (48, 192), generator=g, dtype=torch.uint8)
    scale = torch.rand(48, 3, generator=g) * 0.02 + 1e-3
    order = torch.randperm(192, generator=g)
    kernel = Int4RowsKernel(codes[:, order], scale, -8 * scale, 64, order)
    assert torch.equal(kernel.codes(), codes)
    weight = torch.empty(48, 192, dtype=torch.float64)
    weight[:, order] = scale.double()[:, torch.arange(192) // 64] * (codes[:, order].double() - 8)
    assert torch.allclose(kernel.dense(torch.float64), weight, atol=1e-7)
    for m in (1, 5, 40):  # the row operator, and above its rows the dense bf16 product
        x = torch.randn(m, 192, generator=g)
        expected = x.to(torch.bfloat16).double() @ weight.T
        assert ((kernel(x).double() - expected).abs() <= 2e-2 * expected.abs().max()).all(), m


@needs_operator
def test_bad_arguments_are_refused() -> None:
    kernel, _ = _case(8, 128, 64, False, seed=0)
    with pytest.raises(RuntimeError, match="group_size must be"):
        torch.ops.lowbit.int4_rows(torch.randn(1, 128), kernel.packed, kernel.scale, None, 48)
    with pytest.raises(RuntimeError, match="codes must be contiguous"):
        torch.ops.lowbit.int4_rows(torch.randn(1, 256), kernel.packed, kernel.scale, None, 64)
    with pytest.raises(RuntimeError, match="scale must be contiguous"):
        torch.ops.lowbit.int4_rows(torch.randn(1, 128), kernel.packed, kernel.scale[:, :1].contiguous(), None, 64)
