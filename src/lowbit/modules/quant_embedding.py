"""QuantEmbedding: a token embedding whose table is a packed :class:`QuantizedTensor`.

llama.cpp's type mixes store the token embedding quantized (Q8_0, Q6_K, ...); a tied LM head
then shares it. :func:`quantize_embeddings` does that to a transformers model in place, so that
the model lowbit evaluates holds exactly the values the GGUF file stores. lowbit folders hold one
too (the ``*-e8`` presets: int8 per row), and where the table's codes are int8 per row the running
model keeps them once, in the tied head's int8 kernel, and decodes only the rows looked up
(:meth:`QuantEmbedding.use_rows_of`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.codecs import Codec
from lowbit.errors import LowbitError
from lowbit.modules.kernels import Int8PackedKernel, affine_form
from lowbit.modules.quant_linear import QuantLinear


class QuantEmbedding(QuantLinear):
    """Rows of the ``(vocab, hidden)`` table looked up by token id, decoded on use (float32, or
    the dtype :func:`cache_dequantized_weights` caches); with an int8 kernel's codes
    (:meth:`use_rows_of`), only the rows looked up are decoded, in ``lookup_dtype``."""

    kernel_capable = False  # enable_fast_kernels gives it an int8 kernel's codes to look rows up in, no product
    lookup_dtype = torch.float32  # of the rows a kernel-backed lookup returns (keep_dequantized_weights sets it)

    def use_rows_of(self, kernel: Int8PackedKernel) -> bool:
        """Look rows up in ``kernel``'s int8 codes (``q - 128`` per row of this table: a tied LM head's
        kernel, or one of the table's own), decoding ``(q - 128) * scale + shift`` in float32 with the
        table's per-row float32 scale data; the layer's own packed codes are released (the kernel holds
        them). False, and nothing changed, where the codes are not affine with one scale per row."""
        form = affine_form(self.qweight)
        if form is None or form[1].shape[1] != 1 or tuple(kernel.shape) != (self.out_features, self.in_features):
            return False
        _, scale, offset = form
        self._row_scale = scale.contiguous()  # (vocab, 1) float32
        self._row_shift = (offset + 128 * scale).contiguous()  # the offset of q - 128
        self.use_kernel(kernel)  # type: ignore[arg-type]
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.kernel is not None:
            w = self.kernel.weight  # type: ignore[attr-defined]
            rows = w[ids].to(torch.float32) * self._row_scale[ids] + self._row_shift[ids]
            return rows.to(self.lookup_dtype)
        table = self._dense if self._dense is not None else self.dense_weight(torch.float32)
        return F.embedding(ids, table)


def quantize_embeddings(model: nn.Module, embedding: Codec | None, lm_head: Codec | None) -> None:
    """Store ``model``'s token embedding with ``embedding`` and an untied LM head with
    ``lm_head`` (round to nearest); a tied LM head becomes a QuantLinear over the same codes."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    if embedding is not None:
        if not isinstance(emb, nn.Embedding):
            raise LowbitError(f"cannot quantize a token embedding of type {type(emb).__name__}")
        try:
            qt = embedding.quantize(emb.weight.detach())
        except ValueError as e:
            raise LowbitError(f"token embedding: {e}") from None
        model.set_input_embeddings(QuantEmbedding(qt))
        if tied:
            model.set_output_embeddings(QuantLinear(qt))
    if lm_head is not None and not tied and isinstance(head, nn.Linear):
        try:
            model.set_output_embeddings(QuantLinear(lm_head.quantize(head.weight.detach()), head.bias))
        except ValueError as e:
            raise LowbitError(f"LM head: {e}") from None
