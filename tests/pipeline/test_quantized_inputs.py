"""Recipes that quantize activations, through the pipeline on tiny models: dynamic and static input
scales, SmoothQuant before them, and a lowbit folder that keeps them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lowbit import LowbitError
from lowbit.calibration import CalibrationSet
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

W8 = {"name": "int", "bits": 8, "granularity": "channel"}


def calib(n: int = 8, length: int = 32) -> CalibrationSet:
    return CalibrationSet(tokens=torch.randint(2, 256, (n, length), generator=torch.Generator().manual_seed(0)),
                          source="random")


def with_outliers(model: torch.nn.Module) -> torch.nn.Module:
    """Plant outlier channels in the norms' outputs, as real LLM activations have."""
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[[3, 20, 41]] *= 40
    return model


def kld(model: torch.nn.Module, ref: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(model(tokens).logits.double(), -1)
        lr = torch.log_softmax(ref(tokens).logits.double(), -1)
    return float((lr.exp() * (lr - lp)).sum(-1).mean())


def test_dynamic_int8_inputs_are_quantized_without_calibration(tiny_model) -> None:  # type: ignore[no-untyped-def]
    base = tiny_model("llama")
    w8, w8a8 = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(w8, Recipe.from_dict({"codec": W8}), progress=False)
    quantize_model(w8a8, Recipe.from_dict({"codec": W8, "activations": {}}), progress=False)
    linears = [m for m in w8a8.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.input_quant is not None and m.input_scale is None for m in linears)
    tokens = calib().tokens[:2]
    assert 0 < kld(w8, base, tokens) < kld(w8a8, base, tokens)  # the inputs really lose precision


def test_static_scales_come_from_the_observed_inputs(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    cal = calib()
    with torch.no_grad():
        for batch in cal.tokens.split(8):
            model(batch)
    handle.remove()
    recipe = Recipe.from_dict({"codec": W8, "activations": {"dynamic": False}})
    with pytest.raises(LowbitError, match=r"static input scales \(minmax\) needs calibration data"):
        quantize_model(copy.deepcopy(model), recipe, progress=False)
    quantize_model(model, recipe, calibration=cal, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.input_scale is not None
    # block 0's q_proj reads the unquantized model's normed embeddings: its range is theirs
    absmax = float(torch.cat(seen).abs().max())
    assert float(q.input_scale["scale"]) == pytest.approx(absmax / 127, rel=1e-6)


def test_smoothquant_before_w8a8_cuts_the_error_of_outlier_channels(tiny_model) -> None:  # type: ignore[no-untyped-def]
    base = with_outliers(tiny_model("llama"))
    cal = calib()
    errors = {}
    for name, extra in (("plain", {}), ("smoothquant", {"transforms": ["smoothquant"]})):
        model = copy.deepcopy(base)
        quantize_model(model, Recipe.from_dict({"codec": W8, "activations": {}, **extra}), calibration=cal, progress=False)
        errors[name] = kld(model, base, cal.tokens[:4])
    assert errors["smoothquant"] < 0.5 * errors["plain"], errors


@pytest.mark.parametrize("activations", [{"dynamic": False, "observer": "percentile"},
                                         {"dynamic": False, "granularity": "channel", "symmetric": False},
                                         {"format": "fp8_e4m3"},
                                         {"dynamic": False, "observer": "mse", "outlier_channels": 4},
                                         {"outlier_channels": 3}])
def test_a_lowbit_folder_keeps_the_input_quantization(tiny_model, tmp_path: Path, activations: dict) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io.formats import save_model
    from lowbit.models import LoadedModel, load_model

    model = tiny_model("llama")
    recipe = Recipe.from_dict({"codec": W8, "activations": activations,
                               "rules": [{"match": "*.mlp.down_proj", "activations": False}]})
    quantize_model(model, recipe, calibration=calib(), progress=False)
    from conftest import make_char_tokenizer

    out = save_model("native", LoadedModel(model, make_char_tokenizer(), "tiny", None), tmp_path / "m")
    back = load_model(str(out)).model
    tokens = calib().tokens[:2]
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens).logits, rtol=0, atol=0)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            b = back.get_submodule(name)
            assert b.input_quant == m.input_quant
            assert (b.input_scale is None) == (m.input_scale is None)
            for k, v in (m.input_scale or {}).items():
                assert b.input_scale[k].dtype == torch.float32 and torch.equal(b.input_scale[k], v)
            assert (b.input_channels is None) == (m.input_channels is None)
            if m.input_channels is not None:
                assert torch.equal(b.input_channels, m.input_channels)
    assert back.model.layers[0].mlp.down_proj.input_quant is None  # the rule's activations: false


def test_transforms_that_fold_nowhere_or_partly_are_said_before_any_work(tiny_model) -> None:  # type: ignore[no-untyped-def]
    recipe = Recipe.from_dict({"codec": W8, "activations": {}, "transforms": ["smoothquant"]})
    # phi3: fused q/k/v and gate/up after their norms fold; o_proj and down_proj have no source
    report = quantize_model(tiny_model("phi3"), recipe, calibration=calib(), progress=False)
    assert any(w.startswith("self_attn.o_proj: no module produces its input alone") for w in report.untransformed)
    assert any(w.startswith("mlp.down_proj:") for w in report.untransformed) and len(report.untransformed) == 2
    # a recipe whose transformed linears can fold nowhere: refused before any work
    only_o = Recipe.from_dict({"codec": W8, "activations": {}, "transforms": ["smoothquant"],
                               "targets": ["*.o_proj"]})
    with pytest.raises(LowbitError, match="smoothquant cannot fold into any sub-step of this phi3 model"):
        quantize_model(tiny_model("phi3"), only_o, calibration=calib(), progress=False)


def test_static_scales_need_enough_calibration_tokens(tiny_model) -> None:  # type: ignore[no-untyped-def]
    recipe = Recipe.from_dict({"codec": W8, "activations": {"dynamic": False, "observer": {"name": "percentile", "q": 99.999}}})
    few = CalibrationSet(tokens=calib().tokens[:4, :25], source="random")  # 100 tokens of 64 features: 6400 values
    with pytest.raises(LowbitError, match=r"static input scales \(percentile 99.999\) from 100 calibration tokens: at least 1563"):
        quantize_model(tiny_model("llama"), recipe, calibration=few, progress=False)
    with pytest.raises(LowbitError, match=r"\(minmax\) from 32 calibration tokens: at least 64"):
        quantize_model(tiny_model("llama"), Recipe.from_dict({"codec": W8, "activations": {"dynamic": False}}),
                       calibration=CalibrationSet(tokens=calib().tokens[:2, :16], source="random"), progress=False)


def test_awq_scored_by_the_algorithm_runs_gptq_on_each_candidate(tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lowbit.algorithms import GPTQ

    calls = []
    original = GPTQ.quantize_stacked
    monkeypatch.setattr(GPTQ, "quantize_stacked", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    counts = {}
    for score in ("rtn", "algorithm"):
        calls.clear()
        recipe = Recipe.from_dict({"codec": {"name": "int", "bits": 4, "group_size": 32}, "algorithm": {"name": "gptq"},
                                   "transforms": [{"name": "awq", "grid": 3, "score": score}]})
        model = with_outliers(tiny_model("llama"))
        quantize_model(model, recipe, calibration=calib(), progress=False)
        counts[score] = len(calls)
    # scored by RTN, GPTQ runs once per shared input; by the algorithm, also once per candidate
    # (3 exponents and no scaling) of every sub-step the transform scales: at least q/k/v (from
    # the attention norm) and gate/up (from the MLP norm) in every layer
    assert counts["algorithm"] >= counts["rtn"] + 4 * 2 * model.config.num_hidden_layers, counts


def test_fixed_outlier_channels_are_the_largest_features_and_static_scales_leave_them_out(tiny_model) -> None:  # type: ignore[no-untyped-def]
    base = with_outliers(tiny_model("llama"))
    seen: list[torch.Tensor] = []
    q_proj = base.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    cal = calib()
    with torch.no_grad():
        for batch in cal.tokens.split(8):
            base(batch)
    handle.remove()
    x = torch.cat(seen).reshape(-1, q_proj.in_features)
    want = x.abs().amax(0).topk(3).indices.sort().values
    assert set(want.tolist()) == {3, 20, 41}  # the planted outliers are the largest features
    errors = {}
    for name, act in (("static", {"dynamic": False}), ("kept", {"dynamic": False, "outlier_channels": 3})):
        model = copy.deepcopy(base)
        quantize_model(model, Recipe.from_dict({"codec": W8, "activations": act}), calibration=cal, progress=False)
        errors[name] = kld(model, base, cal.tokens[:4])
        q = model.model.layers[0].self_attn.q_proj
        if name == "kept":
            assert torch.equal(q.input_channels, want)
            rest = x.index_fill(1, want, 0).abs().max()  # minmax over the other features only
            assert float(q.input_scale["scale"]) == pytest.approx(float(rest) / 127, rel=1e-6)
            y = q(x[:5])  # the kept features reach the product exactly
            ref = q.input_quant.fake_quantize(x[:5], q.input_scale, want) @ q.weight.t()
            torch.testing.assert_close(y, ref)
            assert torch.equal(q.quantize_input(x[:5])[:, want], x[:5, want])
    assert errors["kept"] < 0.2 * errors["static"], errors


def test_outlier_channels_as_wide_as_an_input_are_refused_before_any_work(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    width = model.model.layers[0].self_attn.q_proj.in_features
    recipe = Recipe.from_dict({"codec": W8, "activations": {"dynamic": False, "outlier_channels": width}})
    with pytest.raises(LowbitError, match=r"model\.layers\.0\.self_attn\.q_proj: outlier_channels \d+ keeps all"):
        quantize_model(model, recipe, calibration=calib(), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing was quantized


def test_the_second_pass_of_kept_channels_records_no_replay_twice(tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lowbit.pipeline.replay import LinearReplay

    kept_at_start: list[int] = []
    real_start = LinearReplay.start

    def start(self: LinearReplay) -> None:
        kept_at_start.append(len(self.kept or []))
        real_start(self)

    monkeypatch.setattr(LinearReplay, "start", start)
    cal = calib(n=8)
    recipe = Recipe.from_dict({"codec": W8, "activations": {"dynamic": False, "outlier_channels": 2}})
    quantize_model(tiny_model("llama"), recipe, calibration=cal, progress=False, batch_size=4)
    assert kept_at_start and set(kept_at_start) == {2}  # o_proj's and down_proj's inputs: one per batch of 4
