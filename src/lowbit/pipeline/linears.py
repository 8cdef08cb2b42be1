"""Quantizing the linears of one sub-step from their input statistics: the algorithm and codec
of each, together where they read one input, with the output error each one's codes cause."""

from __future__ import annotations

import ctypes
import gc
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.algorithms import RTN, Algorithm, LayerStats, SingularHessianError
from lowbit.calibration.statistics import InputStatistics, StatsRequest
from lowbit.codecs import Codec
from lowbit.errors import LowbitError
from lowbit.modules import QuantLinear, linear_weight


@dataclass
class LinearResult:
    name: str
    error: float  # relative output error ||(W - Q) X|| ^ 2 / ||W X|| ^ 2 on the calibration inputs
    seconds: float
    note: str = ""  # why it fell back to RTN, or the raised dampening
    importance: torch.Tensor | None = field(default=None, repr=False)  # (in,) mean x^2 of its input, when collected
    tokens: int = 0  # calibration tokens that reached it


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


def step_requantizer(names: list[str], assignments: Mapping[str, tuple[Codec, Algorithm]], stats: InputStatistics,
                     ) -> Callable[[list[torch.Tensor], torch.Tensor], list[torch.Tensor] | None]:
    """The sub-step's algorithms as one function for a transform's search: the weights of
    ``names`` (in that order) and a Hessian of their shared input to the weights their codes decode
    to, run together as :func:`quantize_linears` runs them (:func:`shared_runs`), or None when the
    Hessian is singular."""
    runs = shared_runs(names, dict(assignments), dict.fromkeys(names, stats), supplied=False)
    index = {n: i for i, n in enumerate(names)}

    def requantize(weights: list[torch.Tensor], hessian: torch.Tensor) -> list[torch.Tensor] | None:
        layer = LayerStats(hessian=hessian, n_tokens=stats.n_tokens)
        chosen: dict[str, torch.Tensor] = {}
        for run in runs:
            codec, algorithm = assignments[run[0]]
            ws = [weights[index[n]] for n in run]
            try:
                qts = algorithm.quantize_stacked(ws, codec, layer)
            except SingularHessianError:
                return None
            chosen.update({n: qt.dequantize(w.dtype) for n, qt, w in zip(run, qts, ws)})
        return [chosen[n] for n in names]
    return requantize


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


def shared_runs(
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


def merge_requests(requests: Iterable[StatsRequest]) -> StatsRequest:
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

