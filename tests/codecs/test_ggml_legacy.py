"""llama.cpp's legacy block codecs against gguf-py's reference quantizer (ggml's rounding in
numpy) and its dequantizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lowbit.codecs import codec_from_dict
from lowbit.codecs.ggml_legacy import GGMLLegacyCodec
from lowbit.io.ggml_blocks import BLOCK_BYTES, to_ggml_blocks

from codec_references import per_value_importance, student_t

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def weights(kind: str) -> torch.Tensor:
    if kind == "normal":
        return torch.randn(16, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w = student_t((16, 256), df=3, seed=1) * 0.02
    w[3, 32:64] = 0  # an all-zero block
    w[5, 64:96] = 0.5  # a constant block
    return w


def codec(name: str) -> GGMLLegacyCodec:
    c = codec_from_dict({"name": name})
    assert isinstance(c, GGMLLegacyCodec)
    return c


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed"])
@pytest.mark.parametrize("name", TYPES)
def test_gguf_py_decodes_our_bytes_to_our_values(name: str, kind: str) -> None:
    c = codec(name)
    w = weights(kind)
    qt = c.quantize(w)
    raw = to_ggml_blocks(qt, c).numpy()
    theirs = dequantize(raw, GGMLQuantizationType[c.ggml_type])
    np.testing.assert_array_equal(theirs, c.dequantize(qt).numpy())


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed"])
@pytest.mark.parametrize("name", TYPES)
def test_no_worse_than_the_reference_quantizer(name: str, kind: str) -> None:
    c = codec(name)
    w = weights(kind)
    ours = c.fake_quantize(w)
    qtype = GGMLQuantizationType[c.ggml_type]
    ref = torch.from_numpy(dequantize(quantize(w.numpy(), qtype), qtype).copy())
    err_ours = float((ours - w).double().square().sum())
    err_ref = float((ref - w).double().square().sum())
    assert err_ours <= err_ref * (1 + 1e-9), (err_ours, err_ref)
    # the same grid as the reference: values differ only where a value sits at a rounding boundary
    assert float((ours != ref).float().mean()) < 0.02


@pytest.mark.parametrize("name", TYPES)
def test_stored_size_is_ggml_block_size(name: str) -> None:
    c = codec(name)
    assert c.nbytes((16, 256)) == 16 * 8 * BLOCK_BYTES[c.ggml_type]
    assert c.quantize(weights("normal")).nbytes == c.nbytes((16, 256))


def test_rows_must_be_whole_blocks() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        codec("q4_0").quantize(torch.randn(4, 48))


def test_q4_1_reencodes_its_own_decoded_values_exactly() -> None:
    c = codec("q4_1")
    qt = c.quantize(weights("heavy-tailed"))
    again = c.quantize(c.dequantize(qt))
    assert torch.equal(to_ggml_blocks(again, c), to_ggml_blocks(qt, c))


def _ref_make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> np.ndarray:
    """llama.cpp's make_qx_quants (rmse_type 1, with weights) for one block, as the values its
    Q4_0/Q5_0 block decodes to (fp16 scale)."""
    i = int(np.argmax(np.abs(x)))
    vmax = np.float32(x[i])
    if abs(vmax) < 1e-15:
        return np.zeros_like(x)

    def codes(iscale: float) -> np.ndarray:
        return np.clip(np.rint(np.float32(iscale) * x), -nmax, nmax - 1)

    L = codes(-nmax / vmax)
    sumlx, suml2 = float((w * x * L).sum()), float((w * L * L).sum())
    scale = sumlx / suml2 if suml2 else 0.0
    best = scale * sumlx
    for k in range(-9, 10):
        Lc = codes(-(nmax + 0.1 * k) / vmax)
        sumlx, suml2 = float((w * x * Lc).sum()), float((w * Lc * Lc).sum())
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L, scale = Lc, sumlx / suml2
            best = scale * sumlx
    return np.float32(np.float16(scale)) * L


def _ref_make_qkx3_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> np.ndarray:
    """llama.cpp's make_qkx3_quants(rmin -0.9, rdelta 0.05, nstep 36) for one block, as the
    values its Q4_1/Q5_1 block decodes to (fp16 scale and min)."""
    lo, hi = min(float(x.min()), 0.0), float(x.max())
    sum_w, sum_x = float(w.sum()), float((w * x).sum())
    if hi <= lo:
        return np.full_like(x, np.float32(np.float16(lo)))

    def codes(iscale: float) -> np.ndarray:
        return np.clip(np.rint(np.float32(iscale) * (x - lo)), 0, nmax)

    scale, vmin = (hi - lo) / nmax, lo
    L = codes(nmax / (hi - lo))
    best = float((w * (scale * L + vmin - x) ** 2).sum())
    for k in range(37):
        Lc = codes((-0.9 + 0.05 * k + nmax) / (hi - lo))
        sl, sl2, sxl = float((w * Lc).sum()), float((w * Lc * Lc).sum()), float((w * Lc * x).sum())
        det = sum_w * sl2 - sl * sl
        if det > 0:
            s, m = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
            if m > 0:
                s, m = sxl / sl2, 0.0
            err = float((w * (s * Lc + m - x) ** 2).sum())
            if err < best:
                L, best, scale, vmin = Lc, err, s, m
    return np.float32(np.float16(scale)) * L + np.float32(np.float16(vmin))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1"])
def test_importance_search_no_worse_than_llama_cpp(name: str) -> None:
    c = codec(name)
    w = weights("heavy-tailed")[:4]
    gen = torch.Generator().manual_seed(7)
    imatrix = torch.rand(w.shape[1], generator=gen) ** 4 + 1e-3  # skewed, as real activations are
    sigma2 = w.square().mean(dim=1, keepdim=True)
    per_value = imatrix * torch.sqrt(sigma2 + w.square())  # llama.cpp's weights from an imatrix
    groups = c.grouping.split(w)
    wg = c.grouping.split(per_value)
    ours = c.grouping.merge(c.quantize_dequantize(groups, c.fit_group_scales(groups, wg, torch.ones(1))), (4, 256))
    ref = c.fit_group_scales(groups, wg, None)
    theirs = np.stack([
        (_ref_make_qkx3_quants if c.affine else _ref_make_qx_quants)(b, c.qmax if c.affine else c.zero, wb)
        for b, wb in zip(groups.reshape(-1, 32).numpy(), wg.reshape(-1, 32).numpy())
    ]).reshape(4, 256)
    e_ours = float((per_value * (ours - w).square()).sum())
    e_theirs = float((per_value * (torch.from_numpy(theirs) - w).square()).sum())
    e_plain = float((per_value * (c.grouping.merge(c.quantize_dequantize(groups, ref), (4, 256)) - w).square()).sum())
    assert e_ours <= e_theirs * (1 + 1e-6), (e_ours, e_theirs)
    assert e_theirs < e_plain  # the port does search: it beats the plain reference fit


# llama.cpp's error weights under an imatrix (ggml-quants.c, quantize_row_<type>_impl): the row's
# mean square for the 32-block types; Q8_0 ignores the imatrix there, lowbit keeps it as is
@pytest.mark.parametrize("name", TYPES)
def test_importance_weights_are_llama_cpps(name: str) -> None:
    c = codec(name)
    w = weights("heavy-tailed").double()
    imatrix = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 4
    expected = torch.empty_like(w)
    for r in range(w.shape[0]):
        sigma2 = sum(float(v) ** 2 for v in w[r]) / w.shape[1]
        for j in range(w.shape[1]):
            expected[r, j] = imatrix[j] * (1.0 if name == "q8_0" else (sigma2 + float(w[r, j]) ** 2) ** 0.5)
    got = per_value_importance(c, w.float(), imatrix.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_quantize_searches_under_llama_cpps_weights() -> None:
    """``quantize(importance=...)`` is the search under llama.cpp's per-value weights, not under
    the bare imatrix: the two differ where one column's importance dwarfs the others."""
    c = codec("q4_0")
    w = weights("heavy-tailed")
    imatrix = torch.full((w.shape[1],), 1e-3)
    imatrix[::32] = 10.0  # one massive column per block, as a model's outlier features give
    g = c.grouping
    per_value = c.importance_weights(g.split(w), g.weights(tuple(w.shape), imatrix))
    ours = c.dequantize(c.quantize(w, importance=imatrix, shrink_grid=torch.ones(1)))
    groups = g.split(w)
    under = lambda wts: g.merge(c.quantize_dequantize(groups, c.fit_group_scales(groups, wts, torch.ones(1))), tuple(w.shape))  # noqa: E731
    assert torch.equal(ours, under(per_value))
    assert not torch.equal(ours, under(g.weights(tuple(w.shape), imatrix)))
