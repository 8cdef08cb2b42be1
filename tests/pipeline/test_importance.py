"""Importance matrices in the runner: a supplied one replaces the collected one bit for bit and
needs no calibration; a missing or misshapen entry is refused before anything is quantized; the
collected one is reported; collection on the float model agrees where the two must."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit import LowbitError
from lowbit.calibration.samples import CalibrationSet
from lowbit.io.imatrix import ImportanceMatrix, read_imatrix, write_imatrix
from lowbit.modules import QuantLinear
from lowbit.pipeline import collect_importance, quantize_model
from lowbit.recipes import Recipe

IMATRIX_RTN = {"codec": {"name": "q4_0"}, "algorithm": {"name": "rtn", "clip_search": True, "importance": True}}


def calib(n: int = 8, length: int = 32) -> CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    return CalibrationSet(tokens=torch.randint(2, 256, (n, length), generator=gen), source="random")


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_supplied_importance_equals_collected(tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    base = tiny_model("llama")
    recipe = Recipe.from_dict(IMATRIX_RTN)
    collected_model = copy.deepcopy(base)
    report = quantize_model(collected_model, recipe, calibration=calib(), progress=False)
    imatrix = report.importance
    assert imatrix is not None and len(imatrix.values) == 14
    assert set(imatrix.counts.values()) == {8 * 32}
    assert (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size) == (["random"], 8, 32)

    supplied_model = copy.deepcopy(base)
    supplied = quantize_model(supplied_model, recipe, importance=imatrix, progress=False)  # no calibration
    assert supplied.sequential is None and supplied.importance is None
    assert len(supplied.quantized) == 14
    ours, theirs = state(collected_model), state(supplied_model)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    # through a file: the sums it stores bring the means back within one float32 ulp
    back = read_imatrix(write_imatrix(tmp_path / "m.gguf", imatrix, base), base)
    via_file = copy.deepcopy(base)
    quantize_model(via_file, recipe, importance=back, progress=False)
    linears, files = [k for k in ours if ".qweight_" in k], state(via_file)
    differ = [k for k in linears if not torch.equal(ours[k], files[k])]
    # a one-ulp change could tip a group's scale search between two near-equal candidates (here
    # none does; two are allowed)
    assert len(linears) == 28 and len(differ) <= 2, differ


def test_quantizing_run_measures_inputs_after_earlier_linears_are_quantized(tiny_model) -> None:  # type: ignore[no-untyped-def]
    base = tiny_model("llama")
    cal = calib()
    floating = collect_importance(copy.deepcopy(base), cal)
    report = quantize_model(copy.deepcopy(base), Recipe.from_dict(IMATRIX_RTN), calibration=cal, progress=False)
    assert report.importance is not None and floating.values.keys() == report.importance.values.keys()
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(floating.values[q], report.importance.values[q])  # nothing quantized upstream yet
    later = "model.layers.1.mlp.down_proj"
    assert not torch.equal(floating.values[later], report.importance.values[later])


def test_missing_or_misshapen_entry_is_refused_before_quantizing(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    recipe = Recipe.from_dict(IMATRIX_RTN)
    imatrix = collect_importance(copy.deepcopy(model), calib(2))
    missing = ImportanceMatrix({k: v for k, v in imatrix.values.items() if not k.endswith("1.mlp.up_proj")})
    with pytest.raises(LowbitError, match="no entry for model.layers.1.mlp.up_proj"):
        quantize_model(model, recipe, importance=missing, progress=False)
    wrong = ImportanceMatrix({**imatrix.values, "model.layers.0.mlp.down_proj": torch.ones(64)})
    with pytest.raises(LowbitError, match=r"model.layers.0.mlp.down_proj has shape \(64,\), but the linear has 128"):
        quantize_model(model, recipe, importance=wrong, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # a linear the recipe leaves dense needs no entry
    ignoring = Recipe.from_dict({**IMATRIX_RTN, "ignore": ["*.up_proj"]})
    assert len(quantize_model(model, ignoring, importance=missing, progress=False).quantized) == 12


def test_recipe_without_importance_refuses_one(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    imatrix = collect_importance(copy.deepcopy(model), calib(2))
    with pytest.raises(LowbitError, match="does not use one"):
        quantize_model(model, Recipe.from_dict({"codec": {"name": "q4_0"}}), importance=imatrix, progress=False)


def test_mixed_recipe_uses_supplied_values_and_calibrates_the_rest(tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lowbit.algorithms import RTN

    seen: dict[int, torch.Tensor] = {}
    real = RTN.quantize

    def spy(self, weight, codec, stats=None):  # type: ignore[no-untyped-def]
        seen[len(seen)] = stats.importance
        return real(self, weight, codec, stats)

    monkeypatch.setattr(RTN, "quantize", spy)
    model = tiny_model("llama")
    supplied = ImportanceMatrix({k: torch.full_like(v, 3.0) for k, v in
                                 collect_importance(copy.deepcopy(model), calib(2)).values.items()})
    recipe = Recipe.from_dict({**IMATRIX_RTN, "rules": [{"match": "*.mlp.*", "algorithm": {"name": "gptq"}}]})
    with pytest.raises(LowbitError, match="needs calibration data"):  # GPTQ still does
        quantize_model(copy.deepcopy(model), recipe, importance=supplied, progress=False)
    report = quantize_model(model, recipe, importance=supplied, calibration=calib(), progress=False)
    assert len(report.quantized) == 14 and len(seen) == 8  # q, k, v, o of two blocks
    assert all(torch.equal(v, torch.full_like(v, 3.0)) for v in seen.values())
