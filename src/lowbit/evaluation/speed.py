"""Speed and memory of a model: prefill and decode tokens/s, resident memory (Linux /proc)."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

_STATUS = Path("/proc/self/status")


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

    def to_dict(self) -> dict:
        return asdict(self)


def measure_speed(model: nn.Module, vocab_size: int, batch: int = 1, prompt_tokens: int = 128,
                  new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> SpeedResult:
    """Median over ``repeats`` of a prefill of ``batch x prompt_tokens`` random token ids and of
    ``new_tokens`` greedy decode steps after it. One untimed warm-up run first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, prompt_tokens), generator=g)
    prefill, decode = [], []
    reset_peak()
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t3 = time.perf_counter()
            if i:  # the first run warms caches and allocators
                prefill.append(batch * prompt_tokens / (t1 - t0))
                decode.append(batch * new_tokens / (t3 - t2))
            del out, cache
    peak = peak_resident_bytes()
    return SpeedResult(batch, prompt_tokens, new_tokens, statistics.median(prefill), statistics.median(decode),
                       None if peak is None else peak / 1e6)


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds, each storage once: parameters, buffers, the
    fast kernels' weights, and dequantized copies kept for the reference path."""
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
    for m in model.modules():
        kernel = getattr(m, "kernel", None)
        if kernel is not None:
            total += kernel.nbytes
        add(getattr(m, "_dense", None))
    return total
