"""compressed-tensors export and import, checked against the real consumer: transformers with the
``compressed-tensors`` package loads what lowbit writes, and its own compressor's bytes and
dequantization are the reference.

Tolerances: every comparison of weights is exact. Logits are compared with ``atol=1e-5``: the two
models hold bit-identical weights and run the same fp32 ops, so the logits (of order 1) can differ
only by the summation order of a matmul kernel (~1e-7); a single wrong code or scale moves them by
1e-4 or more.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import lowbit.io.compressed_tensors as ct
from lowbit import LowbitError
from lowbit.calibration.samples import CalibrationSet
from lowbit.codecs import FP8Codec, IntCodec
from lowbit.io import load_compressed_tensors, save_compressed_tensors
from lowbit.io.compressed_tensors import is_compressed_tensors_folder, unsupported_reason
from lowbit.models import LoadedModel
from lowbit.modules import QuantLinear, cache_dequantized_weights
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

pytest.importorskip("compressed_tensors")

IDS = torch.randint(2, 99, (2, 20), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5  # see the module docstring

CODECS: dict[str, dict[str, Any]] = {
    "int4-g32-sym": {"name": "int", "bits": 4, "group_size": 32},
    "int4-g32-asym": {"name": "int", "bits": 4, "symmetric": False, "group_size": 32},
    "int8-channel-sym": {"name": "int", "bits": 8, "granularity": "channel", "group_size": None},
    "int3-g32-sym": {"name": "int", "bits": 3, "group_size": 32},  # codes straddle int32 words
    "int4-tensor-asym": {"name": "int", "bits": 4, "symmetric": False, "granularity": "tensor", "group_size": None},
    "fp8-channel": {"name": "fp8", "granularity": "channel"},
    "fp8-g32": {"name": "fp8", "granularity": "group", "group_size": 32},
}


def _quantized(tiny_model, char_tokenizer, recipe: dict[str, Any], family: str = "llama",  # type: ignore[no-untyped-def]
               calibration: CalibrationSet | None = None, **cfg: Any) -> LoadedModel:
    model = tiny_model(family, **cfg)
    model.tie_weights()
    quantize_model(model, Recipe.from_dict(recipe), calibration=calibration, progress=False)
    return LoadedModel(model, char_tokenizer, f"tiny-{family}", None)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _quant_linears(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def _transformers(folder: Path, dequantize: bool = False) -> tuple[torch.nn.Module, torch.Tensor]:
    """The folder as transformers + compressed-tensors load it, and its logits. By default the model
    stays compressed until the first forward pass decompresses it; ``dequantize`` dequantizes while
    loading instead (the path that reads asymmetric packed zero points, see the asym test)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **kw).eval()
    logits = _logits(model)  # decompresses on the first forward
    return model, logits


def _assert_transformers_weights(folder: Path, loaded: LoadedModel, dequantize: bool = False) -> None:
    ref, logits = _transformers(folder, dequantize)
    modules = dict(ref.named_modules())
    for name, m in _quant_linears(loaded.model).items():
        want = m.weight
        if dequantize:  # transformers dequantizes in the stored scale dtype, fp16: one rounding of each product
            want = want.to(torch.float16).to(torch.float32)
        got = modules[name].weight
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    with cache_dequantized_weights(loaded.model, torch.float16 if dequantize else torch.float32):
        want_logits = _logits(loaded.model)
    assert torch.allclose(logits, want_logits, rtol=0, atol=ATOL)


def _assert_same_quantized(a: torch.nn.Module, b: torch.nn.Module) -> None:
    qa, qb = _quant_linears(a), _quant_linears(b)
    assert qa.keys() == qb.keys() and qa
    for name, m in qa.items():
        assert qb[name].codec == m.codec, name
        assert qb[name].parts == m.parts, name
        for part in m.parts:
            x, y = getattr(m, f"qweight_{part}"), getattr(qb[name], f"qweight_{part}")
            assert x.dtype == y.dtype and torch.equal(x, y), f"{name}.{part}"
        assert (m.bias is None) == (qb[name].bias is None)
        if m.bias is not None:
            assert torch.equal(m.bias, qb[name].bias)


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith((name, f".{name}"))]


