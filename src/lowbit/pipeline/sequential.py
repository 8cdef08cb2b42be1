"""The sequential (layer-wise) runner for algorithms that need calibration data.

1. Run the model on the calibration samples up to decoder block 0 and keep what block 0
   receives: hidden states plus every keyword the model passes it (position embeddings,
   masks, positions), batch by batch.
2. For each block: load it (from disk when the model is lazy), then for each sub-step of the
   architecture (q/k/v, then o, then gate/up, then down): run the block on the calibration
   inputs with the sub-steps already quantized, stopping as soon as the sub-step's linears have
   seen their input; collect the statistics the algorithms ask for (one ``X^T X`` matrix product
   per batch and per distinct input); let the algorithm transform the block (AWQ) and quantize
   the sub-step's linears. Then run the quantized block once more to produce the next block's
   inputs, and save a resume point. Once a module's output depends only on quantized weights
   (attention after o_proj, the MLP after down_proj) later passes replay it from its last
   linear's recorded inputs (:class:`LinearReplay`).

Forward passes may run in bfloat16 (``compute_dtype``) through CPU autocast (AMX); statistics
are always accumulated in float32 or wider, and weights are quantized from their float32 values.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms import RTN, Algorithm, LayerStats, SingularHessianError, StepContext
from lowbit.calibration.statistics import InputStatistics, StatsRequest
from lowbit.codecs import Codec
from lowbit.errors import LowbitError
from lowbit.models import Architecture
from lowbit.modules import QuantLinear, linear_weight
from lowbit.modules.experts import UnfusedExperts
from lowbit.pipeline.resume import BlockInputs
from lowbit.recipes import Recipe


class _StopForward(Exception):
    """Raised by a hook once the inputs it was waiting for have been seen."""


@dataclass
class LinearResult:
    name: str
    error: float  # relative output error ||(W - Q) X|| ^ 2 / ||W X|| ^ 2 on the calibration inputs
    seconds: float
    note: str = ""  # why it fell back to RTN, or the raised dampening
    importance: torch.Tensor | None = field(default=None, repr=False)  # (in,) mean x^2 of its input, when collected
    tokens: int = 0  # calibration tokens that reached it


@dataclass
class SequentialStats:
    linears: list[LinearResult] = field(default_factory=list)
    resumed_blocks: int = 0
    calibration_tokens: int = 0
    forward_seconds: float = 0.0  # calibration passes, statistics included

    def summary(self) -> str:
        if not self.linears:
            return "no linear quantized"
        by_kind: dict[str, list[float]] = {}
        for r in self.linears:
            by_kind.setdefault(r.name.rsplit(".", 1)[-1], []).append(r.error)
        parts = [f"{k} {sum(v) / len(v):.4f}" for k, v in by_kind.items()]
        notes = [f"{r.name}: {r.note}" for r in self.linears if r.note]
        text = "mean relative output error per linear: " + ", ".join(parts)
        text += (f"\n{sum(r.seconds for r in self.linears):.1f}s choosing codes, {self.forward_seconds:.1f}s in "
                 f"calibration passes over {self.calibration_tokens} tokens")
        if notes:
            text += "\n" + "\n".join(notes)
        return text


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


def _first_tensor(out: object) -> torch.Tensor:
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
            outs.append((_first_tensor(block(hidden, **kw)).to(torch.float32), kw))
    return outs


def collect_step_statistics(
    block: nn.Module,
    names: list[str],
    inputs: BlockInputs,
    request: StatsRequest,
    compute_dtype: torch.dtype,
) -> dict[str, InputStatistics]:
    """Run ``block`` on ``inputs`` until the linears ``names`` have seen their input, per batch;
    linears fed the same tensor share one :class:`InputStatistics`."""
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


def relative_output_error(
    weight: torch.Tensor, quantized: torch.Tensor, stats: InputStatistics, hessian: torch.Tensor | None = None
) -> float:
    """``||(W - Q) X||^2 / ||W X||^2`` from the Hessian when collected, else from sampled rows."""
    d = (weight.to(torch.float32) - quantized.to(torch.float32))
    h = stats.hessian if hessian is None else hessian
    if h is not None:
        h = h.to(torch.float32)
        num = ((d @ h) * d).sum()
        den = ((weight.to(torch.float32) @ h) * weight.to(torch.float32)).sum()
    elif stats.rows is not None:
        num = (stats.rows @ d.t()).square().sum()
        den = (stats.rows @ weight.to(torch.float32).t()).square().sum()
    else:
        return float("nan")
    return float(num / den) if den > 0 else 0.0


def takes_importance(algorithm: Algorithm) -> bool:
    """Whether ``algorithm`` can use a supplied importance matrix instead of collecting one."""
    return isinstance(algorithm, RTN) and algorithm.importance


def supplied_importance(importance: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    """The supplied importance ``(in,)`` of the linear ``name`` (full module name), or a LowbitError."""
    v = importance.get(name)
    if v is None:
        # llama.cpp quantizes such a tensor unweighted, with a warning; silently mixing methods
        # makes a result that no recipe describes, and it usually means a file of another model
        raise LowbitError(f"the importance matrix has no entry for {name}")
    return v


def quantize_linears(
    modules: list[nn.Module], names: list[str], codec: Codec, algorithm: Algorithm, stats: InputStatistics,
    importance: torch.Tensor | None = None,
) -> list[tuple[QuantLinear, LinearResult]]:
    """Quantize linears that read one input (``stats`` is theirs) with one codec and algorithm,
    together (:meth:`Algorithm.quantize_stacked`); ``importance``: a supplied ``(in,)``
    importance used instead of the collected one. Falls back to RTN (with a note) when no
    calibration token reached them or their Hessian is singular. Each result's ``seconds`` is
    its share of the time taken."""
    t0 = time.perf_counter()
    pairs = [linear_weight(m) for m in modules]
    weights = [w for w, _ in pairs]
    hessian = stats.hessian
    collected = stats.mean_square if stats.n_tokens else None
    layer = LayerStats(
        importance=collected if importance is None else importance.to(weights[0].device),
        hessian=hessian,
        rows=stats.rows,
        n_tokens=stats.n_tokens,
    )
    note = ""
    label = ", ".join(names)
    try:
        if stats.n_tokens == 0 and algorithm.needs_calibration and importance is None:
            note = "no calibration token reached it: RTN"
            qts = [RTN().quantize(w, codec, None) for w in weights]
        else:
            qts = algorithm.quantize_stacked(weights, codec, layer)
    except SingularHessianError as e:
        note = f"{e}: RTN"
        warnings.warn(f"{label}: {note}", stacklevel=2)
        qts = [RTN().quantize(w, codec, layer) for w in weights]
    except ValueError as e:
        raise LowbitError(f"cannot quantize {label}: {e}") from None
    out = []
    for name, weight, (_, bias), qt in zip(names, weights, pairs, qts):
        q = QuantLinear(qt, bias)
        dense = qt.dequantize()
        q._dense = dense  # kept while the block is being processed; see release_dense_weights
        err = relative_output_error(weight, dense, stats, hessian) if stats.n_tokens else float("nan")
        out.append((q, LinearResult(name, err, 0.0, note, collected, stats.n_tokens)))
    share = (time.perf_counter() - t0) / len(out)
    for _, r in out:
        r.seconds = share
    return out


def _shared_runs(
    names: list[str], plan: dict[str, tuple[Codec, Algorithm]], stats: dict[str, InputStatistics], supplied: bool,
) -> list[list[str]]:
    """``names`` in runs that :func:`quantize_linears` can take together: the same input
    statistics, codec and algorithm (each alone when a supplied importance is per linear)."""
    runs: dict[tuple, list[str]] = {}
    for n in names:
        codec, algorithm = plan[n]
        key = (n,) if supplied and takes_importance(algorithm) else (id(stats[n]), codec, algorithm)
        runs.setdefault(key, []).append(n)
    return list(runs.values())


def quantize_block_sequential(
    block: nn.Module,
    prefix: str,
    arch: Architecture,
    recipe: Recipe,
    inputs: BlockInputs,
    compute_dtype: torch.dtype,
    skipped: list[str],
    importance: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[LinearResult], BlockInputs]:
    """Quantize the selected linears of one block, sub-step by sub-step (module docstring);
    returns the per-linear results and the quantized block's outputs (the next block's inputs).
    ``importance``: supplied per-linear importances (full names) for the algorithms that take one.

    When an algorithm transforms the block (AWQ), one pass over the unquantized block first
    gives every sub-step its input statistics and the transforms are applied, all before any
    linear is quantized (a transform may rescale a linear of an earlier sub-step)."""
    steps: list[tuple[int, list[str], dict[str, tuple[Codec, Algorithm]]]] = []
    block_steps = arch.block_steps(block)
    for s, step in enumerate(block_steps):
        plan = {n: recipe.assignment(f"{prefix}.{n}") for n in step}
        skipped.extend(f"{prefix}.{n}" for n in step if plan[n] is None)
        names = [n for n in step if plan[n] is not None]
        for n in names:
            try:
                block.get_submodule(n)
            except AttributeError:
                raise LowbitError(f"{arch.family}: block has no module {n}") from None
        if names:
            steps.append((s, names, {n: plan[n] for n in names}))  # type: ignore[misc]

    transforming = [(s, names, plan) for s, names, plan in steps if _step_transformer(names, plan) is not None]
    if transforming:
        all_names = [n for _, names, _ in transforming for n in names]
        request = _merge_requests(a.transform_request() for _, _, plan in transforming for _, a in plan.values())
        first = collect_step_statistics(block, all_names, inputs, request, compute_dtype)
        for s, names, plan in transforming:
            algorithm = _step_transformer(names, plan)
            if len({id(first[n]) for n in names}) != 1:
                continue  # the sub-step's linears do not share one input: nothing to scale
            source = arch.scale_sources[s] if arch.scale_sources else None
            codecs = {n: plan[n][0] for n in names}
            algorithm.transform_step(StepContext(block, prefix, names, codecs, first[names[0]], source, arch.norm_plus_one))  # type: ignore[union-attr]

    experts = block.get_submodule(arch.experts) if arch.experts else None
    if isinstance(experts, UnfusedExperts):
        experts.all_experts = recipe.calibration_config().all_experts
    results: list[LinearResult] = []
    replays = _plan_replays(block, arch, block_steps, {n for _, names, _ in steps for n in names})
    try:
        for _s, names, plan in steps:
            recording = [r for r in replays if r.linear_name in names]
            for r in recording:
                r.record()  # before the statistics hooks, which stop the pass at this linear
            request = _merge_requests(a.stats_request() for _, a in plan.values())
            stats = collect_step_statistics(block, names, inputs, request, compute_dtype)
            for run in _shared_runs(names, plan, stats, importance is not None):
                codec, algorithm = plan[run[0]]
                full = [f"{prefix}.{n}" for n in run]
                given = None
                if importance is not None and takes_importance(algorithm):
                    given = supplied_importance(importance, full[0])
                done = quantize_linears([block.get_submodule(n) for n in run], full, codec, algorithm, stats[run[0]], given)
                for n, (q, result) in zip(run, done):
                    block.set_submodule(n, q)
                    results.append(result)
            for r in recording:
                r.start()
        if isinstance(experts, UnfusedExperts):
            experts.all_experts = False  # same outputs, less work
        next_inputs = run_block(block, inputs, compute_dtype)
    finally:
        for r in replays:
            r.close()
    return results, next_inputs


REPLAY_LIMIT_BYTES = 2 << 30  # recorded inputs per replayed module; above it, the module is recomputed


def _plan_replays(
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

    def start(self) -> None:
        """Replay from the next pass on (the linear is quantized by now)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
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
        out = _first_tensor(self._replayed(self._arity))
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


