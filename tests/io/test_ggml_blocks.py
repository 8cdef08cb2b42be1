"""ggml's byte layout of the legacy block types: bytes written by gguf-py's reference
quantizer read back, and our bytes round-tripped."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from lowbit.codecs import codec_from_dict
from lowbit.io.ggml_blocks import from_ggml_blocks, to_ggml_blocks

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


@pytest.mark.parametrize("name", TYPES)
def test_reads_bytes_written_by_gguf_py(name: str) -> None:
    c = codec_from_dict({"name": name})
    qtype = GGMLQuantizationType[c.ggml_type]
    w = (torch.randn(8, 128, generator=torch.Generator().manual_seed(3)) * 0.05).numpy()
    raw = quantize(w, qtype)
    qt = from_ggml_blocks(torch.from_numpy(raw.copy()), c, (8, 128))
    np.testing.assert_array_equal(c.dequantize(qt).numpy(), dequantize(raw, qtype))
    assert np.array_equal(to_ggml_blocks(qt, c).numpy(), raw)  # and writes them back byte for byte


@pytest.mark.parametrize("name", TYPES)
def test_wrong_byte_count_is_refused(name: str) -> None:
    c = codec_from_dict({"name": name})
    with pytest.raises(ValueError, match="needs"):
        from_ggml_blocks(torch.zeros(100, dtype=torch.uint8), c, (8, 128))
    with pytest.raises(ValueError, match="whole blocks"):
        from_ggml_blocks(torch.zeros(100, dtype=torch.uint8), c, (8, 100))


@pytest.mark.model
def test_smollm2_q4_1_blocks_reencode_byte_for_byte() -> None:
    from lowbit.io.ggml_blocks import reencode_counts
    from lowbit.models.builtin import BUILTIN_MODELS, find_gguf

    counts = reencode_counts(str(find_gguf(BUILTIN_MODELS["smollm2-135m"])))
    assert len(counts) > 100  # the file's linears (and embeddings) are Q4_1
    blocks, same = sum(n for _, n, _ in counts), sum(s for _, _, s in counts)
    assert same == blocks, (same, blocks)