# -- bytes: lowbit's tensors equal compressed-tensors' own compressor's ------------------------


@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_int_bytes_match_compressed_tensors(bits: int, symmetric: bool, granularity: str) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    group_size = 32 if granularity == "group" else None
    codec = IntCodec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    qt = codec.quantize(torch.randn(40, 96, generator=torch.Generator().manual_seed(bits)))
    ours = ct.ct_tensors(qt)
    scale = ours["weight_scale"].to(torch.float32)
    state = {"weight": qt.dequantize(), "weight_scale": scale}
    if not symmetric:  # compressed-tensors' zero point is signed: lowbit's zero - 2**(bits-1)
        zp = qt.data["zero"].to(torch.int64) - (1 << (bits - 1))
        state["weight_zero_point"] = zp.reshape(scale.shape).to(torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=ct._scheme(qt.codec))
    theirs = PackedQuantizationCompressor.compress(state, scheme)
    assert set(theirs) == set(ours)
    for k in ("weight_packed", "weight_shape", "weight_zero_point"):
        if k in ours:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    back = PackedQuantizationCompressor.decompress({**ours, "weight_scale": scale}, scheme)["weight"]
    assert torch.equal(back, qt.dequantize())


@pytest.mark.parametrize("granularity", ["group", "channel", "tensor"])
def test_fp8_bytes_match_compressed_tensors(granularity: str) -> None:
    from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    codec = FP8Codec(granularity=granularity, group_size=32 if granularity == "group" else None)
    qt = codec.quantize(torch.randn(40, 96, generator=torch.Generator().manual_seed(1)))
    ours = ct.ct_tensors(qt)
    scheme = QuantizationScheme(targets=["Linear"], weights=ct._scheme(qt.codec))
    state = {"weight": qt.dequantize(), "weight_scale": ours["weight_scale"]}
    theirs = NaiveQuantizationCompressor.compress(state, scheme)
    assert ours["weight"].dtype == theirs["weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(ours["weight"].view(torch.uint8), theirs["weight"].view(torch.uint8))
    assert torch.equal(NaiveQuantizationCompressor.decompress(ours, scheme)["weight"], qt.dequantize())


# -- round trips through transformers and back --------------------------------------------------


@pytest.mark.parametrize("case", list(CODECS))
def test_transformers_loads_export(tiny_model, char_tokenizer, tmp_path: Path, case: str) -> None:
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS[case]})
    out = save_compressed_tensors(loaded, tmp_path / "q")
    # transformers 5.23 with compressed-tensors 0.20 cannot load packed asymmetric zero points on its
    # default path (it allocates them unpacked: a size mismatch, for compressed-tensors' own files
    # too); its load-time dequantization reads them.
    asym = not CODECS[case].get("symmetric", True)
    _assert_transformers_weights(out, loaded, dequantize=asym)


@pytest.mark.parametrize("case", list(CODECS))
def test_import_round_trip(tiny_model, char_tokenizer, tmp_path: Path, case: str) -> None:
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS[case]})
    out = save_compressed_tensors(loaded, tmp_path / "q", source="the-source")
    back = load_compressed_tensors(out)
    _assert_same_quantized(loaded.model, back.model)
    assert torch.equal(_logits(back.model), _logits(loaded.model))
    assert back.model.lowbit_recipe == loaded.model.lowbit_recipe
    assert back.source == "the-source" and back.path == out
    assert back.tokenizer("Hi", add_special_tokens=False)["input_ids"] == [42, 75]


