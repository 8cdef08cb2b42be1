"""QuantEmbedding: a token embedding whose table is a packed :class:`QuantizedTensor`.

llama.cpp's type mixes store the token embedding quantized (Q8_0, Q6_K, ...); a tied LM head
then shares it. :func:`quantize_embeddings` does that to a transformers model in place, so that
the model lowbit evaluates holds exactly the values the GGUF file stores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.codecs import Codec
from lowbit.errors import LowbitError
from lowbit.modules.quant_linear import QuantLinear


class QuantEmbedding(QuantLinear):
    """Rows of the ``(vocab, hidden)`` table looked up by token id, decoded on use (float32, or
    the dtype :func:`cache_dequantized_weights` caches)."""

    kernel_capable = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
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
