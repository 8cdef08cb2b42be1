"""Run untrusted, model-written Python programs (HumanEval checks) in a separate, fenced process.

This is a defence against the mistakes a model makes when it writes code (an endless loop, a
runaway allocation, ``shutil.rmtree`` of the wrong folder, a stray ``subprocess`` call), not a
hardened jail against an adversary. Every program runs as follows.

What it guarantees:

- A separate process: ``sys.executable -I`` (isolated mode: no ``PYTHON*`` variables, no user
  site, no current folder on ``sys.path``) on a small runner script, in its own session and
  process group (``start_new_session``). On timeout, and after every exit, the whole group is
  killed with ``SIGKILL`` before the leader is reaped, so no child it started in that group
  survives the call.
- A fresh temporary folder as working folder, ``HOME`` and ``TMPDIR``, removed afterwards
  (always, also on timeout or error). Environment stripped to ``PATH``, ``HOME``, ``TMPDIR``
  and a UTF-8 locale: no proxies, no tokens. stdin is ``/dev/null``; stdout and stderr are
  captured, at most ``output_limit`` bytes each (the rest is read and dropped).
- Wall-clock timeout (``timeout_s``) and resource limits set by the runner before the program
  runs: address space (``memory_mb``), CPU seconds (the timeout, rounded up, plus one), size of
  any file written (``RLIMIT_FSIZE``), open files, no core dumps, and ``RLIMIT_NPROC``; the latter
  is not enforced for root, which is what this machine runs as, so it is not relied on. (The
  limits are set by the runner rather than in ``preexec_fn``, which is unsafe in a process with
  threads, as :func:`run_programs` has; they are in place before any line of the program runs.)
- An audit hook (``sys.addaudithook``, PEP 578), installed before the program runs, refuses by
  raising :class:`SandboxViolation` (a ``PermissionError``):
  network (every ``socket.*`` event: creation, connect, bind, getaddrinfo, sendto, ...; and the
  ``http``/``ftp``/``smtp``/``urllib`` events); process creation and signals (``os.fork``,
  ``os.forkpty``, ``os.posix_spawn``, ``os.exec``, ``os.spawn``, ``os.system``,
  ``subprocess.Popen``, ``os.kill``, ``os.killpg``, ``pty``); ``ctypes`` (loading libraries, raw
  memory: ``import ctypes`` itself fails); raising resource limits; and every write outside the
  temporary folder: ``open`` for writing, appending, creating or truncating, ``os.remove``,
  ``os.rmdir``, ``os.rename``/``os.replace``, ``os.link``, ``os.symlink``, ``os.mkdir``,
  ``os.chmod``, ``os.chown``, ``os.truncate``, ``os.utime``, extended attributes,
  ``shutil.rmtree``/``copyfile``/``copytree``/``move``/``chown``/archives, ``tempfile``. Paths are
  resolved (``dir_fd``, symlinks of the path and of its folder) before the check; a path that
  cannot be resolved is refused. A program that dies of a refusal gets status ``refused``.
- If ``unshare --net`` (or, as a non-root user, ``unshare -rn``) works here (probed once per
  process), the program runs in a new network namespace with no interface but a downed
  loopback: even code that got past the hook reaches no network, not even 127.0.0.1.

What it does not guarantee:

- Reading: the program can read every file the calling user can (here: root).
- It runs as the calling user; there is no seccomp filter, chroot or mount namespace. Native
  code or interpreter internals can get around an audit hook (``_posixsubprocess.fork_exec``
  called directly, ``os.open`` with ``dir_fd``, which the ``open`` event does not report, or
  ``os.setsid`` in a child to leave the process group); the audit hook is the main fence, the
  process group kill and the network namespace are second lines.
- CPU and memory of the machine are shared; the limits bound one program, not the load.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Sequence

from tqdm.auto import tqdm

STATUSES = ("passed", "failed", "timeout", "refused", "memory", "error")
_REFUSED_EXIT = 86  # the runner's exit code when the program died of a refused operation
_MEMORY_EXIT = 87  # ... of a MemoryError
_TAIL = 4096  # bytes of the end of stderr always kept, for the one-line detail

# The runner: the only code that runs before the program. It sets the limits, reads and
# compiles the program, installs the audit hook and executes the program in fresh globals.
_RUNNER = r'''
import json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1])
for name, (soft, hard) in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
sys.dont_write_bytecode = True  # no __pycache__ writes into the library folders
ROOT = os.path.realpath(cfg["root"])
with open(cfg["program"], encoding="utf-8") as f:
    code = compile(f.read(), cfg["program"], "exec")

class SandboxViolation(PermissionError):
    pass

DENY_PREFIX = ("socket.", "ctypes.", "subprocess.", "pty.", "http.client.", "ftplib.", "smtplib.",
               "poplib.", "imaplib.", "nntplib.", "telnetlib.", "urllib.", "webbrowser.")
DENY = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.startfile",
        "os.kill", "os.killpg", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit"}
# event -> (index of a path argument, index of its dir_fd argument or None), one pair per path
PATHS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.truncate": ((0, None),),
    "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.mkdir": ((0, 2),), "os.utime": ((0, 3),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),), "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
    "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),),
    "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),),
    "shutil.make_archive": ((0, None),), "shutil.unpack_archive": ((1, None),),
    "tempfile.mkstemp": ((0, None),), "tempfile.mkdtemp": ((0, None),),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def resolve(path, dir_fd):
    if isinstance(path, int):  # a file descriptor: where it points
        return os.readlink(f"/proc/self/fd/{path}")
    path = os.fsdecode(path)
    if not os.path.isabs(path) and isinstance(dir_fd, int) and dir_fd >= 0:
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)

def inside(path):
    # both the path followed through symlinks and the path itself (its folder resolved) must lie in ROOT
    for p in (os.path.realpath(path),
              os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))):
        if p != ROOT and not p.startswith(ROOT + os.sep):
            return False
    return True

def refuse(event, what=""):
    raise SandboxViolation(f"sandbox refused {event}{': ' + what if what else ''}")

def check_path(event, path, dir_fd):
    try:
        full = resolve(path, dir_fd)
        ok = inside(full)
    except Exception:
        full, ok = repr(path), False
    if not ok:
        refuse(event, full)

def hook(event, args):
    if event in DENY or event.startswith(DENY_PREFIX):
        refuse(event)
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writing and not isinstance(path, int) and os.fsdecode(path) != "/dev/null":
            check_path(event, path, None)
        return
    for i, j in PATHS.get(event, ()):
        if i < len(args):
            check_path(event, args[i], args[j] if j is not None and j < len(args) else None)

def violation(e):
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, SandboxViolation):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None

if cfg["audit"]:
    sys.addaudithook(hook)
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit:
    raise
except BaseException as e:
    traceback.print_exc()
    v = violation(e)
    last = v or e
    sys.stderr.write(f"{type(last).__name__}: {last}\n" if str(last) else f"{type(last).__name__}\n")
    sys.stderr.flush()
    sys.exit(_REFUSED if v is not None else _MEMORY if isinstance(e, MemoryError) else 1)
'''.replace("_REFUSED", str(_REFUSED_EXIT)).replace("_MEMORY", str(_MEMORY_EXIT))


@dataclass(frozen=True)
class ExecResult:
    """How one program ended. ``status`` is one of :data:`STATUSES`; ``detail`` one short line
    (the exception that ended it, or why it was stopped); ``seconds`` wall time of the process;
    ``pid`` its process id, which is also its session and process group id."""

    status: str
    passed: bool
    detail: str
    seconds: float
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    pid: int | None = None


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """The command prefix that runs a program without network (``unshare --net``, or
    ``unshare -rn`` for a non-root user), or ``()`` when neither works here. Probed once."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in (("unshare", "--net", "--"), ("unshare", "-rn", "--")):
        try:
            ok = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                capture_output=True, timeout=20).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    return ()