def test_folder_contents(tiny_model, char_tokenizer, tmp_path: Path) -> None:
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS["int4-g32-sym"]}, tie_word_embeddings=True)
    out = save_compressed_tensors(loaded, tmp_path / "q")
    assert is_compressed_tensors_folder(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.json", ct.MARKER} <= names
    assert _leftovers(tmp_path, "q") == [out]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    assert qc["config_groups"] == {"group_0": {
        "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                    "dynamic": False},
    }}
    t = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.mlp.down_proj"
    assert t[f"{q}.weight_packed"].dtype == torch.int32 and t[f"{q}.weight_packed"].shape == (64, 128 * 4 // 32)
    assert t[f"{q}.weight_scale"].dtype == torch.float16 and t[f"{q}.weight_scale"].shape == (64, 4)
    assert t[f"{q}.weight_shape"].tolist() == [64, 128]
    assert f"{q}.weight" not in t and f"{q}.weight_zero_point" not in t  # symmetric: no zero point
    assert "model.embed_tokens.weight" in t and "lm_head.weight" not in t  # tied: stored once
    assert t["model.embed_tokens.weight"].dtype == torch.float16  # the recipe's dense dtype


def test_mixed_codecs_and_dense_linears(tiny_model, char_tokenizer, tmp_path: Path) -> None:
    # int4 symmetric: transformers' load-time dequantization (the only path that reads asymmetric zero
    # points) applies one scheme to every module, so it cannot load asymmetric int mixed with fp8.
    recipe = {"codec": CODECS["int4-g32-sym"], "rules": [{"match": "*mlp*", "codec": CODECS["fp8-channel"]}],
              "ignore": ["*.o_proj"]}
    loaded = _quantized(tiny_model, char_tokenizer, recipe, family="qwen2")  # linears with biases
    out = save_compressed_tensors(loaded, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    assert sorted(g["format"] for g in qc["config_groups"].values()) == ["float-quantized", "pack-quantized"]
    assert not any("o_proj" in n for g in qc["config_groups"].values() for n in g["targets"])
    _assert_transformers_weights(out, loaded)
    back = load_compressed_tensors(out)
    _assert_same_quantized(loaded.model, back.model)
    assert torch.equal(_logits(back.model), _logits(loaded.model))


def _calibration() -> CalibrationSet:
    gen = torch.Generator().manual_seed(0)
    return CalibrationSet(tokens=torch.randint(2, 256, (4, 16), generator=gen), source="random")


def test_gptq_act_order_with_static_groups(tiny_model, char_tokenizer, tmp_path: Path) -> None:
    recipe = {"codec": CODECS["int4-g32-sym"], "algorithm": {"name": "gptq", "act_order": True}}
    loaded = _quantized(tiny_model, char_tokenizer, recipe, calibration=_calibration())
    assert not any("g_idx" in m.parts for m in _quant_linears(loaded.model).values())
    out = save_compressed_tensors(loaded, tmp_path / "q")
    _assert_transformers_weights(out, loaded)
    _assert_same_quantized(loaded.model, load_compressed_tensors(out).model)


def test_g_idx_refused_but_read_from_older_files(  # type: ignore[no-untyped-def]
    tiny_model, char_tokenizer, tmp_path: Path, monkeypatch
) -> None:
    gptq = {"name": "gptq", "act_order": True, "static_groups": False}
    recipe = {"codec": CODECS["int4-g32-asym"], "algorithm": gptq}
    loaded = _quantized(tiny_model, char_tokenizer, recipe, calibration=_calibration())
    quantized = _quant_linears(loaded.model)
    assert all("g_idx" in m.parts for m in quantized.values())
    with pytest.raises(LowbitError, match=r"g_idx.*static_groups.*GPTQ layout"):
        save_compressed_tensors(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []

    # What compressed-tensors <= 0.18 wrote: codes in column order, scales per group, and
    # NAME.weight_g_idx (the group of each column) with actorder "group".
    monkeypatch.setattr(ct, "_export_problem", lambda *args: None)
    out = save_compressed_tensors(loaded, tmp_path / "q")
    monkeypatch.undo()

    def edit(t: dict[str, torch.Tensor], qc: dict[str, Any]) -> None:
        for name, m in quantized.items():
            t[f"{name}.weight_g_idx"] = m.qweight_g_idx
        qc["config_groups"]["group_0"]["weights"]["actorder"] = "group"
        qc["version"] = "0.18.0"

    _rewrite(out, edit)
    back = load_compressed_tensors(out)
    _assert_same_quantized(loaded.model, back.model)
    assert torch.equal(_logits(back.model), _logits(loaded.model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_foreign_checkpoint_written_by_compressed_tensors(tiny_model, char_tokenizer, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          dtype: torch.dtype) -> None:
    """A folder written by compressed-tensors' own compressor (as llm-compressor does), from a bf16
    or a float32 model (scales in its dtype; float32 ones are not fp16's): lowbit reads weights equal
    to compressed-tensors' own decompression in float32, its scales kept in their dtype."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = tiny_model("llama").to(dtype)
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            groups = m.weight.detach().float().unflatten(-1, (-1, 32))
            scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            m.weight_scale.data.copy_(scale)
            m.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    out = tmp_path / "foreign"
    model.config.save_pretrained(out)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    compressor.update_config(str(out))
    char_tokenizer.save_pretrained(out)

    assert is_compressed_tensors_folder(out)
    back = load_compressed_tensors(out)
    quantized = _quant_linears(back.model)
    assert len(quantized) == 14 and "lm_head" not in quantized
    for name, m in quantized.items():
        dtype_name = str(dtype).removeprefix("torch.")
        assert m.codec == IntCodec(bits=4, symmetric=False, group_size=32, scale_dtype=dtype_name).model_dump()
        assert m.qweight.data["scale"].dtype == dtype
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        local["weight_scale"] = local["weight_scale"].to(torch.float32)  # exact from bf16 too
        want = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert torch.equal(m.weight, want), name
    assert getattr(back.model, "lowbit_recipe", None) is None and back.source == str(out)
    assert back.model.lm_head.weight.dtype == torch.float32
    assert torch.equal(back.model.lm_head.weight, tensors["lm_head.weight"].float())


def _legacy_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors <= 0.17: ``32 // bits`` codes per int32 word, none straddling two."""
    per = 32 // bits
    rows, n = codes.shape
    c = F.pad(codes.to(torch.int64), (0, (-n) % per)).view(rows, -1, per)
    words = (c << (torch.arange(per) * bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("version", ["0.17.1", None], ids=["versioned", "by-width"])
def test_reads_pre_0_18_packing(tiny_model, char_tokenizer, tmp_path: Path, version: str | None) -> None:
    codec = {"name": "int", "bits": 3, "symmetric": False, "group_size": 32}
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": codec})
    out = save_compressed_tensors(loaded, tmp_path / "q")

    def edit(t: dict[str, torch.Tensor], qc: dict[str, Any]) -> None:
        for name, m in _quant_linears(loaded.model).items():
            w, zp = t[f"{name}.weight_packed"], t[f"{name}.weight_zero_point"]
            t[f"{name}.weight_packed"] = _legacy_pack(ct.unpack_rows(w, 3, m.in_features), 3)
            t[f"{name}.weight_zero_point"] = _legacy_pack(ct.unpack_rows(zp.t(), 3, m.out_features), 3).t().contiguous()
            assert t[f"{name}.weight_packed"].shape != w.shape  # the two layouts differ at 3 bits
        if version is None:
            del qc["version"]
        else:
            qc["version"] = version

    _rewrite(out, edit)
    _assert_same_quantized(loaded.model, load_compressed_tensors(out).model)


# -- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "match"),
    [
        ({"name": "nf4", "block_size": 64, "double_quant": False},
         "'nf4' has no compressed-tensors layout.*lowbit's own"),
        ({"name": "mxfp4"}, "'mxfp4' has no compressed-tensors layout"),
        ({"name": "q4_0"}, "'q4_0'.*GGUF file"),
        ({"name": "int", "bits": 4, "symmetric": False, "zero_point": "float", "group_size": 32}, "float zero point"),
        ({"name": "fp8", "fmt": "e5m2"}, "E4M3 only"),
    ],
    ids=["nf4", "mxfp4", "q4_0", "int-float-zero", "fp8-e5m2"],
)
def test_unsupported_codec_refused_before_writing(  # type: ignore[no-untyped-def]
    tiny_model, char_tokenizer, tmp_path: Path, codec: dict, match: str
) -> None:
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": codec})
    qt = next(iter(_quant_linears(loaded.model).values())).qweight
    reason = unsupported_reason(qt.codec)
    assert reason is not None and "\n" not in reason
    with pytest.raises(LowbitError, match=match):
        save_compressed_tensors(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_supported_codecs_have_no_reason() -> None:
    for codec in CODECS.values():
        assert unsupported_reason(Recipe.from_dict({"codec": codec}).codec.model_dump()) is None


def test_ragged_groups_are_stored_as_finer_whole_groups(tiny_model, char_tokenizer, tmp_path: Path) -> None:
    # compressed-tensors' decompression raises "tensor column shape must be divisible" on a shorter
    # last group: 64 columns in groups of 48 are written as groups of 16 repeating their scales
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": {"name": "int", "bits": 4, "group_size": 48}})
    out = save_compressed_tensors(loaded, tmp_path / "q")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 16
    _assert_transformers_weights(out, loaded, dequantize=False)
    back = load_compressed_tensors(out)
    for name, m in _quant_linears(loaded.model).items():
        assert torch.equal(back.model.get_submodule(name).weight, m.weight)


def test_conv1d_linears_refused(tiny_model, char_tokenizer, tmp_path: Path) -> None:
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS["int4-g32-sym"]}, family="gpt2")
    with pytest.raises(LowbitError, match="nn.Linear layers only.*Conv1D"):
        save_compressed_tensors(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_quantized_embedding_refused(tiny_model, char_tokenizer, tmp_path: Path) -> None:
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": {"name": "q8_0"}, "embedding": {"name": "q8_0"}})
    with pytest.raises(LowbitError, match="quantized token embedding"):
        save_compressed_tensors(loaded, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_unquantized_model_refused(tiny_model, char_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="not quantized"):
        save_compressed_tensors(LoadedModel(tiny_model("llama"), char_tokenizer, "x", None), tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


# -- broken folders -----------------------------------------------------------------------------


def _rewrite(folder: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the folder's tensors and quantization_config."""
    tensors = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    edit(tensors, config["quantization_config"])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture
def saved(tiny_model, char_tokenizer, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS["int4-g32-asym"]})
    return save_compressed_tensors(loaded, tmp_path / "q")


UP = "model.layers.0.mlp.up_proj"


def _group0(qc: dict[str, Any]) -> dict[str, Any]:
    return qc["config_groups"]["group_0"]


BROKEN: dict[str, tuple[Callable[[dict[str, torch.Tensor], dict[str, Any]], None], str]] = {
    "missing-scale": (lambda t, qc: t.pop(f"{UP}.weight_scale"), f"missing tensor {UP}.weight_scale"),
    "short-packed": (lambda t, qc: t.__setitem__(f"{UP}.weight_packed", t[f"{UP}.weight_packed"][:, :-1].clone()),
                     f"{UP}.weight_packed is torch.int32"),
    "zero-dtype": (lambda t, qc: t.__setitem__(f"{UP}.weight_zero_point", t[f"{UP}.weight_zero_point"].to(torch.int8)),
                   f"{UP}.weight_zero_point is torch.int8 .* expected packed int32"),
    "float64-scale": (lambda t, qc: t.__setitem__(f"{UP}.weight_scale", t[f"{UP}.weight_scale"].double()),
                      "weight_scale has shape .* and dtype torch.float64"),
    "unexpected": (lambda t, qc: t.__setitem__("model.extra.weight", torch.zeros(3)),
                   r"unexpected tensors.*model\.extra"),
    "missing-dense": (lambda t, qc: t.pop("model.norm.weight"), r"missing tensors.*model\.norm\.weight"),
    "w8a8-no-scale": (lambda t, qc: _group0(qc).__setitem__("input_activations", {"num_bits": 8, "type": "int"}),
                      f"missing tensor model.layers.0.self_attn.q_proj.input_scale"),
    "a4-groups": (lambda t, qc: _group0(qc).__setitem__("input_activations", {"num_bits": 4, "type": "int", "strategy": "group",
                                                                             "group_size": 32, "dynamic": True}),
                  "4-bit int inputs, strategy 'group', dynamic: lowbit reads int8 and fp8 inputs"),
    "outputs": (lambda t, qc: _group0(qc).__setitem__("output_activations", {"num_bits": 8}), "output_activations"),
    "format": (lambda t, qc: _group0(qc).__setitem__("format", "nvfp4-pack-quantized"),
               "'nvfp4-pack-quantized' is not read"),
    "block": (lambda t, qc: _group0(qc)["weights"].update(strategy="block", group_size=None, block_structure=[32, 32]),
              "strategy 'block'"),
    "1-bit": (lambda t, qc: _group0(qc)["weights"].update(num_bits=1), "1-bit int weights"),
    "kv-cache-scales": (lambda t, qc: qc.__setitem__("kv_cache_scheme", {"num_bits": 8, "type": "float"}),
                        "k_scale and v_scale for every attention module"),
    "kv-cache-int": (lambda t, qc: qc.__setitem__("kv_cache_scheme", {"num_bits": 4, "type": "int"}),
                     "lowbit reads the static per-tensor FP8 cache"),
    "status": (lambda t, qc: qc.__setitem__("quantization_status", "frozen"), "not stored compressed"),
    "no-match": (lambda t, qc: _group0(qc).__setitem__("targets", ["Embedding"]), "quantized Embedding"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folder(saved: Path, case: str) -> None:
    edit, match = BROKEN[case]
    _rewrite(saved, edit)
    with pytest.raises(LowbitError, match=match) as ei:
        load_compressed_tensors(saved)
    assert "\n" not in str(ei.value)


def test_missing_and_corrupt_files(saved: Path) -> None:
    st = saved / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-1000])
    with pytest.raises(LowbitError, match="corrupt safetensors"):
        load_compressed_tensors(saved)
    st.unlink()
    with pytest.raises(LowbitError, match="missing model.safetensors"):
        load_compressed_tensors(saved)
    st.write_bytes(data)
    config = saved / "config.json"
    text = config.read_text()
    config.write_text("{broken")
    assert not is_compressed_tensors_folder(saved)
    with pytest.raises(LowbitError, match="not valid JSON: line 1, column 2"):
        load_compressed_tensors(saved)
    cfg = json.loads(text)
    del cfg["quantization_config"]
    config.write_text(json.dumps(cfg))
    assert not is_compressed_tensors_folder(saved)
    with pytest.raises(LowbitError, match="no compressed-tensors quantization_config"):
        load_compressed_tensors(saved)
    config.unlink()
    assert not is_compressed_tensors_folder(saved)
    with pytest.raises(LowbitError, match="no config.json"):
        load_compressed_tensors(saved)


# -- quantized inputs (W8A8, FP8 dynamic) ----------------------------------------------------------

W8 = {"name": "int", "bits": 8, "granularity": "channel", "group_size": None}
INPUTS: dict[str, dict[str, Any]] = {
    "w8a8-dynamic": {"codec": W8, "activations": {}},
    "w8a8-static": {"codec": W8, "activations": {"dynamic": False}},
    "w8a8-static-asym-w-asym": {"codec": {**W8, "symmetric": False}, "activations": {"dynamic": False, "symmetric": False}},
    "fp8-dynamic": {"codec": {"name": "fp8", "granularity": "channel"}, "activations": {"format": "fp8_e4m3"}},
    "w4a8-dynamic": {"codec": CODECS["int4-g32-sym"], "activations": {}},
}


@pytest.mark.parametrize("case", list(INPUTS))
def test_quantized_inputs_round_trip(tiny_model, char_tokenizer, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    calib = CalibrationSet(tokens=torch.randint(2, 99, (4, 20), generator=torch.Generator().manual_seed(1)), source="random")
    loaded = _quantized(tiny_model, char_tokenizer, INPUTS[case], calibration=calib)
    out = save_compressed_tensors(loaded, tmp_path / "q", source="the-source")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    acts = group["input_activations"]
    static = not INPUTS[case]["activations"].get("dynamic", True)
    assert acts["dynamic"] is (not static) and acts["strategy"] == ("tensor" if static else "token")
    assert group["format"] == {"w8a8": "int-quantized", "fp8-": "float-quantized", "w4a8": "pack-quantized"}[case[:4]]
    tensors = load_file(str(out / "model.safetensors"))
    q_proj = "model.layers.0.self_attn.q_proj"
    assert (f"{q_proj}.input_scale" in tensors) is static
    if group["format"] == "int-quantized":
        assert tensors[f"{q_proj}.weight"].dtype == torch.int8
    back = load_compressed_tensors(out)
    _assert_same_quantized(loaded.model, back.model)
    for name, m in _quant_linears(loaded.model).items():
        b = _quant_linears(back.model)[name]
        assert b.input_quant == m.input_quant, name
        assert (b.input_scale is None) == (m.input_scale is None), name
        for k, v in (m.input_scale or {}).items():
            assert torch.equal(b.input_scale[k], v), name  # type: ignore[index]
    assert torch.equal(_logits(back.model), _logits(loaded.model))
    assert back.model.lowbit_recipe == loaded.model.lowbit_recipe


def test_input_quantization_it_cannot_hold_is_refused_before_writing(tiny_model, char_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io.formats import check_layout

    for acts, why in (({"granularity": "group", "group_size": 16}, "dynamic per-group"),
                      ({"outlier_threshold": 6.0}, "LLM.int8"), ({"format": "fp8_e5m2"}, "fp8_e5m2"),
                      ({"dynamic": False, "outlier_channels": 4}, "fixed 16-bit input channels")):
        recipe = Recipe.from_dict({"codec": W8, "activations": acts})
        with pytest.raises(LowbitError, match=why):
            check_layout("compressed-tensors", recipe, tiny_model("llama"))
    recipe = Recipe.from_dict({"codec": W8, "activations": {}})
    for layout in ("gguf", "gptq", "awq"):
        with pytest.raises(LowbitError, match="weights only"):
            check_layout(layout, recipe, tiny_model("llama"))


# -- the FP8 KV cache (kv_cache_scheme) --------------------------------------------------------------


def test_fp8_kv_cache_scheme_round_trip(tiny_model, char_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from lowbit.evaluation.kv_cache import emulated, resolve_kv_cache
    from lowbit.modules.kv_cache import kv_scales

    calib = CalibrationSet(tokens=IDS, source="ids")
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS["int8-channel-sym"], "kv_cache": "fp8-static"},
                        calibration=calib)
    scales = kv_scales(loaded.model)
    assert len(scales) == loaded.model.config.num_hidden_layers
    out = save_compressed_tensors(loaded, tmp_path / "q", source="the-source")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                     "symmetric": True}
    tensors = load_file(str(out / "model.safetensors"))
    for name, (k, v) in scales.items():
        for attr, want in (("k_scale", k), ("v_scale", v)):
            t = tensors[f"{name}.{attr}"]
            assert t.dtype == torch.float32 and t.shape == (1,) and float(t) == pytest.approx(want, rel=1e-7)
    back = load_compressed_tensors(out)
    assert kv_scales(back.model).keys() == scales.keys()
    for name, (k, v) in scales.items():
        assert kv_scales(back.model)[name] == pytest.approx((k, v), rel=1e-7)
    assert back.model.lowbit_recipe.kv_cache == loaded.model.lowbit_recipe.kv_cache
    # a folder without lowbit's recipe (anyone's export): the scheme alone says which cache
    (out / "recipe.json").unlink()
    foreign = load_compressed_tensors(out)
    kv = resolve_kv_cache(foreign.model, None)
    assert kv is not None and kv.keys.static and kv.keys.format == "fp8_e4m3" and kv.residual == 0
    with torch.no_grad(), emulated(foreign.model, kv):
        ours = foreign.model(input_ids=IDS).logits
    with torch.no_grad():
        plain = foreign.model(input_ids=IDS).logits
    assert (ours - plain).abs().max() > 1e-4  # the cache really is quantized
    # compressed-tensors reads the scheme as the static per-tensor FP8 arguments vLLM runs, and its
    # fake quantization with a stored scale is lowbit's cache codec, bit for bit
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    args = QuantizationConfig.model_validate(qc).kv_cache_scheme
    assert args is not None and args.strategy == "tensor" and not args.dynamic and args.type == "float"
    name, (k, _) = next(iter(scales.items()))
    keys = torch.randn(2, 4, 20, 16, generator=torch.Generator().manual_seed(3)) * 0.3
    theirs = fake_quantize(keys, tensors[f"{name}.k_scale"], torch.zeros(1), args)
    assert torch.equal(theirs, kv.keys.quantizer(k).fake_quantize(keys))
    # transformers loads the folder (its weights; it runs the cache unquantized, as vLLM's
    # kv_cache_dtype=auto would)
    _, loaded_by_transformers = _transformers(out)
    torch.testing.assert_close(loaded_by_transformers, plain, rtol=0, atol=ATOL)


def test_other_kv_caches_are_not_written(tiny_model, char_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS["int8-channel-sym"], "kv_cache": "fp8"})
    with pytest.warns(UserWarning, match="KV cache is not written.*static scales"):
        out = save_compressed_tensors(loaded, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_scheme"] is None


@pytest.mark.parametrize("case", ["asymmetric", "int8", "lone-scale", "no-scheme"])
def test_bad_kv_cache_schemes(tiny_model, char_tokenizer, tmp_path: Path, case: str) -> None:  # type: ignore[no-untyped-def]
    calib = CalibrationSet(tokens=IDS, source="ids")
    loaded = _quantized(tiny_model, char_tokenizer, {"codec": CODECS["int8-channel-sym"], "kv_cache": "fp8-static"},
                        calibration=calib)
    out = save_compressed_tensors(loaded, tmp_path / "q")
    edits = {
        "asymmetric": (lambda t, qc: qc["kv_cache_scheme"].__setitem__("symmetric", False), "lowbit reads the static"),
        "int8": (lambda t, qc: qc["kv_cache_scheme"].__setitem__("type", "int"), "lowbit reads the static"),
        "lone-scale": (lambda t, qc: t.pop("model.layers.1.self_attn.v_scale"), "only one of k_scale and v_scale"),
        "no-scheme": (lambda t, qc: qc.__setitem__("kv_cache_scheme", None), "has no kv_cache_scheme"),
    }
    edit, message = edits[case]
    _rewrite(out, edit)
    with pytest.raises(LowbitError, match=message):
        load_compressed_tensors(out)
