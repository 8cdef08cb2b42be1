"""Calibration samples: ``n_samples`` windows of ``seq_len`` token ids drawn from a text.

The text is tokenized once, whole; windows start at offsets drawn by a local, seeded
``torch.Generator`` (the global RNG is never touched, so calibration is reproducible and does
not disturb the caller). When the text is too short for ``n_samples`` disjoint windows the
windows overlap, with a warning; when it is shorter than one window, fewer tokens than asked are
used per sample, with a warning; below :data:`MIN_CALIB_TOKENS` it is an error.

Sources are everything :func:`lowbit.calibration.texts.load_text` reads (built-in splits such as
``pydoc-calib`` and ``stdlib-calib``, text files, ``hf:DATASET``), plus a ``.jsonl`` file of chat
conversations, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line, each
rendered with the tokenizer's chat template.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from lowbit.calibration.texts import Text, load_text
from lowbit.errors import LowbitError

MIN_CALIB_TOKENS = 64


class CalibrationConfig(BaseModel):
    """Which calibration tokens an algorithm sees (part of a recipe)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field("pydoc-calib", description="built-in split, text file, chat .jsonl or hf:DATASET")
    samples: int = Field(128, gt=0, description="number of calibration sequences")
    seq_len: int = Field(512, ge=8, description="tokens per calibration sequence")
    seed: int = Field(0, description="seed of the window offsets")
    all_experts: bool = Field(False, description="MoE: run every expert on every calibration token")


@dataclass
class CalibrationSet:
    """Token ids ``(n_samples, seq_len)`` and where they came from."""

    tokens: torch.Tensor
    source: str

    @property
    def digest(self) -> str:
        """SHA-256 of the token ids (part of the resume fingerprint)."""
        t = self.tokens.to(torch.int64).contiguous()
        return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()

    @property
    def n_tokens(self) -> int:
        return self.tokens.numel()


def load_chat_jsonl(path: Path, tokenizer: object) -> Text:
    """Render each conversation of a JSONL file with the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise LowbitError(f"{path}: the tokenizer has no chat template to render chat messages with")
    rendered = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise LowbitError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            messages = item.get("messages") if isinstance(item, dict) else item
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise LowbitError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
            rendered.append(tokenizer.apply_chat_template(messages, tokenize=False))  # type: ignore[attr-defined]
    if not rendered:
        raise LowbitError(f"{path}: no conversations")
    return Text(path.name, "\n".join(rendered))


def load_calibration_text(source: str, tokenizer: object) -> Text:
    p = Path(source).expanduser()
    if p.suffix == ".jsonl":
        if not p.is_file():
            raise LowbitError(f"no such chat file: {source}")
        return load_chat_jsonl(p, tokenizer)
    return load_text(source)


def sample_windows(ids: torch.Tensor, n_samples: int, seq_len: int, seed: int, source: str = "text") -> torch.Tensor:
    """``(n_samples, L)`` windows of the 1-D ``ids`` at seeded offsets, ``L = min(seq_len, len)``.

    Offsets are a random permutation of the disjoint window starts when there are enough of them,
    otherwise uniform draws (overlapping windows, with a warning)."""
    n = ids.numel()
    if n < MIN_CALIB_TOKENS:
        raise LowbitError(f"calibration text {source!r} has {n} tokens, need at least {MIN_CALIB_TOKENS}")
    if n < seq_len:
        warnings.warn(
            f"calibration text {source!r} has only {n} tokens: samples are {n} tokens long, not {seq_len}",
            stacklevel=2,
        )
        seq_len = n
    gen = torch.Generator().manual_seed(seed)
    n_disjoint = n // seq_len
    if n_disjoint >= n_samples:
        starts = torch.randperm(n_disjoint, generator=gen)[:n_samples] * seq_len
    else:
        warnings.warn(
            f"calibration text {source!r} has {n} tokens, fewer than {n_samples} x {seq_len}: samples overlap",
            stacklevel=2,
        )
        starts = torch.randint(0, n - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_set(tokenizer: object, config: CalibrationConfig) -> CalibrationSet:
    """Tokenize ``config.source`` and draw its samples."""
    text = load_calibration_text(config.source, tokenizer)
    ids = tokenizer(text.text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]  # type: ignore[operator]
    tokens = sample_windows(ids, config.samples, config.seq_len, config.seed, config.source)
    return CalibrationSet(tokens=tokens, source=config.source)
