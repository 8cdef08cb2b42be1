"""QuantizedTensor: header + state dict round trip, and the checks of a stored tensor on load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lowbit.codecs import IntCodec, QuantizedTensor


def _qt(symmetric: bool = False) -> tuple[QuantizedTensor, torch.Tensor]:
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(0))
    return IntCodec(bits=3, symmetric=symmetric, group_size=32).quantize(w), w


@pytest.mark.parametrize("symmetric", [True, False])
def test_header_and_state_dict_round_trip(tmp_path, symmetric: bool) -> None:  # type: ignore[no-untyped-def]
    qt, w = _qt(symmetric)
    header = qt.header()
    meta = json.loads(header)
    assert meta["shape"] == [24, 100]
    assert meta["codec"] == IntCodec(bits=3, symmetric=symmetric, group_size=32).model_dump()
    assert meta["parts"] == (["codes", "scale"] if symmetric else ["codes", "scale", "zero"])
    sd = qt.state_dict("model.layers.0.mlp.up_proj.weight")
    assert set(sd) == {f"model.layers.0.mlp.up_proj.weight.{p}" for p in meta["parts"]}
    # through an actual safetensors file, with the header as metadata
    save_file(sd, str(tmp_path / "t.safetensors"), metadata={"h": header})
    back = QuantizedTensor.from_state_dict(header, load_file(str(tmp_path / "t.safetensors")),
                                           "model.layers.0.mlp.up_proj.weight")
    assert back.shape == (24, 100) and back.codec == qt.codec
    assert all(torch.equal(back.data[k], qt.data[k]) and back.data[k].dtype == qt.data[k].dtype for k in qt.data)
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.nbytes == qt.nbytes == IntCodec(bits=3, symmetric=symmetric, group_size=32).nbytes((24, 100))


def test_dequantize_dtype_and_error() -> None:
    qt, w = _qt()
    assert qt.dequantize().dtype == torch.float32
    assert qt.dequantize(torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(qt.dequantize(torch.float16), qt.dequantize().to(torch.float16))
    assert qt.numel == 2400
    assert qt.bits_per_weight == pytest.approx(8 * qt.nbytes / 2400)
    # dequantization is a quantization of w, not w itself, and close to it
    err = (qt.dequantize() - w).abs()
    assert err.max() > 0
    assert err.max() <= qt.data["scale"].float().max() * 0.5 * 1.01


def test_from_state_dict_checks_every_part() -> None:
    qt, _ = _qt()
    header = qt.header()
    sd = qt.state_dict("w")
    short = dict(sd)
    short["w.codes"] = sd["w.codes"][:-1]
    with pytest.raises(ValueError, match=r"w.codes is uint8 \[899\], but int3 g32 asym stores uint8 \[900\] for a "
                       r"24x100 weight"):
        QuantizedTensor.from_state_dict(header, short, "w")
    wrong_dtype = dict(sd)
    wrong_dtype["w.scale"] = sd["w.scale"].float()
    with pytest.raises(ValueError, match=r"w.scale is float32 \[24, 4\], but .* stores float16 \[24, 4\]"):
        QuantizedTensor.from_state_dict(header, wrong_dtype, "w")
    same_bytes = dict(sd)  # the right number of bytes in the wrong shape
    same_bytes["w.scale"] = sd["w.scale"].reshape(4, 24)
    with pytest.raises(ValueError, match=r"w.scale is float16 \[4, 24\]"):
        QuantizedTensor.from_state_dict(header, same_bytes, "w")
    missing = {k: v for k, v in sd.items() if k != "w.zero"}
    with pytest.raises(ValueError, match="missing tensor w.zero"):
        QuantizedTensor.from_state_dict(header, missing, "w")
    # another header (other shape) for the same tensors
    other = json.loads(header)
    other["shape"] = [24, 101]
    with pytest.raises(ValueError, match="for a 24x101 weight"):
        QuantizedTensor.from_state_dict(json.dumps(other), sd, "w")
    bad_codec = json.loads(header)
    bad_codec["codec"]["name"] = "nope"
    with pytest.raises(ValueError, match="unknown codec"):
        QuantizedTensor.from_state_dict(json.dumps(bad_codec), sd, "w")


@pytest.mark.parametrize("header, match", [
    ("not json", "not JSON"), ("[1, 2]", "lacks the codec"), ('{"codec": {"name": "int"}, "parts": "codes"}', "lacks"),
    ('{"codec": {"name": "int"}, "parts": [], "shape": [24, -1]}', "not two positive integers"),
    ('{"codec": {"name": "int"}, "parts": [], "shape": [true, 1]}', "not two positive integers"),
    ('{"codec": {"name": ["int"]}, "parts": [], "shape": [24, 100]}', "unknown codec"),
    ('{"codec": {"name": "int", "bits": 99}, "parts": [], "shape": [24, 100]}', "codec: bits: Input should be"),
    ('{"codec": {"name": "int", "bits": 3, "group_size": 32, "symmetric": false}, "parts": ["codes", "scale"], '
     '"shape": [24, 100]}', r"parts \['codes', 'scale'\], but int3 g32 asym stores \['codes', 'scale', 'zero'\]"),
])
def test_damaged_headers_are_named(header: str, match: str) -> None:
    qt, _ = _qt()
    with pytest.raises(ValueError, match=match):
        QuantizedTensor.from_state_dict(header, qt.state_dict("w"), "w")


def _codec_variants():  # type: ignore[no-untyped-def]
    from lowbit.codecs import Codec, codec_from_dict

    variants = [codec_from_dict({"name": n}) for n in sorted(Codec.registry)]
    variants += [codec_from_dict(d) for d in (
        {"name": "int", "bits": 3, "symmetric": False, "group_size": 32},
        {"name": "int", "bits": 4, "symmetric": False, "zero_point": "float", "granularity": "channel"},
        {"name": "int", "bits": 8, "granularity": "tensor"}, {"name": "nf4", "double_quant": True},
        {"name": "fp8", "fmt": "e5m2", "granularity": "group", "group_size": 64})]
    return variants


@pytest.mark.parametrize("codec", _codec_variants(), ids=lambda c: c.describe())
@pytest.mark.parametrize("shape", [(6, 512), (3, 768), (5, 100)])
def test_stored_parts_are_what_pack_makes(codec, shape: tuple[int, int]) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io.ggml_blocks import BLOCK_BYTES, block_size

    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    try:
        qt = codec.quantize(w)
    except ValueError:  # e.g. k-quants need whole super-blocks of 256, ggml blocks of 32
        assert shape[1] % 32
        return
    expected = codec.stored_parts(shape)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qt.data.items()} == expected
    assert qt.nbytes == codec.nbytes(shape)
    ggml = getattr(codec, "ggml_type", None)
    if ggml is not None:  # and ggml's own block size, for the k-quants too
        assert qt.nbytes == shape[0] * shape[1] // block_size(ggml) * BLOCK_BYTES[ggml]
    assert QuantizedTensor.from_state_dict(qt.header(), qt.state_dict("w"), "w").data.keys() == qt.data.keys()
