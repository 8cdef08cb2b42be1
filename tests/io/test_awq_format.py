"""AutoAWQ's GEMM checkpoint layout: bytes against an independent reimplementation of AutoAWQ's
``dequantize_gemm`` (interleaved words, no zero offset), exact round trips through whole tiny
models, and what the layout cannot hold refused before anything is written.

No AWQ consumer runs here: transformers loads AWQ checkpoints only through GPTQModel (its AWQ
quantizer's ``validate_environment`` raises ImportError without ``gptqmodel``), which pulls a
CUDA torch. The consumer test below runs where it is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from int_checkpoint_references import (
    assert_same_quant_linears,
    awq_reference,
    leftovers,
    logits,
    quant_linears,
    quantized_model,
)
from safetensors.torch import load_file

from lowbit import LowbitError
from lowbit.codecs import IntCodec, QuantizedTensor
from lowbit.io.awq_format import awq_tensors, is_awq_folder, load_awq, read_awq_linear, save_awq, unsupported_reason
from lowbit.io.gptq_format import is_gptq_folder, save_gptq
from lowbit.io.int_checkpoint import int_tables

SHAPE = (64, 256)

CASES = {
    "g128 sym": dict(bits=4, group_size=128),
    "g32 asym": dict(bits=4, group_size=32, symmetric=False),
    "channel asym": dict(bits=4, granularity="channel", symmetric=False),
    "channel sym": dict(bits=4, granularity="channel"),
    "tensor asym": dict(bits=4, granularity="tensor", symmetric=False),
}


@pytest.mark.parametrize("label", list(CASES))
def test_autoawq_unpacks_what_lowbit_decodes(label: str) -> None:
    kw = CASES[label]
    qt: QuantizedTensor = IntCodec(**kw).quantize(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))
    group_size = kw.get("group_size", -1)
    groups = 1 if group_size == -1 else SHAPE[1] // group_size
    parts = awq_tensors(int_tables(qt))
    assert parts["qweight"].dtype == torch.int32 and parts["qweight"].shape == (SHAPE[1], SHAPE[0] // 8)
    assert parts["qzeros"].dtype == torch.int32 and parts["qzeros"].shape == (groups, SHAPE[0] // 8)
    assert parts["scales"].dtype == torch.float16 and parts["scales"].shape == (groups, SHAPE[0])
    assert torch.equal(awq_reference(parts, group_size), qt.dequantize())
    back = read_awq_linear({f"m.{k}": v for k, v in parts.items()}, "m", SHAPE, group_size)
    assert torch.equal(back.dequantize(), qt.dequantize())
    if kw.get("granularity") != "tensor":  # per tensor comes back per channel
        assert back.codec == qt.codec and all(torch.equal(back.data[k], qt.data[k]) for k in qt.data)


def test_interleaved_word_order() -> None:
    """Outputs 0..7 of a row with codes 0..7 pack as nibbles 0 2 4 6 1 3 5 7."""
    codec = IntCodec(bits=4, granularity="channel", symmetric=False)
    codes = torch.arange(8).repeat(16, 1).t()  # (out 8, in 16): output o has code o everywhere
    qt = codec.pack(codes, {"scale": torch.ones(8, 1, dtype=torch.float16), "zero": torch.zeros(8, 1, dtype=torch.float16)},
                    (8, 16))
    assert int(awq_tensors(int_tables(qt))["qweight"][0, 0]) == 0x75316420


def test_foreign_words_read_as_autoawq_reads_them() -> None:
    g = torch.Generator().manual_seed(0)
    out, cols, group_size = 64, 128, 64
    parts = {
        "qweight": torch.randint(-2**31, 2**31 - 1, (cols, out // 8), generator=g, dtype=torch.int32),
        "qzeros": torch.randint(-2**31, 2**31 - 1, (cols // group_size, out // 8), generator=g, dtype=torch.int32),
        "scales": (torch.rand(cols // group_size, out, generator=g) * 0.1).to(torch.float16),
    }
    qt = read_awq_linear({f"x.{k}": v for k, v in parts.items()}, "x", (out, cols), group_size)
    assert torch.equal(qt.dequantize(), awq_reference(parts, group_size))
    again = awq_tensors(int_tables(qt))
    assert all(torch.equal(again[k], parts[k]) for k in parts)


@pytest.mark.parametrize(
    ("family", "codec", "cfg"),
    [
        ("llama", {"group_size": 32, "symmetric": False}, {"tie_word_embeddings": True}),
        ("qwen2", {"group_size": 64}, {}),
        ("gpt2", {"granularity": "channel", "symmetric": False}, {}),
    ],
    ids=["llama-tied-asym", "qwen2-bias-sym", "gpt2-conv1d-channel"],
)
def test_round_trip_exact(tiny_model, char_tokenizer, tmp_path, family: str, codec: dict, cfg: dict) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, family, {"codec": {"name": "int", "bits": 4, **codec}}, **cfg)
    want = logits(loaded.model)
    out = save_awq(loaded, tmp_path / "q", source="my-source")
    assert leftovers(tmp_path, "q") == []
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json"} <= {p.name for p in out.iterdir()}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "version", "bits", "group_size", "zero_point")} == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": codec.get("group_size", -1), "zero_point": True}
    assert qc["modules_to_not_convert"] is None
    name = next(iter(quant_linears(loaded.model)))
    tensors = load_file(str(out / "model.safetensors"))
    assert {f"{name}.qweight", f"{name}.qzeros", f"{name}.scales"} <= tensors.keys()
    assert f"{name}.g_idx" not in tensors and f"{name}.weight" not in tensors
    assert is_awq_folder(out) and not is_gptq_folder(out)

    back = load_awq(out)
    assert back.source == "my-source" and back.model.lowbit_recipe == loaded.model.lowbit_recipe
    assert_same_quant_linears(loaded.model, back.model)
    assert torch.equal(logits(back.model), want)


def test_dense_linears_are_not_converted(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = {"codec": {"name": "int", "bits": 4, "group_size": 32, "symmetric": False}, "ignore": ["*.down_proj"]}
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", recipe)
    out = save_awq(loaded, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["modules_to_not_convert"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    back = load_awq(out)
    assert isinstance(back.model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert torch.equal(logits(back.model), logits(loaded.model))


def test_transformers_parses_the_config(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoConfig, AwqConfig

    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    cfg = AwqConfig.from_dict(AutoConfig.from_pretrained(save_awq(loaded, tmp_path / "q")).quantization_config)
    assert (cfg.bits, cfg.group_size, cfg.zero_point, cfg.format) == (4, 32, True, "gemm")


def test_older_autoawq_quant_config(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32,
                                                                             "symmetric": False}})
    out = save_awq(loaded, tmp_path / "q")
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    assert not is_awq_folder(out)
    (out / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}))
    assert is_awq_folder(out)
    assert torch.equal(logits(load_awq(out).model), logits(loaded.model))


# -- refusals -------------------------------------------------------------------------------------
def test_unsupported_reason() -> None:
    int4 = IntCodec(bits=4, group_size=48).model_dump()
    assert unsupported_reason(int4, (64, 96)) is None
    assert unsupported_reason(int4, (64, 64)) == (
        "its 64 input columns are not a multiple of the group size 48 (AWQ stores whole groups only); "
        "write it as GPTQ, lowbit's own folder")
    assert "output features are not a multiple of 8" in unsupported_reason(int4, (60, 96))  # type: ignore[operator]
    assert unsupported_reason(int4, act_order=True) == (
        "its columns are grouped in act-order, and AWQ has no g_idx to say so; write it as GPTQ, lowbit's own folder")
    assert unsupported_reason(IntCodec(bits=3).model_dump()) == (
        "AWQ stores 4-bit codes, not 3-bit ones; write it as GPTQ, lowbit's own folder")


@pytest.mark.parametrize(
    ("recipe", "calibrate", "match"),
    [
        ({"codec": {"name": "int", "bits": 4, "group_size": 48}}, False, "not a multiple of the group size 48"),
        ({"codec": {"name": "int", "bits": 3, "group_size": 32}}, False, "AWQ stores 4-bit codes"),
        ({"codec": {"name": "int", "bits": 4, "group_size": 32},
          "algorithm": {"name": "gptq", "act_order": True, "static_groups": False}}, True, "act-order"),
        ({"codec": {"name": "int", "bits": 4, "group_size": 32},
          "rules": [{"match": "*.down_proj", "codec": {"name": "int", "bits": 4, "group_size": 64}}]}, False,
         r"one group size per model, these linears differ: model\.layers\.0\.self_attn\.q_proj \(g32\), "
         r"model\.layers\.0\.mlp\.down_proj \(g64\); write it as GPTQ"),
    ],
    ids=["ragged", "int3", "act-order", "mixed-group-sizes"],
)
def test_refusals_write_nothing(tiny_model, char_tokenizer, tmp_path, recipe: dict, calibrate: bool, match: str) -> None:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "llama", recipe, calibrate=calibrate)
    with pytest.raises(LowbitError, match=match):
        save_awq(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []
    save_gptq(loaded, tmp_path / "g")  # the layout the message names holds it


def test_zero_point_beyond_four_bits_is_refused(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A zero point of 16 (a GPTQ v1 field of 15, as readers take it) has no AWQ field."""
    from lowbit.io.gptq_format import read_gptq_linear
    from lowbit.modules import QuantLinear

    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    parts = {"x.qweight": torch.zeros(16, 64, dtype=torch.int32), "x.qzeros": torch.full((4, 8), -1, dtype=torch.int32),
             "x.scales": torch.ones(4, 64, dtype=torch.float16)}
    loaded.model.model.layers[0].mlp.down_proj = QuantLinear(read_gptq_linear(parts, "x", (64, 128), 4, 32, True))
    with pytest.raises(LowbitError, match="cannot hold model.layers.0.mlp.down_proj: it has a zero point of 16"):
        save_awq(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


# -- broken folders -------------------------------------------------------------------------------
@pytest.fixture
def saved(tiny_model, char_tokenizer, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    loaded = quantized_model(tiny_model, char_tokenizer, "qwen2", {"codec": {"name": "int", "bits": 4, "group_size": 32}})
    return save_awq(loaded, tmp_path / "q")


def test_broken_folders(saved: Path) -> None:
    from safetensors.torch import save_file

    config = json.loads((saved / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(LowbitError, match="AWQ version 'gemv' is not read by lowbit"):
        load_awq(saved)
    config["quantization_config"]["version"] = "gemm"
    (saved / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(saved / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.qweight"] = tensors["model.layers.0.mlp.up_proj.qweight"][:, :8].clone()
    save_file(tensors, str(saved / "model.safetensors"))
    with pytest.raises(LowbitError, match=r"up_proj.qweight has shape \(64, 8\), expected \(64, 16\)"):
        load_awq(saved)
    (saved / "model.safetensors").unlink()
    with pytest.raises(LowbitError, match="missing model.safetensors"):
        load_awq(saved)
    (saved / "config.json").write_text("{broken")
    assert not is_awq_folder(saved)
    with pytest.raises(LowbitError, match="not valid JSON: line 1, column 2"):
        load_awq(saved)


def test_autoawq_consumer(tiny_model, char_tokenizer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """transformers loads the folder through GPTQModel where it is installed (not here)."""
    pytest.importorskip("gptqmodel")
    from transformers import AutoModelForCausalLM

    loaded = quantized_model(tiny_model, char_tokenizer, "llama", {"codec": {"name": "int", "bits": 4, "group_size": 32,
                                                                             "symmetric": False}})
    model = AutoModelForCausalLM.from_pretrained(save_awq(loaded, tmp_path / "q"), dtype=torch.float16)
    torch.testing.assert_close(logits(model).float(), logits(loaded.model), rtol=0.05, atol=0.05)
