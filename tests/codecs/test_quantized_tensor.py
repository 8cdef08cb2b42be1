"""QuantizedTensor: header + state dict round trip, and the byte-size check on load."""

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


def test_from_state_dict_checks_sizes() -> None:
    qt, _ = _qt()
    header = qt.header()
    sd = qt.state_dict("w")
    short = dict(sd)
    short["w.codes"] = sd["w.codes"][:-1]
    with pytest.raises(ValueError, match="bytes"):
        QuantizedTensor.from_state_dict(header, short, "w")
    wrong_dtype = dict(sd)
    wrong_dtype["w.scale"] = sd["w.scale"].float()  # fp32 scale: twice the bytes the codec declares
    with pytest.raises(ValueError, match="bytes"):
        QuantizedTensor.from_state_dict(header, wrong_dtype, "w")
    missing = {k: v for k, v in sd.items() if k != "w.zero"}
    with pytest.raises(ValueError, match="missing parts"):
        QuantizedTensor.from_state_dict(header, missing, "w")
    # another header (other shape) for the same tensors
    other = json.loads(header)
    other["shape"] = [24, 101]
    with pytest.raises(ValueError, match="bytes"):
        QuantizedTensor.from_state_dict(json.dumps(other), sd, "w")
    bad_codec = json.loads(header)
    bad_codec["codec"]["name"] = "nope"
    with pytest.raises(ValueError, match="unknown codec"):
        QuantizedTensor.from_state_dict(json.dumps(bad_codec), sd, "w")
