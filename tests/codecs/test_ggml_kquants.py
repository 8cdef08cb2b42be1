"""llama.cpp's k-quants against gguf-py's dequantizer and llama.cpp's own quantizer (its bytes for
fixed inputs, stored by scripts/make_kquant_fixture.py from libggml's ggml_quantize_chunk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from lowbit.codecs import QuantizedTensor, codec_from_dict
from lowbit.codecs.ggml_kquants import GGMLKQuantCodec
from lowbit.io.ggml_blocks import BLOCK_BYTES, from_ggml_blocks, to_ggml_blocks

from codec_references import per_value_importance, student_t

TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
FIXTURE = Path(__file__).resolve().parents[1] / "data" / "kquants_llama_cpp.npz"


def codec(name: str) -> GGMLKQuantCodec:
    c = codec_from_dict({"name": name})
    assert isinstance(c, GGMLKQuantCodec)
    return c


def weights(kind: str) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(12, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    w = student_t((12, 512), df=3, seed=1) * 0.02
    w[3, :256] = 0  # an all-zero super-block
    w[5, 256:] = 0.5  # a constant one
    w[7, 16:48] = 0  # zero sub-blocks inside a live super-block
    return w


def decode_theirs(raw: np.ndarray, c: GGMLKQuantCodec, rows: int) -> np.ndarray:
    return dequantize(raw.reshape(rows, -1), GGMLQuantizationType[c.ggml_type])


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed"])
@pytest.mark.parametrize("name", TYPES)
def test_gguf_py_decodes_our_bytes_to_our_values(name: str, kind: str) -> None:
    c = codec(name)
    w = weights(kind)
    for qt in (c.quantize(w), c.quantize(w, importance=torch.rand(512) + 0.1)):
        raw = to_ggml_blocks(qt, c)
        np.testing.assert_array_equal(decode_theirs(raw.numpy(), c, 12), c.dequantize(qt).numpy())
        back = from_ggml_blocks(raw.reshape(-1), c, (12, 512))
        assert all(torch.equal(back.data[k], qt.data[k]) for k in qt.data)


@pytest.fixture(scope="module")
def llama_cpp() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("imatrix", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_reads_and_rewrites_llama_cpps_bytes(name: str, imatrix: bool, llama_cpp: dict) -> None:
    c = codec(name)
    theirs = llama_cpp[c.ggml_type + ("_imatrix" if imatrix else "")]
    rows, cols = llama_cpp["x"].shape
    qt = from_ggml_blocks(torch.from_numpy(theirs.reshape(-1)), c, (rows, cols))
    np.testing.assert_array_equal(c.dequantize(qt).numpy(), decode_theirs(theirs, c, rows))
    assert torch.equal(to_ggml_blocks(qt, c), torch.from_numpy(theirs))


@pytest.mark.parametrize("imatrix", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_no_worse_than_llama_cpps_quantizer(name: str, imatrix: bool, llama_cpp: dict) -> None:
    """Squared error (weighted as llama.cpp's search weighs it when an importance matrix is
    given: the imatrix times each value's damping term) of lowbit's quantizer against llama.cpp's
    on the same values."""
    c = codec(name)
    x = torch.from_numpy(llama_cpp["x"])
    imp = per_value_importance(c, x, torch.from_numpy(llama_cpp["imatrix"])) if imatrix else torch.ones_like(x)
    theirs = torch.from_numpy(decode_theirs(llama_cpp[c.ggml_type + ("_imatrix" if imatrix else "")], c, x.shape[0]))
    ours = c.dequantize(c.quantize(x, importance=torch.from_numpy(llama_cpp["imatrix"]) if imatrix else None))
    err = lambda v: float(((v - x).double().square() * imp).sum())  # noqa: E731
    assert err(ours) <= err(theirs), (err(ours), err(theirs))
    # per row too, on most rows (under llama.cpp's own weights its Q2_K and Q3_K searches win a
    # row now and then: lowbit is lower on 84-94% of this fixture's rows, and in total)
    row_err = lambda v: ((v - x).double().square() * imp).sum(1)  # noqa: E731
    assert float((row_err(ours) <= row_err(theirs) * 1.001).float().mean()) >= 0.8


@pytest.mark.parametrize("name", TYPES)
def test_stored_size_is_ggml_block_size(name: str) -> None:
    c = codec(name)
    qt = c.quantize(weights("normal"))
    assert qt.nbytes == c.nbytes((12, 512)) == 12 * 2 * BLOCK_BYTES[c.ggml_type]
    again = QuantizedTensor.from_state_dict(qt.header(), qt.state_dict("w"), "w")  # checks the byte count
    assert torch.equal(c.dequantize(again), c.dequantize(qt))


def test_bits_per_weight_are_llama_cpps() -> None:
    bpw = {n: codec(n).quantize(weights("normal")).bits_per_weight for n in TYPES}
    assert bpw == {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}


def test_rows_must_be_whole_super_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        codec("q4_k").quantize(torch.randn(4, 576))


@pytest.mark.parametrize("name", TYPES)
def test_search_beats_the_plain_fit(name: str) -> None:
    c = codec(name)
    w = weights("heavy-tailed")
    plain = c.fake_quantize(w)
    searched = c.dequantize(c.quantize(w))
    assert float((searched - w).square().sum()) < float((plain - w).square().sum())


@pytest.mark.parametrize("name", TYPES)
def test_importance_weights_are_llama_cpps(name: str) -> None:
    """ggml-quants.c's quantize_row_<type>_impl: qw * sqrt(k * mean(x^2 over the 256-value
    super-block) + x^2), k = 1 for Q2_K and 2 for Q3_K/Q4_K/Q5_K; Q6_K takes qw as is."""
    c = codec(name)
    w = weights("heavy-tailed").double()
    imatrix = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 4
    k = {"q2_k": 1.0, "q3_k": 2.0, "q4_k": 2.0, "q5_k": 2.0}.get(name)
    expected = torch.empty_like(w)
    for r in range(w.shape[0]):
        for s in range(0, w.shape[1], 256):
            sigma2 = sum(float(v) ** 2 for v in w[r, s : s + 256]) / 256
            for j in range(s, s + 256):
                expected[r, j] = imatrix[j] * (1.0 if k is None else (k * sigma2 + float(w[r, j]) ** 2) ** 0.5)
    got = per_value_importance(c, w.float(), imatrix.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
