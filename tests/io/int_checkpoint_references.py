"""Shared by the GPTQ and AWQ layout tests: the consumers' unpacking, reimplemented on purpose in
another style than lowbit's (numpy, per-word shifts and masks, after AutoGPTQ's /
GPTQModel's ``dequantize_weight`` and AutoAWQ's ``dequantize_gemm``), and tiny quantized models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.models import LoadedModel
from lowbit.modules import QuantLinear
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe

IDS = torch.randint(2, 99, (2, 20), generator=torch.Generator().manual_seed(0))

# AutoGPTQ's 3-bit shift table: three words give 11 + 10 + 11 values after two fix-ups
_WF3 = np.array([
    [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
    [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
    [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0],
], dtype=np.uint32)


def _unpack_gptq_words(words: np.ndarray, bits: int) -> np.ndarray:
    """Unpack a 1-D run of uint32 words the way AutoGPTQ's CUDA-old fallback does."""
    out: list[int] = []
    if bits in (2, 4, 8):
        for word in words:
            for j in range(32 // bits):
                out.append(int((word >> np.uint32(bits * j)) & np.uint32((1 << bits) - 1)))
        return np.array(out, dtype=np.int64)
    assert bits == 3
    for k in range(0, len(words), 3):
        v = [(words[k + i] >> _WF3[i]).astype(np.uint32) for i in range(3)]
        v[0][10] = (v[0][10] & 0x3) | ((v[1][0] << 2) & 0x4)
        v[1][11] = (v[1][11] & 0x1) | ((v[2][0] << 1) & 0x6)
        v = [x & 0x7 for x in v]
        out.extend(int(x) for x in np.concatenate([v[0][:11], v[1][1:12], v[2][1:11]]))
    return np.array(out, dtype=np.int64)


def gptq_reference(parts: dict[str, torch.Tensor], bits: int, v2: bool = False) -> torch.Tensor:
    """``(out, in)`` float32 weight a GPTQ reader computes: ``(w - (z + 1)) * s`` (v1) or
    ``(w - z) * s`` (v2), ``w`` unpacked down each column of ``qweight``, ``z`` along each row
    of ``qzeros``, both picked by ``g_idx``."""
    qweight = parts["qweight"].numpy().view(np.uint32)
    qzeros = parts["qzeros"].numpy().view(np.uint32)
    scales = parts["scales"].to(torch.float32).numpy()
    g_idx = parts["g_idx"].numpy().astype(np.int64)
    w = np.stack([_unpack_gptq_words(qweight[:, o], bits) for o in range(qweight.shape[1])], axis=1)
    z = np.stack([_unpack_gptq_words(row, bits) for row in qzeros])
    if not v2:
        z = z + 1
    dense = np.empty(w.shape, dtype=np.float32)
    for c in range(w.shape[0]):
        g = g_idx[c]
        dense[c] = (w[c] - z[g]).astype(np.float32) * scales[g]
    return torch.from_numpy(dense.T.copy())


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def _unpack_awq_rows(words: np.ndarray) -> np.ndarray:
    """AutoAWQ's ``unpack_awq`` + ``reverse_awq_order`` for 4-bit: nibble j of every word,
    then each run of eight reordered."""
    rows, cols = words.shape
    nib = np.zeros((rows, cols * 8), dtype=np.int64)
    for j in range(8):
        nib[:, j::8] = (words >> np.uint32(4 * j)) & np.uint32(0xF)
    reverse = np.arange(cols * 8).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
    return nib[:, reverse]


def awq_reference(parts: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """``(out, in)`` float32 weight of AutoAWQ's ``dequantize_gemm``: ``(w - z) * s``, scales
    and zeros repeated ``group_size`` times down the input dimension (-1: the whole of it)."""
    w = _unpack_awq_rows(parts["qweight"].numpy().view(np.uint32))
    z = _unpack_awq_rows(parts["qzeros"].numpy().view(np.uint32))
    s = parts["scales"].to(torch.float32).numpy()
    repeat = w.shape[0] if group_size == -1 else group_size
    dense = (w - np.repeat(z, repeat, axis=0)).astype(np.float32) * np.repeat(s, repeat, axis=0)
    return torch.from_numpy(dense.T.copy())


def quantized_model(tiny_model, tokenizer, family: str, recipe: dict[str, Any], calibrate: bool = False,  # type: ignore[no-untyped-def]
                    **cfg: Any) -> LoadedModel:
    """A tiny random model of ``family`` quantized by lowbit with ``recipe`` (a recipe dict)."""
    from lowbit.calibration.samples import CalibrationSet

    model = tiny_model(family, **cfg)
    model.tie_weights()
    calibration = None
    if calibrate:
        tokens = torch.randint(2, 99, (4, 32), generator=torch.Generator().manual_seed(1))
        calibration = CalibrationSet(tokens=tokens, source="random")
    quantize_model(model, Recipe.from_dict(recipe), progress=False, calibration=calibration)
    return LoadedModel(model, tokenizer, f"tiny-{family}", None)


def logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=IDS).logits


def quant_linears(model) -> dict[str, QuantLinear]:  # type: ignore[no-untyped-def]
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def assert_same_quant_linears(before, after) -> None:  # type: ignore[no-untyped-def]
    """The same QuantLinears, codecs and stored parts bit for bit, biases equal."""
    a, b = quant_linears(before), quant_linears(after)
    assert a.keys() == b.keys() and a
    for name, m in a.items():
        n = b[name]
        assert m.codec == n.codec and m.parts == n.parts, name
        for part in m.parts:
            x, y = m.qweight.data[part], n.qweight.data[part]
            assert x.dtype == y.dtype and torch.equal(x, y), (name, part)
        assert (m.bias is None) == (n.bias is None)
        if m.bias is not None:
            assert torch.equal(m.bias, n.bias)


def leftovers(parent: Path, name: str) -> list[Path]:
    """Hidden temporary folders a write left beside ``parent / name``."""
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}")]
