"""lowbit's own CPU operators (``native_ops.cpp``: W8A8's fused input rounding and output rescale;
``native_decode.cpp``: a decode step's products of a few rows with a whole weight, and its
one-query attention; ``native_int4.cpp``: the same product for 4-bit weights; ``native_prefill.cpp``: causal
attention of whole windows), compiled with the machine's C++ compiler on
first use (about 20 s, once per machine and source version; torch's extension cache keeps the
library) and loaded by later processes in well under a second.

They are optional: every caller has an eager path that gives bit-identical results. Where the
compiler is missing or the build fails, :func:`native_ops` returns None after one warning, and
``LOWBIT_NATIVE=0`` turns them off (the eager path's speed, e.g. to compare).
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

_SOURCES = [Path(__file__).with_name(n) for n in ("native_ops.cpp", "native_decode.cpp", "native_int4.cpp",
                                                          "native_prefill.cpp", "native_common.h")]
_loaded: list[ModuleType | None] = []  # empty until the first call; then the module or None
_shapes_declared: list[bool] = []  # torch.library takes each operator's fake implementation once per process
_vectorized: dict[str, bool] = {}  # row_products() and int4_rows(), once known


def _cpu_flags() -> str:
    """The CPU's feature flags (the library is built for this CPU: -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def native_ops() -> ModuleType | None:
    """The compiled operators (``quantize_rows``, ``dequantize_rows``, ``rows_vectorized``; loading it
    registers ``torch.ops.lowbit.dense_rows``, ``int8_rows``, ``int8_int8_rows``, ``llm_int8_rows``,
    ``int4_rows``, ``int4_dense``, ``causal_attention`` and ``one_query_attention``), or None where they are turned off or
    cannot be built here."""
    if _loaded:
        return _loaded[0]
    module = None
    if os.environ.get("LOWBIT_NATIVE", "1") != "0":
        module = _build()
        if module is not None:
            _declare_shapes()
    _loaded.append(module)
    return module


def row_products() -> bool:
    """Whether the decode operators (``torch.ops.lowbit.dense_rows``, ``int8_rows``, ``int8_int8_rows``,
    ``llm_int8_rows``, ``one_query_attention``) are here and vectorized (AVX-512): callers use them only then (their
    plain-loop build is right but slow)."""
    return _vectorized_here("rows_vectorized")


def int4_rows() -> bool:
    """Whether ``torch.ops.lowbit.int4_rows`` is here and vectorized (AVX-512 BF16)."""
    return _vectorized_here("int4_rows_vectorized")


def _vectorized_here(flag: str) -> bool:
    """The library's answer to ``flag`` (False where it is not built), asked once: a compiled graph's tracing reads
    the answer, not the library."""
    if flag not in _vectorized:
        module = native_ops()
        _vectorized[flag] = module is not None and bool(getattr(module, flag)())
    return _vectorized[flag]


def _declare_shapes() -> None:
    """The operators' output shapes for torch.compile's tracing (fake tensors)."""
    import torch

    if _shapes_declared:
        return
    _shapes_declared.append(True)

    @torch.library.register_fake("lowbit::dense_rows")
    def _dense_rows(x, weight, bias):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lowbit::int8_rows")
    def _int8_rows(x, weight, scale):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("lowbit::int8_int8_rows")
    def _int8_int8_rows(x, weight, w_sums):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.int32)

    @torch.library.register_fake("lowbit::llm_int8_rows")
    def _llm_int8_rows(x, weight, scale, w_sums, threshold):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32), x.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("lowbit::int4_rows")
    def _int4_rows(x, codes, scale, zero, group_size):  # type: ignore[no-untyped-def]
        return x.new_empty(x.shape[0], codes.shape[0])

    @torch.library.register_fake("lowbit::int4_dense")
    def _int4_dense(codes, scale, zero, group_size, K, dtype):  # type: ignore[no-untyped-def]
        return codes.new_empty(codes.shape[0], K, dtype=dtype)

    @torch.library.register_fake("lowbit::causal_attention")
    def _causal_attention(q, k, v, scale):  # type: ignore[no-untyped-def]
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @torch.library.register_fake("lowbit::one_query_attention")
    def _one_query_attention(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
        return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[2])


def _build() -> ModuleType | None:
    import torch
    from torch.utils import cpp_extension

    source = b"".join(p.read_bytes() for p in _SOURCES)
    # the name keys torch's build cache: a new source, torch or CPU builds anew
    key = hashlib.sha256(source + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:12]
    name = f"lowbit_native_{key}"
    directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(directory.glob(f"{name}*.so")):
        print("lowbit: compiling its CPU operators (once per machine, about 30 s)", file=sys.stderr)
    flags = ["-O3", "-march=native", "-fopenmp"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on compiler versions
            return cpp_extension.load(name=name, sources=[str(p) for p in _SOURCES if p.suffix == ".cpp"], extra_cflags=flags,
                                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: run the eager path
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"lowbit's fused CPU operators could not be built ({first[:200]}); using the eager path, "
                      "same results, slower", RuntimeWarning, stacklevel=3)
        return None
