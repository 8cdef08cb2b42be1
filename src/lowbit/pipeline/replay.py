"""Replaying a module from its last linear's recorded inputs (attention -> o_proj, MLP ->
down_proj) once everything before that linear is quantized, instead of recomputing it."""

from __future__ import annotations

import torch
from torch import nn

from lowbit.models import Architecture
from lowbit.pipeline.passes import first_tensor


REPLAY_LIMIT_BYTES = 2 << 30  # recorded inputs per replayed module; above it, the module is recomputed


def plan_replays(
    block: nn.Module, arch: Architecture, block_steps: list[tuple[str, ...]], quantized: set[str]
) -> list["LinearReplay"]:
    """A :class:`LinearReplay` per ``arch.replayed`` module whose last sub-step is a single
    linear quantized in this run (its input is final from that sub-step's pass on). Norms are
    not replayed: recording their outputs cost more (fresh memory per batch) than it saved. The
    norm that feeds a replayed module (its first step's scale source, which feeds nothing else:
    AWQ's folds rely on that too) is skipped while the module replays."""
    replays = []
    for module_name in arch.replayed:
        inside = [i for i, step in enumerate(block_steps) if any(n.startswith(f"{module_name}.") for n in step)]
        if not inside or len(block_steps[inside[-1]]) != 1 or block_steps[inside[-1]][0] not in quantized:
            continue
        source = arch.scale_sources[inside[0]] if arch.scale_sources else None
        feeder = None if source is None or source.startswith(f"{module_name}.") else block.get_submodule(source)
        replays.append(LinearReplay(block.get_submodule(module_name), block, block_steps[inside[-1]][0],
                                    REPLAY_LIMIT_BYTES, feeder))
    return replays


def _pass_through(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    return x


class LinearReplay:
    """Replays a module whose output is its last linear's output (attention -> o_proj, MLP ->
    down_proj) from the inputs ``x`` that linear received, instead of recomputing the module.
    Valid once everything before the linear inside the module is quantized: the runner records
    in the pass that collects the linear's own statistics and starts replaying once the linear
    is quantized. The first replaying pass computes ``linear(x)`` and keeps it, later passes
    reuse it; ``feeder`` (the norm whose output only this module reads) then is skipped too.
    Saves, per block, the attention, two of its three o_proj products, two of the MLP's three
    matrix products and three norms.

    The first replayed batch is checked against the real forward, bit for bit, which also gives
    the output's structure (the tensor, or the tensor followed by ``None`` s); a module whose
    output is anything else is simply recomputed. Inputs and outputs beyond ``limit_bytes``
    are not kept (the module is recomputed, or the linear's output recomputed)."""

    def __init__(self, module: nn.Module, block: nn.Module, linear_name: str, limit_bytes: int,
                 feeder: nn.Module | None = None) -> None:
        self.module = module
        self.block = block
        self.linear_name = linear_name
        self.limit_bytes = limit_bytes
        self.feeder = feeder
        self.kept: list[torch.Tensor] | None = []
        self.outputs: list[torch.Tensor] | None = []
        self._nbytes = 0
        self._next = 0
        self._arity: int | None = None  # None until checked; 0: a bare tensor, else a tuple's length
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def record(self) -> None:
        self._handle = self.block.get_submodule(self.linear_name).register_forward_pre_hook(self._keep)

    def _keep(self, _module: nn.Module, args: tuple) -> None:
        if self.kept is None:
            return
        x = args[0].detach()
        self._nbytes += x.numel() * x.element_size()
        if self._nbytes > self.limit_bytes:
            self.kept = None
        else:
            self.kept.append(x)

    def stop_recording(self) -> None:
        """Record no more (a later pass over the same batches would record them twice)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def start(self) -> None:
        """Replay from the next pass on (the linear is quantized by now)."""
        self.stop_recording()
        if self.kept:
            self.module.forward = self._replay  # type: ignore[method-assign]

    @property
    def replaying(self) -> bool:
        return "forward" in self.module.__dict__

    def _replayed(self, arity: int) -> object:
        assert self.kept
        i = self._next % len(self.kept)
        self._next += 1
        if self.outputs is not None and i < len(self.outputs):
            out = self.outputs[i]
        else:
            out = self.block.get_submodule(self.linear_name)(self.kept[i])
            if self.outputs is not None:
                self._nbytes += out.numel() * out.element_size()
                if self._nbytes > self.limit_bytes:
                    self.outputs = None
                else:
                    self.outputs.append(out)
        return out if arity == 0 else (out, *([None] * (arity - 1)))

    def _replay(self, *args: object, **kwargs: object) -> object:
        if self._arity is not None:
            return self._replayed(self._arity)
        real = type(self.module).forward(self.module, *args, **kwargs)
        tensor = real if isinstance(real, torch.Tensor) else real[0] if isinstance(real, tuple) else None
        rest_none = not isinstance(real, tuple) or all(r is None for r in real[1:])
        self._arity = len(real) if isinstance(real, tuple) else 0
        out = first_tensor(self._replayed(self._arity))
        if not (isinstance(tensor, torch.Tensor) and rest_none and tensor.dtype == out.dtype and torch.equal(tensor, out)):
            self.close()  # not a plain function of its last linear's input: recompute it
        elif self.feeder is not None:
            self.feeder.forward = _pass_through  # type: ignore[method-assign]
        return real

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.module.__dict__.pop("forward", None)
        if self.feeder is not None:
            self.feeder.__dict__.pop("forward", None)
        self.kept = []
        self.outputs = []

