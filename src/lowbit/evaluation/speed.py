"""Speed and memory of a model: prefill and decode tokens/s, resident memory (Linux /proc)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.evaluation.compiled_decode import CompiledDecoder
from lowbit.models.architectures import cache_argument, returned_cache

_STATUS = Path("/proc/self/status")



def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``(batch, 1)`` token ids of the largest of ``logits`` ``(batch, vocabulary)``, in float32: torch's argmax
    over bf16 is a slow path (about 155 against 30 us over SmolLM2's 49,152 logits here), the answer the same."""
    return logits.float().argmax(-1, keepdim=True)

def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def resident_bytes() -> int | None:
    """This process's resident memory now (VmRSS), or None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_resident_bytes() -> int | None:
    """This process's peak resident memory (VmHWM) since start or the last :func:`reset_peak`."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak() -> bool:
    """Restart the peak-memory count at the current resident memory (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# llama.cpp's default micro-batch: the prompt's activations (and, at long context, the attention
# scores of a whole prompt) stay small, so a long prompt's peak memory is the model and its cache
DEFAULT_PREFILL_CHUNK = 512


@dataclass
class SpeedResult:
    """One batch size: tokens/s of the prompt forward (prefill) and of greedy one-token steps
    with the KV cache (decode), both counting every sequence of the batch, and the process's
    peak resident memory during the run in MB."""

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_mb: float | None
    kv_bytes_per_token: float = 0.0  # the cache's bytes after the run over its tokens (every sequence, every layer)
    compiled: bool = False  # decode steps compiled on a static cache (lowbit.evaluation.compiled_decode)
    compile_s: float | None = None  # compiled: the untimed first run's decode seconds (compilation, mostly)
    prefill_chunk: int | None = None  # the prompt went in chunks of this many tokens (None: at once)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_speed(model: nn.Module, vocab_size: int, batch: int = 1, prompt_tokens: int = 128,
                  new_tokens: int = 32, repeats: int = 3, seed: int = 0,
                  new_cache: Callable[[], object] | None = None, compiled: bool = False,
                  prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> SpeedResult:
    """Median over ``repeats`` of a prefill of ``batch x prompt_tokens`` random token ids and of
    ``new_tokens`` greedy decode steps after it. One untimed warm-up run first (with ``compiled``,
    decode steps compiled on a static cache: the warm-up compiles them). The prefill computes the
    logits of the last position only, as ``generate`` and llama.cpp do (all of them would be
    ``batch x prompt_tokens x vocabulary`` floats: 13 GB for 8 x 8192 tokens of SmolLM2), and
    feeds the prompt ``prefill_chunk`` tokens at a time (None: at once; see :func:`prefill`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, prompt_tokens), generator=g)
    prefill_rates, decode_rates = [], []
    if compiled and new_cache is not None:
        raise ValueError("a compiled decode step runs on the static cache, not a quantized one")
    decoder = CompiledDecoder(model, prompt_tokens + new_tokens) if compiled else None
    arg = cache_argument(model)
    compile_s = None
    reset_peak()
    with torch.inference_mode():
        for i in range(repeats + 1):
            if decoder is not None:
                decoder.reset()
                t0 = time.perf_counter()
                logits = decoder.prefill(ids, prefill_chunk)
                t1 = time.perf_counter()
                nxt = greedy(logits)
                t2 = time.perf_counter()
                for _ in range(new_tokens):
                    nxt = greedy(decoder.step(nxt))
                t3 = time.perf_counter()
                cache = decoder.cache
                compile_s = compile_s if i else t3 - t2
            else:
                t0 = time.perf_counter()
                out = prefill(model, ids, None if new_cache is None else new_cache(), prefill_chunk)
                t1 = time.perf_counter()
                cache, nxt = returned_cache(out), greedy(out.logits[:, -1])
                t2 = time.perf_counter()
                for _ in range(new_tokens):
                    out = model(nxt, use_cache=True, **{arg: cache})
                    cache, nxt = returned_cache(out), greedy(out.logits[:, -1])
                t3 = time.perf_counter()
                del out
            if i:  # the first run warms caches and allocators
                prefill_rates.append(batch * prompt_tokens / (t1 - t0))
                decode_rates.append(batch * new_tokens / (t3 - t2))
            kv_bytes = cache_nbytes(cache)
            del cache
    peak = peak_resident_bytes()
    return SpeedResult(batch, prompt_tokens, new_tokens, statistics.median(prefill_rates),
                       statistics.median(decode_rates),
                       None if peak is None else peak / 1e6, kv_bytes / (batch * (prompt_tokens + new_tokens)),
                       compiled, compile_s, prefill_chunk if prefill_chunk and prefill_chunk < prompt_tokens else None)


