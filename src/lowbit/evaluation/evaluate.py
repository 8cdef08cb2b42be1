"""Perplexity, and against a reference model: mean KL divergence, top-1 agreement, delta PPL.

Protocol (see :mod:`lowbit.evaluation.windows`): the text is tokenized whole (no BOS added),
cut into windows, and every scored target counts once. KL divergence is
``KL(reference || model)`` per scored token, from float32 log-softmax of both, averaged over
tokens; top-1 agreement is the share of tokens where both argmaxes agree.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import Text
from lowbit.errors import LowbitError
from lowbit.evaluation.reference import compute_reference, reference_key, window_logprob_chunks
from lowbit.models.fingerprint import model_fingerprint
from lowbit.evaluation.windows import make_windows
from lowbit.models import check_context
from lowbit.modules import cache_dequantized_weights
from lowbit.modules.rows_linear import fast_dense_linears


@dataclass
class EvalResult:
    text: str
    tokens: int  # scored tokens
    windows: int
    seq_len: int
    stride: int
    dtype: str
    ppl: float
    seconds: float  # forward passes of the evaluated model
    ref_ppl: float | None = None
    delta_ppl: float | None = None
    kld: float | None = None  # mean KL(ref || model), nats per token
    kld_p99: float | None = None
    top1: float | None = None  # share of tokens whose argmax agrees with the reference
    bits_per_weight: float | None = None
    model_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer: object, text: Text) -> torch.Tensor:
    """1-D int64 token ids of the whole text, without special tokens."""
    ids = tokenizer(text.text, add_special_tokens=False, return_attention_mask=False)["input_ids"]  # type: ignore[operator]
    return torch.tensor(ids, dtype=torch.int64)


def evaluate(
    model: nn.Module,
    tokenizer: object,
    text: Text,
    ref: nn.Module | None = None,
    seq_len: int = 512,
    stride: int | None = None,
    max_windows: int | None = None,
    dtype: torch.dtype | None = torch.float32,
    ref_dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    progress: bool = True,
    ref_fingerprint: str | None = None,
) -> EvalResult:
    """Evaluate ``model`` (cast to ``dtype``; None: as it is, e.g. a model another library
    quantized, which refuses casts) on ``text``; with ``ref``, also KLD/top-1/delta PPL.

    Reference log-probs are computed with ``ref`` in ``ref_dtype`` and cached under
    ``cache_dir`` (in a temporary folder, removed afterwards, when None). A caller that
    evaluates many models against one reference may pass ``ref_fingerprint``
    (``model_fingerprint(ref)`` in ``ref_dtype``) to hash its weights only once.
    """
    if not text.text.strip():
        raise LowbitError(f"evaluation text {text.name!r} is empty")
    check_context(model, seq_len, f"seq_len {seq_len}")
    ids = tokenize(tokenizer, text)
    windows = make_windows(ids.numel(), seq_len, stride, max_windows)
    vocab = _vocab_size(model)
    if int(ids.max()) >= vocab:
        raise LowbitError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab})")

    with contextlib.ExitStack() as stack:
        reference = None
        if ref is not None:
            if _vocab_size(ref) != vocab:
                raise LowbitError(f"reference vocabulary ({_vocab_size(ref)}) differs from the model's ({vocab})")
            ref.to(ref_dtype)
            key = reference_key(ref_fingerprint or model_fingerprint(ref), ids, windows, ref_dtype)
            if cache_dir is None:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lowbit-ref-")))
            else:
                root = cache_dir / "reference"
            reference = compute_reference(ref, ids, windows, root, key, progress)

        if dtype is None:
            dtype = getattr(next(model.parameters(), None), "dtype", torch.float32)
        else:
            model.to(dtype)
        nll_sum = 0.0
        kld_all: list[torch.Tensor] = []
        agree = 0
        n = 0
        t0 = time.perf_counter()
        with torch.inference_mode(), cache_dequantized_weights(model, dtype), fast_dense_linears(model):
            for i, w in enumerate(tqdm(windows, desc=f"eval {text.name}", unit="win", disable=not progress, leave=False)):
                targets = ids[w.first_target : w.end]
                window_ref = reference.window(i) if reference is not None else None
                for r0, lp in window_logprob_chunks(model, ids, w):
                    nll_sum += float(-lp.gather(1, targets[r0 : r0 + len(lp)].unsqueeze(1)).sum())
                    if window_ref is not None:
                        rlp = window_ref[r0 : r0 + len(lp)]
                        kld_all.append((rlp.exp() * (rlp - lp)).sum(dim=-1))
                        agree += int((rlp.argmax(-1) == lp.argmax(-1)).sum())
                n += w.n_scored
        seconds = time.perf_counter() - t0

        result = EvalResult(
            text=text.name,
            tokens=n,
            windows=len(windows),
            seq_len=seq_len,
            stride=stride or seq_len,
            dtype=str(dtype).removeprefix("torch."),
            ppl=math.exp(nll_sum / n),
            seconds=seconds,
        )
        if reference is not None:
            kld = torch.cat(kld_all).clamp(min=0)
            result.ref_ppl = math.exp(float(reference.nll.sum(dtype="float64")) / n)
            result.delta_ppl = result.ppl - result.ref_ppl
            result.kld = float(kld.double().mean())
            result.kld_p99 = float(torch.quantile(kld.double(), 0.99))
            result.top1 = agree / n
    return result


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings()  # type: ignore[operator]
    if emb is None:
        return int(model.config.vocab_size)  # type: ignore[union-attr]
    return int(emb.out_features if hasattr(emb, "out_features") else emb.weight.shape[0])
