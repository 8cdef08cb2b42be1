"""Grouping: the (R, G, g) view, its inverse, and the error weights of padding."""

from __future__ import annotations

import pytest
import torch

from lowbit.codecs import Grouping


@pytest.mark.parametrize(
    ("grouping", "shape", "grid"),
    [
        (Grouping("tensor"), (3, 10), (1, 1, 30)),
        (Grouping("channel"), (3, 10), (3, 1, 10)),
        (Grouping("group", 4), (3, 10), (3, 3, 4)),
        (Grouping("group", 5), (3, 10), (3, 2, 5)),
        (Grouping("group", 128), (2, 576), (2, 5, 128)),
        (Grouping("group", 1000), (2, 576), (2, 1, 1000)),
    ],
)
def test_split_merge(grouping: Grouping, shape: tuple[int, int], grid: tuple[int, int, int]) -> None:
    w = torch.arange(shape[0] * shape[1], dtype=torch.float32).reshape(shape)
    assert grouping.grid(shape) == grid
    groups = grouping.split(w)
    assert tuple(groups.shape) == grid
    assert torch.equal(grouping.merge(groups, shape), w)
    if grouping.granularity == "group":
        g = grouping.group_size
        # group j of row r holds columns j*g .. j*g+g-1
        for r in range(shape[0]):
            for j in range(grid[1]):
                real = w[r, j * g : (j + 1) * g]
                assert torch.equal(groups[r, j, : real.numel()], real)
                # padding repeats a value of the group, so it never widens min/max/absmax
                pad = groups[r, j, real.numel():]
                assert torch.all(pad == real[-1])


def test_weights_are_zero_on_padding() -> None:
    g = Grouping("group", 4)
    imp = torch.tensor([1.0, 2, 3, 4, 5, 6])
    wts = g.weights((3, 6), imp)
    assert wts.shape == (1, 2, 4)
    assert wts.reshape(-1).tolist() == [1, 2, 3, 4, 5, 6, 0, 0]
    assert Grouping("channel").weights((3, 6), imp).reshape(-1).tolist() == imp.tolist()
    assert Grouping("tensor").weights((2, 3), torch.tensor([1.0, 2, 3])).reshape(-1).tolist() == [1, 2, 3, 1, 2, 3]
    assert torch.equal(Grouping("group", 4).weights((3, 6), None).reshape(-1), torch.tensor([1.0] * 6 + [0, 0]))
    with pytest.raises(ValueError, match="importance"):
        g.weights((3, 6), torch.ones(5))


def test_split_codes_keep_dtype() -> None:
    codes = torch.randint(0, 16, (3, 10), dtype=torch.uint8)
    g = Grouping("group", 4)
    assert g.split(codes).dtype == torch.uint8
    assert torch.equal(g.merge(g.split(codes), (3, 10)), codes)


@pytest.mark.parametrize("bad", [0, -1, None])
def test_bad_group_size(bad) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        Grouping("group", bad)
    with pytest.raises(ValueError):
        Grouping("rows")  # type: ignore[arg-type]


def test_whole_groups_repeat_each_groups_scale_over_finer_whole_groups() -> None:
    finer, index = Grouping("group", 128).whole_groups(576)
    assert finer == 64
    assert index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    # the per-column scale is the same under both groupings
    scale = torch.arange(5.0).unsqueeze(0)
    per_column = scale.repeat_interleave(128, dim=1)[:, :576]
    assert torch.equal(scale[:, index].repeat_interleave(64, dim=1), per_column)
