"""Reference log-probabilities, computed once and cached on disk.

The cache key covers the reference model's weights (a SHA-256 over its state dict), the token
ids, the window protocol and the compute dtype, so a changed model, text, tokenizer or protocol
never reuses stale numbers. Entries are written to a temporary folder and renamed when
complete. Each entry holds the log-softmax rows ``(n_scored, vocab)`` as 16-bit codes (a
memory-mapped ``.npy`` file), each row's offset and step, and the reference NLL of each scored
token in float32.

The 16-bit rows (:func:`encode_rows`) halve the cache (SmolLM2's 49k vocabulary: 1.4 GB for
``pydoc``; Qwen2.5's 152k: 4.3 GB), and change the mean KLD by 0.005% or less: on SmolLM2 over
4,088 ``pydoc`` tokens, int8 0.003349 exact and in 16 bits, w4a16 0.556343 both. float16 rows
are off by -0.08% for int8, bfloat16 by +1.6%, and keeping the top 1,024 log-probabilities
plus the tail's mass by -2.8% (a lower bound: the tail's own divergence is lost).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.evaluation.windows import Window
from lowbit.modules.rows_linear import fast_dense_linears

CACHE_VERSION = 2
# a row keeps the log-probabilities within this many nats of its largest; below, a token's
# probability (< e^-40 of the top one's) is too small to matter to any KL divergence
CODE_RANGE = 40.0


def reference_key(fingerprint: str, ids: torch.Tensor, windows: list[Window], dtype: torch.dtype) -> str:
    ids_digest = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    spec = {
        "v": CACHE_VERSION,
        "model": fingerprint,
        "ids": ids_digest,
        "windows": [(w.begin, w.end, w.first_target) for w in windows],
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:32]


# LM head rows computed and scored at a time: a 49k vocabulary's float32 logits are 12.6 MB for 64 rows (memory
# the allocator reuses, and caches still hold) against 100 MB, fresh pages every window, for all 512
SCORE_ROWS = 64
# config fields by which a model's forward changes its LM head's output (Gemma 2's soft cap, Cohere's scale, ...)
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def window_logprob_chunks(model: nn.Module, ids: torch.Tensor, w: Window,
                          rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Float32 log-softmax rows predicting window ``w``'s targets ``first_target..end-1``, ``rows``
    at a time: ``(first row, (r, vocab))``. Where the model's logits are its LM head's output as
    is, the forward stops before the head and the head runs on ``rows`` hidden states at a time
    (default :data:`SCORE_ROWS`)."""
    rows = rows or SCORE_ROWS
    x = ids[w.begin : w.end].unsqueeze(0)
    lo, hi = w.first_target - 1 - w.begin, w.end - 1 - w.begin
    head = _separable_head(model)
    if head is None:
        logits = model(input_ids=x, use_cache=False).logits[0][lo:hi]
        for r0 in range(0, hi - lo, rows):
            yield r0, torch.log_softmax(logits[r0 : r0 + rows].float(), dim=-1)
        return
    name, module = head
    setattr(model, name, nn.Identity())
    try:
        hidden = model(input_ids=x, use_cache=False).logits[0][lo:hi]
    finally:
        setattr(model, name, module)
    for r0 in range(0, hi - lo, rows):
        yield r0, torch.log_softmax(module(hidden[r0 : r0 + rows]).float(), dim=-1)


def _separable_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The attribute name and module of ``model``'s LM head where its forward returns that head's
    output unchanged (so the head may run apart, on some rows at a time), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))
    if head is None or any(getattr(c, f, None) is not None for c in configs if c is not None for f in _LOGIT_POSTPROCESSING):
        return None
    return next(((name, child) for name, child in model.named_children() if child is head), None)


def encode_rows(lp: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 log-prob rows ``(n, vocab)`` as uint16 codes and each row's offset and step
    (float32 ``(n,)``): ``lp ~= offset + step * code``, the top ``CODE_RANGE`` nats of each row
    in 65,535 steps (6e-4 nats), lower values clamped to its bottom."""
    hi = lp.amax(dim=-1)
    lo = torch.maximum(lp.amin(dim=-1), hi - CODE_RANGE)
    step = ((hi - lo) / 65535).clamp(min=1e-12)
    codes = torch.round((lp - lo[:, None]).clamp(min=0) / step[:, None]).clamp(max=65535)
    return codes.to(torch.int32).numpy().astype(np.uint16), lo.numpy(), step.numpy()


def decode_rows(codes: np.ndarray, lo: np.ndarray, step: np.ndarray) -> torch.Tensor:
    """The float32 log-prob rows of :func:`encode_rows`, renormalized (each row's probabilities
    sum to 1 again, so that a KL divergence from them is one: never below 0)."""
    out = torch.from_numpy(codes.astype(np.float32))
    out = out * torch.from_numpy(step)[:, None] + torch.from_numpy(lo)[:, None]
    return out - torch.logsumexp(out, dim=-1, keepdim=True)


class ReferenceLogprobs:
    """Read access to a cached entry: per-window log-prob rows and the reference NLLs."""

    def __init__(self, folder: Path, windows: list[Window]) -> None:
        self.folder = folder
        self.windows = windows
        self.logprobs = np.load(folder / "logprobs.npy", mmap_mode="r")
        self.lo = np.load(folder / "lo.npy")
        self.step = np.load(folder / "step.npy")
        self.nll = np.load(folder / "nll.npy")
        offsets = np.cumsum([0] + [w.n_scored for w in windows])
        if self.logprobs.shape[0] != offsets[-1]:
            raise ValueError(f"reference cache {folder} holds {self.logprobs.shape[0]} rows, expected {offsets[-1]}")
        self.offsets = offsets

    def window(self, i: int) -> torch.Tensor:
        a, b = self.offsets[i], self.offsets[i + 1]
        return decode_rows(np.asarray(self.logprobs[a:b]), self.lo[a:b], self.step[a:b])

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self.windows)):
            yield self.window(i)


def compute_reference(
    model: nn.Module,
    ids: torch.Tensor,
    windows: list[Window],
    cache_root: Path,
    key: str,
    progress: bool = True,
) -> ReferenceLogprobs:
    """Load the cached entry ``key`` or compute it with ``model`` (already in its dtype)."""
    folder = cache_root / key
    if (folder / "nll.npy").is_file():
        try:
            return ReferenceLogprobs(folder, windows)
        except (ValueError, OSError):
            shutil.rmtree(folder, ignore_errors=True)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root))
    try:
        n = sum(w.n_scored for w in windows)
        vocab = None
        out = None
        nll = np.empty(n, dtype=np.float32)
        lo = np.empty(n, dtype=np.float32)
        step = np.empty(n, dtype=np.float32)
        pos = 0
        with torch.inference_mode(), fast_dense_linears(model):
            for w in tqdm(windows, desc="reference logits", unit="win", disable=not progress, leave=False):
                targets = ids[w.first_target : w.end]
                for r0, lp in window_logprob_chunks(model, ids, w):
                    if out is None:
                        vocab = lp.shape[-1]
                        out = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.uint16, shape=(n, vocab))
                    a, b = pos + r0, pos + r0 + len(lp)
                    out[a:b], lo[a:b], step[a:b] = encode_rows(lp)
                    nll[a:b] = (-lp.gather(1, targets[r0 : r0 + len(lp)].unsqueeze(1)).squeeze(1)).numpy()
                pos += w.n_scored
        assert out is not None
        out.flush()
        del out
        np.save(tmp / "lo.npy", lo)
        np.save(tmp / "step.npy", step)
        np.save(tmp / "nll.npy", nll)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ReferenceLogprobs(folder, windows)
