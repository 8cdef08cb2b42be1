"""The GPTQ checkpoint layout: bytes against an independent reimplementation of the readers'
unpacking (2/3/4/8 bits, sym/asym, group/channel, act-order, ragged groups, v1 and v2), exact
round trips through whole tiny models, and refusals that leave nothing behind.

No GPTQ consumer runs here: transformers needs GPTQModel (and optimum) even to load a GPTQ
checkpoint on the CPU (its quantizer's ``validate_environment`` raises ImportError without
``gptqmodel``; optimum 2.3's GPTQ quantizer imports its QuantizeConfig from ``gptqmodel``), and
GPTQModel pulls a CUDA torch. The consumer test below runs where both are installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from int_checkpoint_references import (
    assert_same_quant_linears,
    gptq_reference,
    leftovers,
    logits,
    quant_linears,
    quantized_model,
)
from safetensors.torch import load_file, save_file

from lowbit import LowbitError
from lowbit.algorithms import GPTQ, LayerStats
from lowbit.codecs import IntCodec, QuantizedTensor, codec_from_dict
from lowbit.io.gptq_format import (
    gptq_tensors,
    is_gptq_folder,
    load_gptq,
    module_settings,
    read_gptq_linear,
    save_gptq,
    unsupported_reason,
)
from lowbit.io.int_checkpoint import int_tables
from lowbit.modules import QuantLinear, quantize_embeddings

SHAPE = (64, 576)  # 576 columns: groups of 128 are ragged (5 groups, the last 64 wide)


def _weight(shape: tuple[int, int] = SHAPE, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _act_order(bits: int, symmetric: bool, group_size: int = 128) -> QuantizedTensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, SHAPE[1], generator=g) * torch.rand(SHAPE[1], generator=g) * 3
    codec = IntCodec(bits=bits, symmetric=symmetric, group_size=group_size)
    qt = GPTQ(act_order=True, static_groups=False).quantize(_weight(), codec, LayerStats(hessian=x.t() @ x))
    assert "g_idx" in qt.data
    return qt


CASES = {
    **{f"int{b} g128 {'sym' if s else 'asym'} ragged": (b, dict(bits=b, symmetric=s, group_size=128))
       for b in (2, 3, 4, 8) for s in (True, False)},
    **{f"int{b} g64 asym": (b, dict(bits=b, symmetric=False, group_size=64)) for b in (3, 4)},
    **{f"int{b} channel {'sym' if s else 'asym'}": (b, dict(bits=b, symmetric=s, granularity="channel"))
       for b in (2, 3, 4, 8) for s in (True, False)},
    "int4 tensor asym": (4, dict(bits=4, symmetric=False, granularity="tensor")),
}


def _cases() -> list[tuple[str, int, QuantizedTensor]]:
    cases = [(label, bits, IntCodec(**kw).quantize(_weight())) for label, (bits, kw) in CASES.items()]
    return cases + [(f"int{b} act-order {'sym' if s else 'asym'}", b, _act_order(b, s)) for b in (3, 4) for s in (True, False)]


@pytest.mark.parametrize("label,bits,qt", _cases(), ids=[c[0] for c in _cases()])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_readers_unpack_what_lowbit_decodes(label: str, bits: int, qt: QuantizedTensor, fmt: str) -> None:
    parts = gptq_tensors(int_tables(qt), fmt)  # type: ignore[arg-type]
    out, cols = SHAPE
    groups = 1 if "channel" in label or "tensor" in label else (-(-cols // 128) if "g128" in label or "act" in label else cols // 64)
    assert parts["qweight"].dtype == torch.int32 and parts["qweight"].shape == (cols * bits // 32, out)
    assert parts["qzeros"].dtype == torch.int32 and parts["qzeros"].shape == (groups, out * bits // 32)
    assert parts["scales"].dtype == torch.float16 and parts["scales"].shape == (groups, out)
    assert parts["g_idx"].dtype == torch.int32 and parts["g_idx"].shape == (cols,)
    assert torch.equal(gptq_reference(parts, bits, v2=fmt == "gptq_v2"), qt.dequantize())
    # and back: the same codec and parts (a per-tensor scale comes back per channel)
    sym = bool(qt.codec["symmetric"])
    group_size = qt.codec["group_size"] if qt.codec["granularity"] == "group" else -1
    back = read_gptq_linear({f"m.{k}": v for k, v in parts.items()}, "m", SHAPE, bits, group_size, sym, fmt)  # type: ignore[arg-type]
    assert torch.equal(back.dequantize(), qt.dequantize())
    if qt.codec["granularity"] != "tensor":
        assert back.codec == qt.codec and back.data.keys() == qt.data.keys()
        assert all(torch.equal(back.data[k], qt.data[k]) for k in qt.data)


def test_symmetric_zero_points_are_stored_as_v1_offsets() -> None:
    qt = IntCodec(bits=4, group_size=128).quantize(_weight())
    parts = gptq_tensors(int_tables(qt))
    assert bool((parts["qzeros"] == 0x77777777).all())  # zero 8 stored as 8 - 1 in every nibble
    assert torch.equal(gptq_tensors(int_tables(qt), "gptq_v2")["qzeros"], torch.full_like(parts["qzeros"], -0x77777778))
    assert torch.equal(parts["g_idx"], (torch.arange(SHAPE[1]) // 128).to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_foreign_words_read_as_the_readers_read_them(bits: int, fmt: str) -> None:
    """Arbitrary packed words (as another tool may write them, including a v1 zero field of
    2**bits - 1 that readers take as 2**bits) and a shuffled act-order g_idx."""
    g = torch.Generator().manual_seed(bits)
    out, cols = 64, 256
    groups = cols // 32
    parts = {
        "qweight": torch.randint(-2**31, 2**31 - 1, (cols * bits // 32, out), generator=g, dtype=torch.int32),
        "qzeros": torch.randint(-2**31, 2**31 - 1, (groups, out * bits // 32), generator=g, dtype=torch.int32),
        "scales": (torch.rand(groups, out, generator=g) * 0.1).to(torch.float16),
        "g_idx": (torch.arange(cols) // 32)[torch.randperm(cols, generator=g)].to(torch.int32),
    }
    qt = read_gptq_linear({f"x.{k}": v for k, v in parts.items()}, "x", (out, cols), bits, 32, True, fmt)  # type: ignore[arg-type]
    assert "g_idx" in qt.data and not qt.codec["symmetric"]
    assert torch.equal(qt.dequantize(), gptq_reference(parts, bits, v2=fmt == "gptq_v2"))
    again = gptq_tensors(int_tables(qt), fmt)  # type: ignore[arg-type]
    assert all(torch.equal(again[k], parts[k]) for k in parts)  # written back bit for bit


def test_zero_point_zero_needs_v2(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qt = IntCodec(bits=4, symmetric=False, group_size=128).quantize(_weight().abs())  # all >= 0: zero point 0
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq_tensors(int_tables(qt))
    parts = gptq_tensors(int_tables(qt), "gptq_v2")
    assert torch.equal(gptq_reference(parts, 4, v2=True), qt.dequantize())

    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32,
                                                                             "symmetric": False}})
    with torch.no_grad():  # a positive layer: its zero points are 0
        layer = loaded.model.model.layers[0].mlp.up_proj
        loaded.model.model.layers[0].mlp.up_proj = QuantLinear(layer.qweight.get_codec().quantize(layer.weight.abs()))
    with pytest.raises(LowbitError, match="cannot hold model.layers.0.mlp.up_proj: it has a zero point of 0"):
        save_gptq(loaded, tmp_path / "v1")
    assert list(tmp_path.iterdir()) == []
    out = save_gptq(loaded, tmp_path / "v2", checkpoint_format="gptq_v2")
    assert json.loads((out / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    back = load_gptq(out)
    assert_same_quant_linears(loaded.model, back.model)
    assert torch.equal(logits(back.model), logits(loaded.model))


@pytest.mark.parametrize(
    ("family", "codec", "cfg"),
    [
        ("llama", {"bits": 4, "group_size": 32}, {"tie_word_embeddings": True}),
        ("qwen2", {"bits": 3, "group_size": 48, "symmetric": False}, {}),  # ragged: 64 = 48 + 16, 128 = 48+48+32
        ("gpt2", {"bits": 2, "granularity": "channel", "symmetric": False}, {}),
        ("opt", {"bits": 8, "group_size": 64}, {}),
    ],
    ids=["llama-tied-int4", "qwen2-bias-int3-ragged", "gpt2-conv1d-int2-channel", "opt-int8"],
)
def test_round_trip_exact(tiny_model, char_tokenizer, tmp_path, family: str, codec: dict, cfg: dict) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, family, {"codec": {"name": "int", **codec}}, **cfg)
    want = logits(loaded.model)
    out = save_gptq(loaded, tmp_path / "q", source="my-source")
    assert leftovers(tmp_path, "q") == []
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= {
        p.name for p in out.iterdir()}
    qc = json.loads((out / "quantize_config.json").read_text())
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    group_size = codec.get("group_size", -1)
    assert qc["bits"] == codec["bits"] and qc["group_size"] == group_size
    assert qc["sym"] == codec.get("symmetric", True) and qc["desc_act"] is False
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and "dynamic" not in qc
    assert qc["meta"]["lowbit_source"] == "my-source"
    tensors = load_file(str(out / "model.safetensors"))
    name = next(iter(quant_linears(loaded.model)))
    assert {f"{name}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")} <= tensors.keys()
    assert f"{name}.weight" not in tensors
    assert is_gptq_folder(out)

    back = load_gptq(out)
    assert back.source == "my-source" and back.path == out
    assert back.model.lowbit_recipe == loaded.model.lowbit_recipe
    assert_same_quant_linears(loaded.model, back.model)
    assert torch.equal(logits(back.model), want)
    assert back.tokenizer("Hi", add_special_tokens=False)["input_ids"] == [42, 75]


def test_act_order_round_trip(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"codec": {"name": "int", "bits": 4, "group_size": 48},
              "algorithm": {"name": "gptq", "act_order": True, "static_groups": False}}
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", recipe, calibrate=True)
    assert all("g_idx" in m.parts for m in quant_linears(loaded.model).values())
    out = save_gptq(loaded, tmp_path / "q")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["desc_act"] is True and qc["static_groups"] is False and qc["damp_percent"] == 0.01
    parts = {p: load_file(str(out / "model.safetensors"))[f"model.layers.1.mlp.down_proj.{p}"]
             for p in ("qweight", "qzeros", "scales", "g_idx")}
    layer = loaded.model.model.layers[1].mlp.down_proj
    assert torch.equal(gptq_reference(parts, 4), layer.qweight.dequantize())
    back = load_gptq(out)
    assert_same_quant_linears(loaded.model, back.model)
    assert torch.equal(logits(back.model), logits(loaded.model))


def test_mixed_codecs_and_dense_linears_become_dynamic_overrides(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"codec": {"name": "int", "bits": 4, "group_size": 32},
              "ignore": ["*.o_proj"],
              "rules": [{"match": "*.down_proj", "codec": {"name": "int", "bits": 8, "symmetric": False,
                                                            "granularity": "channel"}}]}
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", recipe)
    out = save_gptq(loaded, tmp_path / "q")
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 32, True)
    assert qc["dynamic"][r"+:^model\.layers\.1\.mlp\.down_proj$"] == {"bits": 8, "desc_act": False, "group_size": -1,
                                                                        "sym": False}
    assert qc["dynamic"][r"-:^model\.layers\.0\.self_attn\.o_proj$"] == {}
    assert module_settings(qc, "model.layers.1.mlp.down_proj") == {"bits": 8, "group_size": -1, "sym": False}
    assert module_settings(qc, "model.layers.1.mlp.up_proj") == {"bits": 4, "group_size": 32, "sym": True}
    assert module_settings(qc, "model.layers.1.self_attn.o_proj") is None
    back = load_gptq(out)
    assert isinstance(back.model.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    assert_same_quant_linears(loaded.model, back.model)
    assert torch.equal(logits(back.model), logits(loaded.model))


def test_transformers_parses_the_config(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoConfig, GPTQConfig

    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 3, "group_size": 32}})
    out = save_gptq(loaded, tmp_path / "q")
    cfg = GPTQConfig.from_dict(AutoConfig.from_pretrained(out).quantization_config)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.format) == (3, 32, True, False, "gptq")


def test_loaded_in_bfloat16(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "qwen2", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    back = load_gptq(save_gptq(loaded, tmp_path / "q"), dtype=torch.bfloat16).model
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    assert back.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    assert back.model.layers[0].self_attn.q_proj.qweight_scale.dtype == torch.float16


# -- refusals -------------------------------------------------------------------------------------
def test_unsupported_reason_names_the_layouts_that_can() -> None:
    assert unsupported_reason({"name": "int", "bits": 4, "symmetric": True, "granularity": "group", "group_size": 128,
                               "zero_point": "integer"}, (64, 576), act_order=True) is None
    fp8 = codec_from_dict({"name": "fp8"}).model_dump()
    assert "not an integer codec; write it as lowbit's own folder" in unsupported_reason(fp8)  # type: ignore[operator]
    int5 = IntCodec(bits=5).model_dump()
    assert unsupported_reason(int5) == "GPTQ stores 2, 3, 4 or 8-bit codes, not 5-bit ones; write it as lowbit's own folder"
    q41 = IntCodec(bits=4, symmetric=False, zero_point="float").model_dump()
    assert "float zero offset" in unsupported_reason(q41)  # type: ignore[operator]
    f32_scales = IntCodec(bits=4, scale_dtype="float32").model_dump()
    assert "the layout stores fp16 scales, these are float32" in unsupported_reason(f32_scales)  # type: ignore[operator]
    int3 = IntCodec(bits=3, group_size=32).model_dump()
    why = unsupported_reason(int3, (64, 48))
    assert why is not None and "48 input features of 3 bits do not fill whole int32 words" in why
    int4 = IntCodec(bits=4, group_size=12).model_dump()
    assert "write it as AWQ, lowbit's own folder" in unsupported_reason(int4, (64, 36))  # type: ignore[operator]


@pytest.mark.parametrize(
    ("codec", "match"),
    [
        ({"name": "fp8"}, "fp8 .*not an integer codec"),
        ({"name": "int", "bits": 5, "group_size": 32}, "5-bit"),
        ({"name": "int", "bits": 4, "symmetric": False, "zero_point": "float", "group_size": 32}, "float zero offset"),
    ],
    ids=["fp8", "int5", "float-zero"],
)
def test_refused_codecs_write_nothing(tiny_model, char_tokenizer, tmp_path, codec: dict, match: str) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": codec})
    with pytest.raises(LowbitError, match=f"GPTQ layout cannot hold model.layers.0.self_attn.q_proj \\(and 13 more\\): .*{match}"):
        save_gptq(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_quantized_embedding_and_unquantized_models_are_refused(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    quantize_embeddings(loaded.model, codec_from_dict({"name": "q8_0"}), None)
    with pytest.raises(LowbitError, match="token embedding"):
        save_gptq(loaded, tmp_path / "q")
    with pytest.raises(LowbitError, match="no quantized linears"):
        save_gptq(type(loaded)(tiny_model("llama"), char_tokenizer, "x", None), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_kept(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("precious")
    with pytest.raises(LowbitError, match="exists"):
        save_gptq(loaded, tmp_path / "q")
    assert [p.name for p in (tmp_path / "q").iterdir()] == ["keep.txt"] and leftovers(tmp_path, "q") == []
    save_gptq(loaded, tmp_path / "q", overwrite=True)
    assert is_gptq_folder(tmp_path / "q") and not (tmp_path / "q" / "keep.txt").exists()


# -- broken folders -------------------------------------------------------------------------------
@pytest.fixture
def saved(tiny_model, char_tokenizer, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "qwen2", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    return save_gptq(loaded, tmp_path / "q")


def _edit_tensors(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_and_truncated_weights(saved: Path) -> None:
    st = saved / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(LowbitError, match="corrupt safetensors"):
        load_gptq(saved)
    st.unlink()
    with pytest.raises(LowbitError, match="missing model.safetensors"):
        load_gptq(saved)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros"), r"bad quantized linear model.layers.0.mlp.up_proj: missing .*qzeros"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.scales", t["model.layers.0.mlp.up_proj.scales"][:1].clone()),
         r"up_proj.scales has shape \(1, 128\), expected \(2, 128\)"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.g_idx", torch.zeros(64, dtype=torch.int32)),
         "g_idx does not assign group_size columns"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.scales", t["model.layers.0.mlp.up_proj.scales"].float() / 3),
         "fp16 cannot hold"),
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), "missing model.layers.1.self_attn.k_proj.bias"),
        (lambda t: t.pop("model.norm.weight"), r"missing tensors \['model.norm.weight'\]"),
        (lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)), "unexpected tensors.*model.extra.weight"),
        (lambda t: t.__setitem__("model.layers.0.mlp.nope.qweight", torch.zeros(3, dtype=torch.int32)),
         "quantized tensors for model.layers.0.mlp.nope, which is not a linear"),
    ],
    ids=["missing-part", "bad-shape", "bad-g_idx", "inexact-scales", "missing-bias", "missing-dense", "unexpected",
         "unknown-linear"],
)
def test_broken_tensors(saved: Path, edit, match: str) -> None:  # type: ignore[no-untyped-def]
    _edit_tensors(saved, edit)
    with pytest.raises(LowbitError, match=match):
        load_gptq(saved)


def test_broken_configs(saved: Path) -> None:
    (saved / "quantize_config.json").write_text("{broken")
    with pytest.raises(LowbitError, match="not valid JSON: line 1, column 2"):
        load_gptq(saved)
    assert not is_gptq_folder(saved)
    (saved / "quantize_config.json").unlink()
    assert is_gptq_folder(saved)  # config.json's quantization_config is enough
    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "marlin"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="format 'marlin' is not read by lowbit"):
        load_gptq(saved)
    del config["quantization_config"]
    (saved / "config.json").write_text(json.dumps(config))
    assert not is_gptq_folder(saved)
    with pytest.raises(LowbitError, match="not a GPTQ checkpoint"):
        load_gptq(saved)


def test_autogptq_folder_layout(saved: Path) -> None:
    """AutoGPTQ's folders: weights under another file name, no quant_method in
    quantize_config.json, no quantization_config in config.json, a stored inv_freq."""
    config = json.loads((saved / "config.json").read_text())
    del config["quantization_config"]
    (saved / "config.json").write_text(json.dumps(config))
    qc = {k: v for k, v in json.loads((saved / "quantize_config.json").read_text()).items()
          if k in ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential")}
    (saved / "quantize_config.json").write_text(json.dumps(qc))
    _edit_tensors(saved, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    (saved / "model.safetensors").rename(saved / "gptq_model-4bit-32g.safetensors")
    assert is_gptq_folder(saved)
    assert quant_linears(load_gptq(saved).model)


def test_gptqmodel_consumer(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """transformers loads the folder through GPTQModel where it is installed (not here)."""
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    model = AutoModelForCausalLM.from_pretrained(save_gptq(loaded, tmp_path / "q"), dtype=torch.float16)
    torch.testing.assert_close(logits(model).float(), logits(loaded.model), rtol=0.05, atol=0.05)
