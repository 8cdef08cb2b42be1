"""A quantized KV cache for transformers' ``generate``: keys and values stored as packed codes
(:mod:`lowbit.codecs.kv`), the most recent ``residual`` tokens in full precision (KIVI's window).

Each layer keeps, per side, a store of codes and scales for the tokens that left the window and a
full-precision buffer for the rest. New tokens go into the buffer; whenever it holds more than
``residual`` tokens, its oldest tokens leave it in whole chunks (one token per-token, ``group_size``
tokens per-channel), each chunk quantized once and never again. Attention reads the decoded store
followed by the buffer, for prefill and decode alike. Decoding one token at a time, a token attends
to the quantized keys and values of every token that had left the window when it was added, and
:func:`emulate_kv_cache` computes exactly that over a whole sequence at once (what ``lowbit eval
--kv-cache`` measures). A prompt of several tokens goes in at once: its tokens attend through the
cache as it is after the whole prompt (with a window, some earlier than one at a time would), as
llama.cpp's quantized caches do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lowbit.codecs.kv import KVQuantizer


class Workspace:
    """Flat buffers that every layer of a cache reads its past through, reused across layers and
    steps: a layer's attention is done with what it read before the next layer reads. Without
    them each read allocates its past's size (bf16 and float32) and frees it, and at long context
    the allocator's heap keeps the freed pieces resident: the quantized cache's peak memory then
    holds more transients than the bytes it saves."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat ``(numel,)`` tensor, the buffer ``name`` (grown by half again when too small)."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            size = numel if buf is None or buf.dtype != dtype else max(numel, buf.numel() * 3 // 2)
            self.buffers.pop(name, None)  # the old one goes before the new one comes
            buf = self.buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel]


