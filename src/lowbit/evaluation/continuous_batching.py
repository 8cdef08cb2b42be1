"""Continuous batching: many prompts completed with at most ``batch_size`` rows decoding at a time,
where a row that stops hands its slot to the next prompt at once.

Batched ``generate`` runs a batch until its longest row stops, computing rows that have long
stopped; on HumanEval, where completions range from a few tokens to hundreds, that wastes most
of a batch's steps. Here every decode step computes only rows still generating.

How rows share one KV cache: each row's history ends at the cache's last column; a shorter
history is padded on the left and masked out, and positions are counted per row (as batched
``generate`` does with left padding). New prompts are prefilled together as one left-padded batch
and join the running batch by padding the shorter of the two caches on the left. Columns that no
row uses any more (after long rows left) are dropped.

This needs a cache whose layers are plain ``transformers`` ``DynamicLayer`` s (Llama, Qwen2,
Mistral without a sliding window, ...): :func:`supports_continuous_batching` tells; callers fall
back to batched ``generate`` for others (sliding-window or hybrid caches).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.evaluation.speed import greedy
from lowbit.models.architectures import cache_argument, returned_cache


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)``, both ``(len(rows), longest)`` int64, padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for j, r in enumerate(rows):
        if r:
            ids[j, width - len(r):] = torch.tensor(r, dtype=torch.int64)
            mask[j, width - len(r):] = 1
    return ids, mask


def _new_cache(model: nn.Module) -> Any:
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    return DynamicCache(config=config) if config is not None else DynamicCache()


def supports_continuous_batching(model: nn.Module) -> bool:
    """Whether ``model``'s KV cache is a ``DynamicCache`` of plain ``DynamicLayer`` s, which this
    module can pad, join and trim."""
    from transformers.cache_utils import DynamicLayer

    if not getattr(model, "_supports_cache_class", True) or not hasattr(model, "config"):
        return False
    try:
        cache = _new_cache(model)
    except Exception:  # a config that transformers' cache cannot read
        return False
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _Batch:
    """The running rows: their cache, attention mask ``(rows, columns)``, next positions ``(rows,)``
    and last sampled tokens ``(rows,)``, and which prompt each row completes."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask = torch.zeros((0, 0), dtype=torch.int64)
        self.pos = torch.zeros(0, dtype=torch.int64)
        self.last = torch.zeros(0, dtype=torch.int64)
        self.rows: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, other: "_Batch") -> None:
        if not self.rows:
            self.cache, self.mask, self.pos, self.last, self.rows = other.cache, other.mask, other.pos, other.last, other.rows
            return
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_columns(mine.keys, width), _pad_columns(theirs.keys, width)])
            mine.values = torch.cat([_pad_columns(mine.values, width), _pad_columns(theirs.values, width)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(other.mask, (width - other.mask.shape[1], 0))])
        self.pos = torch.cat([self.pos, other.pos])
        self.last = torch.cat([self.last, other.last])
        self.rows = self.rows + other.rows

    def keep(self, keep: list[int]) -> None:
        """Keep the rows at batch indices ``keep``, and drop the columns none of them uses."""
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[j] for j in keep]
        if not keep:
            self.__init__()  # type: ignore[misc]
            return
        index = torch.tensor(keep, dtype=torch.int64)
        self.mask, self.pos, self.last = self.mask[index], self.pos[index], self.last[index]
        used = self.mask.any(0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, start:]
            layer.values = layer.values[index.to(layer.values.device), :, start:]
        self.mask = self.mask[:, start:]


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` ``(rows, heads, columns, dim)`` padded with zeros on the left to ``width`` columns."""
    return F.pad(x, (0, 0, width - x.shape[-2], 0))


def _forward_last(model: nn.Module, cache: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The last position's logits ``(rows, vocab)`` in float32, and the updated cache."""
    kwargs[cache_argument(model)] = cache
    try:  # logits of the last position only: a prefill's other positions x vocabulary are not needed
        out = model(logits_to_keep=1, use_cache=True, **kwargs)
    except TypeError:  # a model class without logits_to_keep
        out = model(use_cache=True, **kwargs)
    return out.logits[:, -1].float(), returned_cache(out)


def decode_continuously(
    model: nn.Module,
    prompts: Sequence[list[int]],
    *,
    finished: Callable[[int, list[int]], bool],
    max_new_tokens: int,
    batch_size: int,
    pad_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    order: Sequence[int] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (a list of token ids), in the order of ``prompts``.

    A row stops when ``finished(i, new_ids)`` says so after its latest token (that token is kept)
    or after ``max_new_tokens``. Prompts enter the batch in ``order`` (default: as given). Greedy
    when ``temperature`` is 0 (the first largest logit, as ``generate``); else sampled from
    ``softmax(logits / temperature)`` with a generator per prompt seeded ``seed * 1_000_003 + i``,
    so that a sample does not depend on which other rows shared its steps. ``on_done(i)`` is
    called as each prompt finishes. The model's cache must pass :func:`supports_continuous_batching`.
    """
    device = next(model.parameters()).device
    queue = list(range(len(prompts)) if order is None else order)
    new: list[list[int]] = [[] for _ in prompts]
    generators: dict[int, torch.Generator] = {}

    def pick(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        if temperature == 0:
            return greedy(logits)[:, 0].cpu()
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        out = []
        for j, i in enumerate(rows):
            g = generators.setdefault(i, torch.Generator().manual_seed(seed * 1_000_003 + i))
            out.append(int(torch.multinomial(probs[j], 1, generator=g)))
        return torch.tensor(out, dtype=torch.int64)

    def record(rows: list[int], tokens: torch.Tensor) -> list[int]:
        """Append each row's token; the batch indices of the rows that go on."""
        going = []
        for j, (i, t) in enumerate(zip(rows, tokens.tolist())):
            new[i].append(t)
            if len(new[i]) >= max_new_tokens or finished(i, new[i]):
                if on_done is not None:
                    on_done(i)
            else:
                going.append(j)
        return going

    batch = _Batch()
    with torch.inference_mode():
        while queue or batch.rows:
            if queue and len(batch) < batch_size:
                take, queue = queue[:batch_size - len(batch)], queue[batch_size - len(batch):]
                ids, mask = left_pad([prompts[i] for i in take], pad_id)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                logits, cache = _forward_last(model, input_ids=ids.to(device), attention_mask=mask.to(device),
                                              position_ids=pos.to(device), cache=_new_cache(model))
                entering = _Batch()
                entering.cache, entering.mask, entering.pos, entering.rows = cache, mask, pos[:, -1] + 1, take
                entering.last = pick(logits, take)
                entering.keep(record(take, entering.last))
                if entering.rows:
                    batch.join(entering)
                continue  # fill every free slot before the next step
            step_mask = torch.cat([batch.mask, torch.ones((len(batch), 1), dtype=torch.int64)], dim=1)
            logits, batch.cache = _forward_last(
                model, input_ids=batch.last[:, None].to(device), attention_mask=step_mask.to(device),
                position_ids=batch.pos[:, None].to(device), cache=batch.cache)
            batch.mask, batch.pos = step_mask, batch.pos + 1
            batch.last = pick(logits, batch.rows)
            batch.keep(record(batch.rows, batch.last))
    return new
