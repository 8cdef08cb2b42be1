"""Static KV-cache scales: calibrated from the keys (after rotary embedding) and values each layer
caches, kept through lowbit's format, and refused where they are missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache

from lowbit import LowbitError
from lowbit.calibration import CalibrationSet
from lowbit.codecs.minifloat import FP8_MAX
from lowbit.evaluation.kv_cache import resolve_kv_cache
from lowbit.io import load_quantized, save_quantized
from lowbit.models import LoadedModel
from lowbit.models.architectures import cache_argument, returned_cache
from lowbit.modules.kv_cache import kv_scales
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

IDS = torch.randint(2, 256, (3, 24), generator=torch.Generator().manual_seed(0))
RTN8 = {"name": "int", "bits": 8, "granularity": "channel", "group_size": None}


def _cached(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's cached keys and values over IDS, from transformers' own cache."""
    with torch.no_grad():
        out = model(IDS, use_cache=True, **{cache_argument(model): DynamicCache(config=model.config)})
    cache = returned_cache(out)
    return [(layer.keys, layer.values) for layer in cache.layers]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_minmax_scales_are_the_cached_absmax_over_fp8_max(tiny_model, family: str) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(family)
    recipe = Recipe.from_dict({"codec": RTN8, "kv_cache": {"keys": {"format": "fp8_e4m3", "static": True},
                                                           "values": {"format": "fp8_e5m2", "static": True}}})
    quantize_model(model, recipe, calibration=CalibrationSet(tokens=IDS, source="ids"), progress=False)
    scales = list(kv_scales(model).values())
    cached = _cached(model)  # the quantized model's keys and values, as generation caches them
    assert len(scales) == len(cached) == model.config.num_hidden_layers
    for (k_scale, v_scale), (k, v) in zip(scales, cached):
        assert k_scale == pytest.approx(float(k.abs().max()) / FP8_MAX["e4m3"], rel=1e-6)
        assert v_scale == pytest.approx(float(v.abs().max()) / FP8_MAX["e5m2"], rel=1e-6)
    assert len(set(scales)) == len(scales)  # each layer its own


def test_percentile_observer_clips_below_the_maximum(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    codec = {"format": "fp8_e4m3", "static": True, "observer": {"name": "percentile", "q": 90.0}}
    recipe = Recipe.from_dict({"codec": RTN8, "kv_cache": {"keys": codec, "values": codec}})
    quantize_model(model, recipe, calibration=CalibrationSet(tokens=IDS, source="ids"), progress=False)
    for (k_scale, _), (k, _) in zip(kv_scales(model).values(), _cached(model)):
        want = float(torch.quantile(k.abs().flatten().double(), 0.90)) / FP8_MAX["e4m3"]
        assert k_scale == pytest.approx(want, rel=0.02)  # the histogram's resolution
        assert k_scale < float(k.abs().max()) / FP8_MAX["e4m3"]


def test_scales_survive_lowbit_format(tiny_model, char_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    quantize_model(model, Recipe.from_dict({"codec": RTN8, "kv_cache": "fp8-static"}),
                   calibration=CalibrationSet(tokens=IDS, source="ids"), progress=False)
    out = save_quantized(LoadedModel(model, char_tokenizer, "tiny", None), tmp_path / "q")
    back = load_quantized(out, dtype=torch.bfloat16)
    assert kv_scales(back.model) == kv_scales(model)  # float32 on disk, whatever the dense dtype
    kv = resolve_kv_cache(back.model, None)
    assert kv is not None and kv.name == "fp8-static"


def test_static_scales_need_calibration(tiny_model) -> None:  # type: ignore[no-untyped-def]
    recipe = Recipe.from_dict({"codec": RTN8, "kv_cache": "fp8-static"})
    with pytest.raises(LowbitError, match=r"static KV cache scales \(minmax\) needs calibration data"):
        quantize_model(tiny_model("llama"), recipe, progress=False)
    with pytest.raises(LowbitError, match="fp8-static takes static scales calibrated for the model, and it has none"):
        resolve_kv_cache(tiny_model("llama"), "fp8-static")


@pytest.mark.parametrize("codec, message", [
    ({"format": "int", "static": True}, "static .calibrated. scales are for fp8"),
    ({"format": "fp8_e4m3", "observer": "minmax"}, "an observer measures static scales"),
])
def test_bad_static_codecs(codec: dict, message: str) -> None:
    from lowbit.recipes.kv_cache import kv_cache_spec

    with pytest.raises(LowbitError, match=message):
        kv_cache_spec({"keys": codec, "values": {}})