def _step_transformer(names: list[str], plan: dict[str, tuple[Codec, Algorithm]]) -> Algorithm | None:
    """The algorithm that transforms this sub-step, when all its linears share one that does."""
    algorithms = {plan[n][1] for n in names}
    if len(algorithms) != 1:
        return None
    a = next(iter(algorithms))
    return a if a.transforms_block else None


def _merge_requests(requests: Iterable[StatsRequest]) -> StatsRequest:
    merged = StatsRequest()
    for r in requests:
        merged = merged.merge(r)
    return merged


def release_dense_weights(block: nn.Module, trim_heap: bool = True) -> None:
    """Drop the dequantized copies kept by :func:`quantize_linears` once a block is done; with
    ``trim_heap``, give the freed heap back to the OS (glibc keeps freed arena memory resident
    otherwise: resident memory creeps up block after block although live tensors do not). The
    trim has a price: the next block's passes fault every page of their working set in again,
    about a tenth of a SmolLM2 GPTQ run on 2 cores."""
    for m in block.modules():
        if isinstance(m, QuantLinear):
            m._dense = None
    if trim_heap:
        gc.collect()
        _trim_heap()


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool, initial: int) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit="block", disable=not enabled, initial=initial)
    try:
        yield bar
    finally:
        bar.close()