def prefill(model: nn.Module, ids: torch.Tensor, cache: object | None = None, chunk: int | None = None) -> object:
    """The forward of a prompt ``ids`` ``(batch, tokens)`` that fills ``cache`` (None: the model's
    own) and keeps the last position's logits only, ``chunk`` tokens at a time (None or 0: at
    once). Each chunk attends through the cache as the chunks before it left it (for a quantized
    cache: their quantized keys and values), as llama.cpp's micro-batches do. Returns the last
    forward's output (its ``logits`` ``(batch, 1, vocabulary)`` and the cache)."""
    arg = cache_argument(model)
    out = None
    for part in ids.split(chunk, dim=1) if chunk else (ids,):
        if out is not None:
            cache = returned_cache(out)
        del out  # the previous chunk's logits and hidden states, before this chunk's are made
        out = model(part, use_cache=True, logits_to_keep=1, **({} if cache is None else {arg: cache}))
    return out


def cache_nbytes(cache: object) -> int:
    """Bytes a KV cache holds: a quantized one's codes, scales and window, a plain one's tensors."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())  # type: ignore[attr-defined]
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds, each storage once: parameters, buffers, the
    fast kernels' weights (a kernel two modules share, once), dequantized copies kept for the
    reference path, and a quantized table's per-row scale data."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.is_meta or t.numel() == 0:
            return
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    kernels: set[int] = set()
    for m in model.modules():
        kernel = getattr(m, "kernel", None)
        if kernel is not None and id(kernel) not in kernels:  # a tied embedding shares its head's
            kernels.add(id(kernel))
            total += kernel.nbytes
        for name in ("_dense", "_row_scale", "_row_shift"):  # dequantized copies; a table's per-row scale data
            add(getattr(m, name, None))
    return total


def load_for_running(spec: str, dtype: str = "auto", kernels: bool = True, w8a8: bool = False):  # type: ignore[no-untyped-def]
    """Load ``spec`` to run it: fast kernels built once (unless ``kernels`` is False), the other
    quantized layers dequantized once, dense weights in ``dtype`` (``auto``: bfloat16 when a fast
    kernel runs the quantized linears, as their operators compute in bf16; else float32);
    ``w8a8``: int8 linears quantize their inputs too (dynamic per-token int8 activations).

    Returns ``(LoadedModel, dtype name, {path: linears}, {"model_mb", "rss_after_load_mb"})``."""
    from lowbit.models import load_model
    from lowbit.modules import enable_fast_kernels, keep_dequantized_weights

    auto = dtype == "auto"
    if auto:  # a lowbit folder says so in its header; other layouts are cast after loading
        dtype = "bfloat16" if kernels and _first_linear_has_kernel(spec) else "float32"
    loaded = load_model(spec, getattr(torch, dtype), keep_quantized=True)
    counts = enable_fast_kernels(loaded.model, w8a8=w8a8) if kernels else {}
    counts.pop("reference", None)
    if auto and dtype == "float32" and counts:
        dtype = "bfloat16"
        loaded.model.to(torch.bfloat16)  # packed parts keep their storage dtypes
    torch_dtype = getattr(torch, dtype)
    dequantized = keep_dequantized_weights(loaded.model, torch_dtype)  # once, not per call
    if dequantized:
        counts["dequantized once"] = dequantized
    if kernels:
        from lowbit.modules.decode_attention import use_one_query_attention
        from lowbit.modules.rows_linear import enable_row_products

        if rows := enable_row_products(loaded.model):
            counts["dense (row operator at 1-4 rows)"] = rows
        use_one_query_attention(loaded.model)
    simulated = fake_quantized_inputs(loaded.model)
    if simulated:  # e.g. FP8 inputs: this CPU has no FP8 matmul
        counts[f"inputs fake-quantized ({', '.join(sorted(simulated))}: no such matmul here)"] = sum(simulated.values())
    rss = resident_bytes()
    return loaded, dtype, counts, {"model_mb": held_bytes(loaded.model) / 1e6,
                                   "rss_after_load_mb": None if rss is None else rss / 1e6}


def fake_quantized_inputs(model: nn.Module) -> dict[str, int]:
    """Per input format, how many linears quantize their inputs without a kernel that multiplies
    in that format: the inputs are rounded to it and multiplied in floating point (simulated)."""
    from lowbit.modules import QuantLinear

    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.input_quant is not None and not (m.kernel and m.kernel.quantizes_input):
            out[m.input_quant.format] = out.get(m.input_quant.format, 0) + 1
    return out


def _first_linear_has_kernel(spec: str) -> bool:
    """Whether a lowbit folder's first quantized linear has a fast kernel, read from the file
    before loading (other sources: False)."""
    import json

    from safetensors import SafetensorError, safe_open

    from lowbit.codecs import QuantizedTensor
    from lowbit.io.lowbit_format import MARKER, QUANT_KEY, WEIGHTS
    from lowbit.modules.kernels import build_kernel

    path = Path(spec).expanduser()
    if not (path / MARKER).is_file():
        return False
    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            headers = json.loads((f.metadata() or {}).get(QUANT_KEY, "{}"))
            for name, header in headers.items():
                prefix = f"{name}.weight"
                parts = {f"{prefix}.{p}": f.get_tensor(f"{prefix}.{p}") for p in json.loads(header)["parts"]}
                return build_kernel(QuantizedTensor.from_state_dict(header, parts, prefix)) is not None
    except (OSError, SafetensorError, ValueError, KeyError):
        return False  # a damaged folder: loading it reports what is wrong, in lowbit's words
    return False
