"""RTN: plain round-to-nearest is the codec's quantize; the clip search is wired to stats."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lowbit.algorithms import RTN, Algorithm, LayerStats
from lowbit.codecs import IntCodec


def _w() -> torch.Tensor:
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(0))
    w[:, ::11] *= 6
    return w


def test_plain_rtn_is_codec_quantize() -> None:
    codec = IntCodec(bits=4, group_size=32)
    a = RTN().quantize(_w(), codec)
    b = codec.quantize(_w())
    assert a.codec == b.codec and all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    assert RTN().shrink_grid() is None
    assert not RTN().needs_calibration


def test_clip_search_grid_and_effect() -> None:
    rtn = RTN(clip_search=True, clip_min=0.6, clip_steps=5)
    assert torch.allclose(rtn.shrink_grid(), torch.tensor([0.6, 0.7, 0.8, 0.9, 1.0]))
    codec = IntCodec(bits=3, group_size=32)
    w = _w()
    plain = RTN().quantize(w, codec)
    searched = RTN(clip_search=True).quantize(w, codec)
    e_plain = (plain.dequantize() - w).square().sum()
    e_search = (searched.dequantize() - w).square().sum()
    assert e_search < e_plain


def test_clip_search_uses_stats_importance() -> None:
    codec = IntCodec(bits=3, group_size=32)
    w = _w()
    imp = torch.ones(96)
    imp[0] = 1e6  # column 0 holds outliers (every 11th column is scaled)
    rtn = RTN(clip_search=True)
    a = rtn.quantize(w, codec, LayerStats(importance=imp))
    b = rtn.quantize(w, codec, LayerStats(importance=None))
    ea = (a.dequantize() - w)[:, 0].square().sum()
    eb = (b.dequantize() - w)[:, 0].square().sum()
    assert ea < eb


@pytest.mark.parametrize("params", [dict(clip_min=0), dict(clip_min=1.5), dict(clip_steps=1), dict(foo=1)])
def test_validation(params: dict) -> None:
    with pytest.raises(ValidationError):
        RTN(**params)


def test_registered() -> None:
    assert Algorithm.registry["rtn"] is RTN