def run_program(
    source: str,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    *,
    output_limit: int = 65536,
    file_size_mb: int = 16,
    network_namespace: bool | None = None,
    audit_hook: bool = True,
) -> ExecResult:
    """Run the Python ``source`` in the sandbox described in this module's docstring.

    ``timeout_s``: wall-clock seconds; ``memory_mb``: address-space limit in MiB;
    ``output_limit``: bytes of stdout and of stderr kept; ``file_size_mb``: the largest file the
    program may write; ``network_namespace``: None runs in a network namespace when one is
    available, False never, True requires one; ``audit_hook=False`` leaves the audit hook out
    (for testing the other fences only; never for model-written code).
    """
    prefix = _prefix(network_namespace)
    root = tempfile.mkdtemp(prefix="lowbit-sandbox-")
    try:
        program = Path(root, "program.py")
        program.write_text(source, encoding="utf-8")
        cfg = {"root": root, "program": str(program), "audit": audit_hook,
               "limits": _limits(timeout_s, memory_mb, file_size_mb)}
        argv = [*prefix, sys.executable, "-I", "-c", _RUNNER, json.dumps(cfg)]
        return _execute(argv, root, timeout_s, output_limit)
    finally:
        _remove_tree(root)


def run_programs(sources: Sequence[str], workers: int = 2, progress: bool = False, desc: str = "sandbox",
                 **kwargs: Any) -> list[ExecResult]:
    """:func:`run_program` on each source, ``workers`` at a time; results in the order of ``sources``.
    ``kwargs`` go to :func:`run_program`."""
    results: list[ExecResult | None] = [None] * len(sources)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(sources), desc=desc, unit="prog", disable=not progress, leave=False) as bar:
        futures = {pool.submit(run_program, s, **kwargs): i for i, s in enumerate(sources)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    return results  # type: ignore[return-value]


def _prefix(network_namespace: bool | None) -> tuple[str, ...]:
    if network_namespace is False:
        return ()
    prefix = network_namespace_prefix()
    if network_namespace and not prefix:
        raise RuntimeError("no network namespace available: `unshare --net` and `unshare -rn` both fail here")
    return prefix


def _limits(timeout_s: float, memory_mb: int, file_size_mb: int) -> dict[str, tuple[int, int]]:
    cpu = math.ceil(timeout_s) + 1  # SIGXCPU at the soft limit, SIGKILL one second later
    return {
        "RLIMIT_AS": (memory_mb << 20, memory_mb << 20),
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_FSIZE": (file_size_mb << 20, file_size_mb << 20),
        "RLIMIT_NOFILE": (256, 256),
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NPROC": (64, 64),  # not enforced for root
    }


def _env(root: str) -> dict[str, str]:
    return {"PATH": os.defpath, "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _execute(argv: list[str], root: str, timeout_s: float, output_limit: int) -> ExecResult:
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(argv, cwd=root, env=_env(root), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
    except OSError as e:
        return ExecResult("error", False, f"could not start the sandbox: {e}", time.perf_counter() - t0)
    readers = [_Reader(proc.stdout, output_limit), _Reader(proc.stderr, output_limit)]  # type: ignore[arg-type]
    try:
        finished = _wait_unreaped(proc.pid, timeout_s)
    finally:
        # The leader is still unreaped (a zombie at worst), so its pid, the group id, cannot have
        # been reused: killing the group hits only what the program started.
        _kill_group(proc.pid)
        proc.wait()
    seconds = time.perf_counter() - t0
    for r in readers:
        r.join(2.0)  # a writer that left the group could keep a pipe open: do not wait for it
    out, err = readers[0].text(), readers[1].text()
    status, detail = _classify(finished, proc.returncode, readers[1].tail_line(), timeout_s)
    return ExecResult(status, status == "passed", detail, seconds, proc.returncode, out, err, proc.pid)


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait until ``pid`` exits, without reaping it; False if ``timeout_s`` passed first."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _classify(finished: bool, rc: int | None, last_line: str, timeout_s: float) -> tuple[str, str]:
    if not finished:
        return "timeout", f"timed out after {timeout_s:g} s"
    if rc == 0:
        return "passed", "ok"
    if rc is not None and rc < 0:
        sig = signal.Signals(-rc)
        if sig in (signal.SIGXCPU, signal.SIGKILL) and "MemoryError" not in last_line:
            return "timeout", f"killed by {sig.name} (CPU time limit)"
        return "failed", f"killed by {sig.name}"
    if rc == _REFUSED_EXIT:
        return "refused", last_line or "sandbox refused an operation"
    if rc == _MEMORY_EXIT or last_line.startswith("MemoryError"):
        return "memory", last_line or "MemoryError"
    return "failed", last_line or f"exit status {rc}"


class _Reader(threading.Thread):
    """Drains one pipe: keeps its first ``limit`` bytes and its last ``_TAIL`` bytes."""

    def __init__(self, pipe: IO[bytes], limit: int) -> None:
        super().__init__(daemon=True)
        self.pipe, self.limit = pipe, limit
        self.head = bytearray()
        self.tail = b""
        self.truncated = False
        self.start()

    def run(self) -> None:
        with self.pipe:
            while chunk := self.pipe.read1(65536):  # type: ignore[attr-defined]
                room = self.limit - len(self.head)
                self.head += chunk[:max(room, 0)]
                self.truncated |= len(chunk) > room
                self.tail = (self.tail + chunk)[-_TAIL:]

    def text(self) -> str:
        return self.head.decode("utf-8", "replace") + ("\n[... output cut]" if self.truncated else "")

    def tail_line(self) -> str:
        lines = [ln.strip() for ln in self.tail.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""


def _remove_tree(root: str) -> None:
    def make_writable_and_retry(func: Any, path: str, _exc: Any) -> None:
        # the program may have chmod-ed its own folders read-only
        try:
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass

    shutil.rmtree(root, onerror=make_writable_and_retry)
