"""Calibration passes over decoder blocks: what block 0 receives, a block's outputs, and the
statistics of the inputs of a block's linears (stopping each pass as soon as they are seen).

Forward passes may run in bfloat16 (``compute_dtype``) through CPU autocast (AMX); statistics
are always accumulated in float32 or wider.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import nn

from lowbit.calibration.observers import ObserverState
from lowbit.calibration.statistics import InputStatistics, StatsRequest
from lowbit.errors import LowbitError
from lowbit.modules import linear_weight
from lowbit.pipeline.resume import BlockInputs


class _StopForward(Exception):
    """Raised by a hook once the inputs it was waiting for have been seen."""


def autocast(dtype: torch.dtype, device: torch.device | None = None) -> contextlib.AbstractContextManager:
    """Mixed precision for a pass in ``dtype`` on ``device`` (CPU when None): AMX on CPU."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu" if device is None else device.type, dtype=dtype)


def to_device(obj: object, device: torch.device) -> object:
    """``obj`` (tensors inside tuples, lists and dicts, e.g. a block's keyword arguments) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def _device_of(inputs: BlockInputs) -> torch.device | None:
    return inputs[0][0].device if inputs else None


def first_tensor(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def capture_block_inputs(
    model: nn.Module, block: nn.Module, tokens: torch.Tensor, batch_size: int, compute_dtype: torch.dtype
) -> BlockInputs:
    """What ``block`` (the first decoder block) receives for each batch of ``tokens``."""
    captured: BlockInputs = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "past_key_values" and k != "past_key_value"}
        if compute_dtype != torch.float32 and isinstance(kw.get("position_embeddings"), tuple):
            # RoPE's cos/sin come out in float32; in float32 they would promote every bf16 q/k
            # product and copy it back (a third of a bf16 pass on SmolLM2).
            kw["position_embeddings"] = tuple(t.to(compute_dtype) for t in kw["position_embeddings"])
        captured.append((hidden.detach().to(torch.float32), kw))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), autocast(compute_dtype):
            for batch in tokens.split(batch_size):
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != -(-tokens.shape[0] // batch_size):
        raise LowbitError("the model never reached its first decoder block")
    return captured


def run_block(block: nn.Module, inputs: BlockInputs, compute_dtype: torch.dtype) -> BlockInputs:
    outs: BlockInputs = []
    with torch.no_grad(), autocast(compute_dtype, _device_of(inputs)):
        for hidden, kw in inputs:
            outs.append((first_tensor(block(hidden, **kw)).to(torch.float32), kw))
    return outs


def collect_step_statistics(
    block: nn.Module,
    names: list[str],
    inputs: BlockInputs,
    request: StatsRequest,
    compute_dtype: torch.dtype,
    observers: Mapping[str, ObserverState] | None = None,
) -> dict[str, InputStatistics]:
    """Run ``block`` on ``inputs`` until the linears ``names`` have seen their input, per batch;
    linears fed the same tensor share one :class:`InputStatistics`. ``observers``: per linear
    name, a state that also sees each batch of its input (static activation scales)."""
    stats: dict[str, InputStatistics] = {}
    seen: set[str] = set()
    fed: set[int] = set()
    last: list = [None, None]  # (input tensor, its statistics) of the latest hook, first batch only

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in stats:
                if last[0] is x:
                    stats[name] = last[1]
                else:
                    stats[name] = InputStatistics(x.shape[-1], request, len(inputs), compute_dtype, x.device)
            st = stats[name]
            if id(st) not in fed:
                st.add(x)
                fed.add(id(st))
            if observers is not None and name in observers:
                observers[name].add(x)
            last[0], last[1] = x, st
            seen.add(name)
            if len(seen) == len(names):
                raise _StopForward

        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        with torch.no_grad(), autocast(compute_dtype, _device_of(inputs)):
            for hidden, kw in inputs:
                seen.clear()
                fed.clear()
                try:
                    block(hidden, **kw)
                except _StopForward:
                    pass
                last[0] = None
    finally:
        for h in handles:
            h.remove()
    for n in names:
        if n not in stats:
            stats[n] = InputStatistics(linear_weight(block.get_submodule(n))[0].shape[1], request, len(inputs))
    return stats

