"""Outputs on disk: checked before any work, written so that a failure never leaves a partial one.

:func:`check_output` runs before a long job (is the path free, can its folder take a file, is
there room); :func:`atomic_folder` and :func:`atomic_file` write into a hidden temporary name
beside the target and rename it only when complete. A write that fails (a full disk, a folder
made read-only meanwhile) is one LowbitError line, and the temporary is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lowbit.errors import LowbitError

# room kept free beyond an output's own size: the file system's metadata, the rest of the machine
FREE_SPACE_MARGIN = 64 * 2**20


def existing_folder(path: Path) -> Path:
    """The nearest folder above ``path`` that exists (where ``path``'s missing parents would be
    made); LowbitError when that nearest existing thing is a file."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise LowbitError(f"cannot write {path}: {parent} is a file, not a folder")
    return parent


def check_output(out: Path, overwrite: bool = False, nbytes: int = 0, what: str = "output") -> None:
    """LowbitError, before any work, unless ``out`` can be written: it does not exist (or
    ``overwrite``), the folder it goes in exists or can be made, a file can be created there
    (tried: permissions, a read-only mount), and the disk has ``nbytes`` free plus a margin."""
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise LowbitError(f"{what} {out} exists (pass --overwrite to replace it)")
    parent = existing_folder(out)
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise LowbitError(f"cannot write {out}: {parent} does not take new files ({e.strerror or e})") from None
    if nbytes:
        free = shutil.disk_usage(parent).free
        if free < nbytes + FREE_SPACE_MARGIN:
            raise LowbitError(f"cannot write {out}: it needs about {_mb(nbytes)} and {parent} has {_mb(free)} free")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


@contextlib.contextmanager
def _writing(out: Path, overwrite: bool, what: str) -> Iterator[None]:
    """Around the writing of ``out``: refuse an existing one unless ``overwrite``, make its missing
    parent folders (removed again on a failure), and turn OSError (and the safetensors library's
    own I/O error) into one LowbitError line."""
    from safetensors import SafetensorError

    if out.exists() and not overwrite:
        raise LowbitError(f"{what} {out} exists (pass --overwrite to replace it)")
    made = []
    parent = existing_folder(out)
    above = out.absolute().parent
    while above != parent:
        made.append(above)
        above = above.parent
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            yield
        except BaseException:
            for folder in made:  # innermost first; a folder something else wrote into stays
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    except OSError as e:
        raise LowbitError(f"cannot write {out}: {e.strerror or e} (nothing was written)") from None
    except SafetensorError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "os error 28" in detail or "No space left" in detail:
            detail = "No space left on device"
        raise LowbitError(f"cannot write {out}: {detail} (nothing was written)") from None


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``out``; when the block ends without an error it
    becomes ``out`` (replacing an existing one only with ``overwrite``), else it is removed."""
    out = Path(out)
    with _writing(out, overwrite, "output folder"):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            if out.exists():
                old = out.with_name(f".{out.name}.old-{time.time_ns()}")
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside the file ``out``; when the block ends without an error it
    replaces ``out`` (an existing one only with ``overwrite``), else it is removed."""
    out = Path(out)
    with _writing(out, overwrite, "output file"):
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            yield tmp
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it: a reader sees the old
    file or the new one, never half of one. The file gets the mode ``open()`` would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # not mkstemp's 0600, which would hide a shared store from its group
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
