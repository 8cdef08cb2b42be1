"""lowbit's own fused CPU operators (``native_ops.cpp``), compiled with the machine's C++ compiler on
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

_SOURCE = Path(__file__).with_name("native_ops.cpp")
_loaded: list[ModuleType | None] = []  # empty until the first call; then the module or None


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
    """The compiled operators (``quantize_rows``, ``dequantize_rows``), or None where they are turned
    off or cannot be built here."""
    if _loaded:
        return _loaded[0]
    module = None
    if os.environ.get("LOWBIT_NATIVE", "1") != "0":
        module = _build()
    _loaded.append(module)
    return module


def _build() -> ModuleType | None:
    import torch
    from torch.utils import cpp_extension

    source = _SOURCE.read_bytes()
    # the name keys torch's build cache: a new source, torch or CPU builds anew
    key = hashlib.sha256(source + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:12]
    name = f"lowbit_native_{key}"
    directory = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(directory.glob(f"{name}*.so")):
        print("lowbit: compiling its fused CPU operators (once per machine, about 20 s)", file=sys.stderr)
    flags = ["-O3", "-march=native", "-fopenmp"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on compiler versions
            return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=flags,
                                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means: run the eager path
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"lowbit's fused CPU operators could not be built ({first[:200]}); using the eager path, "
                      "same results, slower", RuntimeWarning, stacklevel=3)
        return None
