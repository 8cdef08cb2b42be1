"""Decoding with a static KV cache and a compiled step: the decode step's shapes never change,
so torch.compile (inductor) builds it once and runs it without Python's per-operator overhead,
which at batch 1 on a CPU is a large part of a step of a small model.

Two ways: ``generate`` compiles its decode forward itself when given a static cache and a compile
config that allows CPUs (:func:`generate_kwargs`), and :class:`CompiledDecoder` (the speed
measurement's loop, ``bench-speed --compile``) runs :func:`compiled_step` on a cache of its own. The
prompt's forward stays eager, as in ``generate``: its shape changes with every prompt.

Guards: before each call torch.compile checks that what it compiled against still holds, by
default every attribute of every module (thousands of checks: a large share of a small model's
step; BENCHMARKS.md, "Speed and memory"). :func:`compiled_step` compiles a function of its own
per decoder (its own code object, so its compiled graphs are never offered to another model or
cache; torch keeps them per code object) and drops the checks on the model's modules
(``skip_guard_on_all_nn_modules_unsafe``), on globals (module constants and functions) and on the
decoder's own cache object; those on the step's other inputs stay (about 900 checks, 0.2 ms a step,
down to about 0.05 ms). So a model must not change while its decoder runs (its kernels, classes,
hooks, lowbit's module constants); lowbit never does, and a new decoder compiles anew.
``generate`` keeps every guard: it makes a new static cache for a longer request, and with the
modules' checks dropped a graph built for the old cache ran on the new one (tried, not kept). The
decoder's graph runs through inductor's C++ wrapper (its calls made from C++, not
Python), whose first compile takes a few minutes; torch's cache keeps it for later processes.

The first compiled step compiles; later calls reuse it. Where compilation fails (an operator
inductor cannot trace), the step runs eagerly on the same static cache, with one warning.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Callable

import torch
from torch import nn

from lowbit.models.architectures import cache_argument


def compile_config():  # type: ignore[no-untyped-def]
    """transformers' CompileConfig for a CPU: inductor's default mode (no CUDA graphs), fixed shapes."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # generate compiles on accelerators only unless told (not an init argument)
    return config


def compiled_step(model: nn.Module) -> Callable[..., object]:
    """``model(*args, **kwargs)`` compiled for the decode steps of one cache (see the module
    docstring): one whole graph in a code object of its own, without guards on the model's
    modules; where the step does not trace as one graph, transformers' compiled forward with every
    guard (a graph break compiles the modules' own forward functions as frames of their own, shared
    by every module of a class, which only the modules' guards tell apart)."""

    def step(*args: object, **kwargs: object) -> object:
        return model(*args, **kwargs)

    code = step.__code__.replace(co_name=f"lowbit_step_{id(model):x}")  # a new code object: its own graphs
    own = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__, step.__closure__)
    config = compile_config()
    cache_arg = f"kwargs['{cache_argument(model)}']"

    def guards(entries):  # type: ignore[no-untyped-def]
        # also dropped: the checks on globals (lowbit's and transformers' module constants and functions) and on
        # the cache object, which is the decoder's own for every step; those on the step's other inputs stay
        keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)
        return [k and not (e.name.startswith("G") or e.name.startswith(cache_arg)) for e, k in zip(entries, keep)]

    # cpp_wrapper: the graph's calls in C++, not Python (the first compile takes minutes, then torch's cache has it)
    whole = torch.compile(own, fullgraph=True, dynamic=config.dynamic, backend=config.backend,
                          options={"guard_filter_fn": guards, "cpp_wrapper": True})
    chosen: list[Callable[..., object]] = []

    def run(*args: object, **kwargs: object) -> object:
        if not chosen:
            print("lowbit: compiling the decode step (the first time on a machine about 2-3 minutes, its C++ "
                  "included; torch's cache keeps it for later runs)", file=sys.stderr)
            try:
                out = whole(*args, **kwargs)
            except torch._dynamo.exc.Unsupported:  # a graph break: nothing ran
                chosen.append(model.get_compiled_call(config))  # type: ignore[operator]
            else:
                chosen.append(whole)
                return out
        return chosen[0](*args, **kwargs)

    return run


def generate_kwargs(model: nn.Module) -> dict[str, object]:
    """Arguments of ``model.generate`` that decode with a static cache and a compiled step
    (transformers' own compiled forward, every guard kept: ``generate`` makes a new cache for a
    longer request, which the checks on the model's modules are needed to notice)."""
    check_compilable(model)
    return {"cache_implementation": "static", "compile_config": compile_config()}


def check_compilable(model: nn.Module) -> None:
    """ValueError when the model's decode step cannot use a static cache (sliding-window or
    hybrid caches keep their own layouts; lowbit's quantized KV cache grows as it decodes)."""
    if getattr(model, "lowbit_kv_cache", None) is not None:
        raise ValueError("a quantized KV cache grows as it decodes; a compiled decode step needs the static "
                         "(full-precision) cache: drop --compile or the KV cache")
    if not getattr(model, "_can_compile_fullgraph", True):
        raise ValueError(f"{type(model).__name__} does not support transformers' static cache")


class CompiledDecoder:
    """Greedy decoding of ``batch`` rows of up to ``max_len`` tokens with a static cache: ``prefill``
    runs the prompt eagerly, ``step`` the compiled one-token forward. Call :meth:`reset` between
    sequences (the cache's tensors are reused: shapes, hence the compiled graph, stay the same)."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        from transformers import StaticCache

        check_compilable(model)
        self.model = model
        self.arg = cache_argument(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.max_len = max_len
        self.position = 0
        self.compiled = compiled_step(model)
        self.eager_reason: str | None = None

    def reset(self) -> None:
        with torch.inference_mode():  # the cache's tensors were made under it (inference tensors)
            self.cache.reset()
        self.position = 0

    def prefill(self, ids: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Logits ``(batch, vocabulary)`` of the next token after prompts ``ids`` ``(batch, n)``, run
        eagerly ``chunk`` tokens at a time (None or 0: at once)."""
        out = None
        for part in ids.split(chunk, dim=1) if chunk else (ids,):
            n = part.shape[1]
            positions = torch.arange(self.position, self.position + n)
            del out
            out = self.model(part, cache_position=positions, use_cache=True, logits_to_keep=1,
                             **{self.arg: self.cache})
            self.position += n
        return out.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, vocabulary)`` after one more token per row, ``token`` ``(batch, 1)``."""
        if self.position >= self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} tokens; it is full")
        position = torch.tensor([self.position])
        kw = {"position_ids": position.expand(token.shape[0], 1), "cache_position": position, "use_cache": True,
              self.arg: self.cache}
        if self.eager_reason is None:
            try:
                out = self.compiled(token, **kw)
            except Exception as exc:  # inductor's failures have no common type
                self.eager_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                warnings.warn(f"torch.compile failed ({self.eager_reason[:300]}); decoding eagerly with the "
                              "static cache", stacklevel=2)
                out = self.model(token, **kw)
        else:
            out = self.model(token, **kw)
        self.position += 1
        return out.logits[:, -1]