class _Side:
    """One side (keys or values) of a layer: the store and the full-precision buffer."""

    def __init__(self, quantizer: KVQuantizer, residual: int, name: str, workspace: Workspace) -> None:
        self.q = quantizer
        self.residual = residual
        self.name = name  # "keys" / "values": the workspace buffers it reads through
        self.workspace = workspace
        self.store: dict[str, torch.Tensor] | None = None
        self.buffer: torch.Tensor | None = None

    def append(self, x: torch.Tensor) -> None:
        self.buffer = x if self.buffer is None else torch.cat([self.buffer, x], dim=-2)
        chunk = self.q.tokens_per_chunk
        n = self.buffer.shape[-2]
        leaving = max(0, (n - self.residual) // chunk * chunk)
        if leaving:
            encoded = self.q.encode(self.buffer[..., :leaving, :])
            self.store = encoded if self.store is None else {k: torch.cat([self.store[k], v], dim=2)
                                                             for k, v in encoded.items()}
            self.buffer = self.buffer[..., leaving:, :]

    def read(self) -> torch.Tensor:
        """The side's keys or values ``(B, H, tokens, D)``: the store decoded, then the window; a
        view of the workspace, valid until the next layer reads."""
        assert self.buffer is not None
        if self.store is None:
            return self.buffer
        n = self.stored_tokens()
        *lead, w, d = self.buffer.shape
        shape = (*lead, n + w, d)
        numel = math.prod(shape)
        device = self.buffer.device
        out = self.workspace.take(self.name, numel, self.buffer.dtype, device).view(shape)
        work = self.workspace.take("float32", math.prod((*lead, n, d)), torch.float32, device)
        self.q.decode_into(self.store, out[..., :n, :], work)
        out[..., n:, :] = self.buffer
        return out

    def nbytes(self) -> int:
        stored = 0 if self.store is None else self.q.nbytes(self.store)
        return stored + (0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size())

    def stored_tokens(self) -> int:
        return 0 if self.store is None else self.store["codes"].shape[2]


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's quantized cache (module docstring)."""

    is_croppable = False

    def __init__(self, keys: KVQuantizer, values: KVQuantizer, residual: int = 0,
                 workspace: Workspace | None = None) -> None:
        super().__init__()
        self.workspace = workspace or Workspace()
        self.k = _Side(keys, residual, "keys", self.workspace)
        self.v = _Side(values, residual, "values", self.workspace)
        self.cumulative_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.k.append(key_states)
        self.v.append(value_states)
        return self.k.read(), self.v.read()

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def nbytes(self) -> int:
        """Bytes the layer holds: codes and scales, and the full-precision window."""
        return self.k.nbytes() + self.v.nbytes()

    def reset(self) -> None:
        self.k = _Side(self.k.q, self.k.residual, "keys", self.workspace)
        self.v = _Side(self.v.q, self.v.residual, "values", self.workspace)
        self.cumulative_length = 0
        self.is_initialized = False

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise ValueError("a quantized KV cache does not reorder or select its batch rows (beam search, continuous batching)")


class QuantizedKVCache(Cache):
    """A cache of :class:`QuantizedKVLayer` s, one per decoder layer (models whose layers all use
    full attention), with each layer's keys and values quantizers."""

    def __init__(self, quantizers: list[tuple[KVQuantizer, KVQuantizer]], residual: int = 0) -> None:
        self.workspace = Workspace()  # one for all layers: they read one after another
        super().__init__(layers=[QuantizedKVLayer(k, v, residual, self.workspace) for k, v in quantizers])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------- evaluation

ATTENTION = "lowbit_kv_cache"


def kv_cache_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                       **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over a whole sequence (no past) as generation with :class:`QuantizedKVCache` runs
    it, token by token: query ``t`` reads the quantized key (value) of every token ``j`` that had
    left the window when ``t`` was added, ``j < F(t + 1)`` with ``F(L) = (L - residual) // chunk *
    chunk``, and the exact one of the others. Eager attention otherwise (a float mask added to the
    scores, softmax in float32), on the quantizers set by :func:`emulate_kv_cache`."""
    from transformers.models.llama.modeling_llama import repeat_kv

    keys_q, values_q, residual = module._lowbit_kv  # type: ignore[attr-defined]
    T = key.shape[-2]

    def quantized_and_mask(x: torch.Tensor, q: KVQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        whole = T // q.tokens_per_chunk * q.tokens_per_chunk
        xq = x.clone()
        if whole:
            xq[..., :whole, :] = q.fake_quantize(x[..., :whole, :])
        t = torch.arange(T, device=x.device)
        left = ((t + 1 - residual).clamp(min=0) // q.tokens_per_chunk) * q.tokens_per_chunk  # F(t + 1)
        return xq, t.unsqueeze(0) < left.unsqueeze(1)  # (T, T): query t reads key j quantized

    kq, km = quantized_and_mask(key, keys_q)
    vq, vm = quantized_and_mask(value, values_q)
    groups = module.num_key_value_groups  # type: ignore[attr-defined]
    k, kq, v, vq = (repeat_kv(x, groups) for x in (key, kq, value, vq))
    scores = torch.where(km, query @ kq.transpose(2, 3), query @ k.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : scores.shape[-1]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    out = (probs * vm) @ vq + (probs * ~vm) @ v
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, kv_cache_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's attention modules that cache keys and values, by name, in layer order."""
    found = {n: m for n, m in model.named_modules() if hasattr(m, "num_key_value_groups") and hasattr(m, "layer_idx")}
    return dict(sorted(found.items(), key=lambda item: item[1].layer_idx))


@contextlib.contextmanager
def emulate_kv_cache(model: torch.nn.Module, quantizers: list[tuple[KVQuantizer, KVQuantizer]],
                     residual: int = 0) -> Iterator[None]:
    """Within the block, ``model``'s attention reads keys and values as :class:`QuantizedKVCache`
    would hold them (see :func:`kv_cache_attention`; ``quantizers``: keys' and values' per layer);
    restored afterwards."""
    _register()
    attentions = list(attention_modules(model).values())
    if not attentions:
        raise ValueError(f"{type(model).__name__}: no attention module with key/value groups to read the cache through")
    if len(quantizers) != len(attentions):
        raise ValueError(f"{len(quantizers)} layers of KV quantizers for {len(attentions)} attention modules")
    before = model.config._attn_implementation
    for m in attentions:
        m._lowbit_kv = (*quantizers[m.layer_idx], residual)
    model.set_attn_implementation(ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        for m in attentions:
            del m._lowbit_kv


# ------------------------------------------------------------------------- static scales

SCALE_NAMES = ("k_scale", "v_scale")  # buffers of an attention module, as compressed-tensors and vLLM name them


def set_kv_scales(model: torch.nn.Module, scales: dict[str, tuple[float, float]]) -> None:
    """Give each attention module named in ``scales`` its static keys and values scales (kept as
    Python floats, untouched by dtype casts; the writers store them as float32 tensors, see
    :func:`kv_scale_tensors`)."""
    modules = attention_modules(model)
    for name, (k, v) in scales.items():
        if name not in modules:
            raise ValueError(f"{name} is not an attention module of the model")
        modules[name].lowbit_kv_scales = (float(k), float(v))


def kv_scales(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    """The static scales of the attention modules that have them (see :func:`set_kv_scales`)."""
    return {n: m.lowbit_kv_scales for n, m in attention_modules(model).items() if hasattr(m, "lowbit_kv_scales")}


def kv_scale_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The static scales as checkpoint tensors: ``NAME.k_scale`` / ``NAME.v_scale``, float32 ``(1,)``."""
    return {f"{n}.{attr}": torch.tensor([v], dtype=torch.float32)
            for n, pair in kv_scales(model).items() for attr, v in zip(SCALE_NAMES, pair)}


def take_kv_scales(tensors: dict[str, torch.Tensor], consumed: set[str]) -> dict[str, tuple[float, float]]:
    """The ``NAME.k_scale`` / ``NAME.v_scale`` pairs of a checkpoint's ``tensors`` by module name,
    their keys added to ``consumed``; ValueError for a lone one or one that is not a single value."""
    names = {k.rpartition(".")[0] for k in tensors if k.rpartition(".")[2] in SCALE_NAMES}
    out = {}
    for name in sorted(names):
        keys = [f"{name}.{s}" for s in SCALE_NAMES]
        if not all(k in tensors for k in keys):
            raise ValueError(f"{name} has only one of k_scale and v_scale")
        if any(tensors[k].numel() != 1 for k in keys):
            raise ValueError(f"{name}: k_scale and v_scale are one value each (a per-tensor FP8 cache scale)")
        out[name] = (float(tensors[keys[0]].float()), float(tensors[keys[1]].float()))
        consumed.update(keys)
    return out
