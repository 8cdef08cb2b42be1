"""Reference log-probabilities, computed once and cached on disk.

The cache key covers the reference model's weights (a SHA-256 over its state dict), the token
ids, the window protocol and the compute dtype, so a changed model, text, tokenizer or protocol
never reuses stale numbers. Entries are written to a temporary folder and renamed when
complete. Each entry holds float32 log-softmax rows ``(n_scored, vocab)`` as a ``.npy`` file
(memory-mapped when read) and the reference NLL of each scored token.
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

CACHE_VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def window_logprobs(model: nn.Module, ids: torch.Tensor, w: Window) -> torch.Tensor:
    """Float32 log-softmax ``(w.n_scored, vocab)`` predicting targets ``first_target..end-1``."""
    x = ids[w.begin : w.end].unsqueeze(0)
    logits = model(input_ids=x, use_cache=False).logits[0]
    rows = logits[w.first_target - 1 - w.begin : w.end - 1 - w.begin]
    return torch.log_softmax(rows.float(), dim=-1)


class ReferenceLogprobs:
    """Read access to a cached entry: per-window log-prob rows and the reference NLLs."""

    def __init__(self, folder: Path, windows: list[Window]) -> None:
        self.folder = folder
        self.windows = windows
        self.logprobs = np.load(folder / "logprobs.npy", mmap_mode="r")
        self.nll = np.load(folder / "nll.npy")
        offsets = np.cumsum([0] + [w.n_scored for w in windows])
        if self.logprobs.shape[0] != offsets[-1]:
            raise ValueError(f"reference cache {folder} holds {self.logprobs.shape[0]} rows, expected {offsets[-1]}")
        self.offsets = offsets

    def window(self, i: int) -> torch.Tensor:
        a, b = self.offsets[i], self.offsets[i + 1]
        return torch.from_numpy(np.array(self.logprobs[a:b]))

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
        pos = 0
        with torch.inference_mode():
            for w in tqdm(windows, desc="reference logits", unit="win", disable=not progress, leave=False):
                lp = window_logprobs(model, ids, w)
                if out is None:
                    vocab = lp.shape[-1]
                    out = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float32, shape=(n, vocab))
                out[pos : pos + w.n_scored] = lp.numpy()
                targets = ids[w.first_target : w.end]
                nll[pos : pos + w.n_scored] = (-lp.gather(1, targets.unsqueeze(1)).squeeze(1)).numpy()
                pos += w.n_scored
        assert out is not None
        out.flush()
        del out
        np.save(tmp / "nll.npy", nll)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ReferenceLogprobs(folder, windows)
