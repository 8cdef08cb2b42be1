"""``lowbit sweep``: run every cell of a sweep file in its own processes, keep each result as it
finishes, and on restart skip what is done.

Locally (``jobs`` workers) the quality stages of the cells run side by side and then the timing
stages run one at a time with nothing else running, so no two cells are ever timed against each
other. On Ray (``ray_address``: an address, or ``""`` to start a local cluster) each cell is one
task running both stages on one node; a timed cell asks for a whole node's CPUs, so it runs
alone there. A failed cell (an error, a crash, a kill for memory or time) is recorded with its
error and the sweep goes on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lowbit.bench.cell import describe, die_with_parent
from lowbit.bench.results import ResultsStore
from lowbit.bench.sweep_spec import Cell, expand_cells, load_sweep
from lowbit.errors import LowbitError

QUALITY_FIELDS = ("quant_seconds", "texts", "size", "humaneval", "layers", "model_fingerprint")


@dataclass
class SweepSummary:
    cells: int
    skipped: int = 0  # already done in the store
    resumed: int = 0  # measured by an earlier run; only their timing stage runs now
    done: int = 0
    failed: list[str] = field(default_factory=list)  # cell ids

    def count(self, cell: Cell, error: str | None) -> None:
        """One cell finished now: done, or failed with ``error``."""
        if error is None:
            self.done += 1
        else:
            self.failed.append(cell.cell)


def run_sweep(sweep_file: Path, results: Path, jobs: int = 1, ray_address: str | None = None,
              retry_failed: bool = False, progress: bool = True) -> SweepSummary:
    """Run the cells of ``sweep_file`` that ``results`` does not hold as done (nor as failed,
    unless ``retry_failed``). ``ray_address``: None runs locally; ``""`` starts a local Ray
    cluster; anything else is the address of a running one."""
    if jobs < 1:
        raise LowbitError(f"--jobs must be at least 1, got {jobs}")
    spec = load_sweep(sweep_file)
    cells = expand_cells(spec, base_dir=Path(sweep_file).parent)
    if ray_address:
        check_ray_address(ray_address)  # one clear line before the store is even created
    store = ResultsStore(results)
    summary = SweepSummary(cells=len(cells))
    todo, kept_failed = [], 0
    for c in cells:
        status = (store.get(c.cell) or {}).get("status")
        if status == "done" or (status == "failed" and not retry_failed):
            summary.skipped += 1
            kept_failed += status == "failed"
        else:
            todo.append(c)
    if kept_failed:
        print(f"lowbit: {kept_failed} failed cells kept as they are (--retry-failed runs them again)", file=sys.stderr)
    threads = spec.resources.cpus or max(1, (os.cpu_count() or 1) // jobs)
    timing_threads = spec.resources.cpus or os.cpu_count() or 1  # a timing stage runs alone
    # Ray tells when a task ends, not when it starts: its cells are submitted (queued or running)
    board = _Board(len(cells), summary.skipped, progress, "running" if ray_address is None else "in Ray")
    try:
        if ray_address is None:
            _run_local(todo, store, jobs, threads, timing_threads, board, summary)
        else:
            _run_ray(todo, store, ray_address, threads, timing_threads, board, summary)
    finally:
        board.close()
    return summary


class _Board:
    """The progress display: cells done, running and failed."""

    def __init__(self, total: int, skipped: int, enabled: bool, running: str = "running") -> None:
        self.bar = tqdm(total=total, initial=skipped, desc="cells", unit="cell", disable=not enabled,
                        file=sys.stderr, dynamic_ncols=True)
        self.running: set[str] = set()
        self.running_label = running
        self.failed = 0
        self.lock = threading.Lock()
        self._show()

    def start(self, name: str) -> None:
        with self.lock:
            self.running.add(name)
            self._show()

    def finish(self, name: str, error: str | None, done: bool) -> None:
        with self.lock:
            self.running.discard(name)
            if error is not None:
                self.failed += 1
                self.bar.write(f"lowbit: cell {name} failed: {error}", file=sys.stderr)
            if done or error is not None:
                self.bar.update(1)
            self._show()

    def _show(self) -> None:
        self.bar.set_postfix_str(f"{self.running_label} {len(self.running)}, failed {self.failed}"
                                 + (f" ({', '.join(sorted(self.running))[:60]})" if self.running else ""))

    def close(self) -> None:
        self.bar.close()


def _label(cell: Cell) -> str:
    return f"{cell.model}/{cell.recipe}"


def _record(store: ResultsStore, cell: Cell, fields: dict[str, Any], status: str, error: str | None,
            seconds: float, stage: str | None = None) -> None:
    """Write ``cell``'s row: the fields a stage measured over those its quality stage kept."""
    previous = store.get(cell.cell) or {}
    resumed = previous.get("status") == "partial"
    row = describe(cell)
    if resumed:
        row["started_at"] = previous.get("started_at", row["started_at"])
        row.update({k: previous.get(k) for k in QUALITY_FIELDS})
    row.update(fields)
    for k in (*QUALITY_FIELDS, "speed", "memory", "llama_bench"):
        row.setdefault(k, None)
    row.update(status=status, error=error, failed_stage=stage if error else None,
               seconds=round(seconds + (previous.get("seconds", 0.0) if resumed else 0.0), 3))
    store.put(row)


def _run_local(cells: list[Cell], store: ResultsStore, jobs: int, threads: int, timing_threads: int, board: _Board,
               summary: SweepSummary) -> None:
    work_root = store.root / "work"

    def quality(cell: Cell) -> None:
        board.start(_label(cell))
        t0 = time.perf_counter()
        fields, error = run_stage_process(cell, "quality", work_root / cell.cell, threads)
        seconds = time.perf_counter() - t0
        if error is not None:
            _record(store, cell, {}, "failed", error, seconds, "quality")
            shutil.rmtree(work_root / cell.cell, ignore_errors=True)
            summary.count(cell, error)
        else:
            _record(store, cell, fields, "partial" if cell.timed else "done", None, seconds)
            if not cell.timed:
                shutil.rmtree(work_root / cell.cell, ignore_errors=True)
                summary.count(cell, None)
        board.finish(_label(cell), error, done=not cell.timed)

    pending = [c for c in cells if (store.get(c.cell) or {}).get("status") != "partial"
               or not (work_root / c.cell).exists()]
    summary.resumed = len(cells) - len(pending)  # measured before; their models wait in work/ (Ray redoes both)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in as_completed([pool.submit(quality, c) for c in pending]):
            f.result()
    for cell in cells:  # the timing stages: one at a time, nothing else running
        if not cell.timed or (store.get(cell.cell) or {}).get("status") != "partial":
            continue
        board.start(_label(cell))
        t0 = time.perf_counter()
        fields, error = run_stage_process(cell, "timing", work_root / cell.cell, timing_threads)
        seconds = time.perf_counter() - t0
        _record(store, cell, fields, "failed" if error else "done", error, seconds, "timing")
        shutil.rmtree(work_root / cell.cell, ignore_errors=True)
        summary.count(cell, error)
        board.finish(_label(cell), error, done=True)


def run_stage_process(cell: Cell, stage: str, work: Path, threads: int) -> tuple[dict[str, Any], str | None]:
    """Run one stage of ``cell`` in a new process group, killed when it exceeds the cell's memory or
    time; its result fields, or an error line."""
    work.mkdir(parents=True, exist_ok=True)
    cell_file = work / "cell.json"
    cell_file.write_text(cell.model_dump_json())
    out = work / f"{stage}.json"
    out.unlink(missing_ok=True)
    log = work / f"{stage}.log"
    res = cell.resources
    with open(log, "w") as logf:
        p = subprocess.Popen([sys.executable, "-m", "lowbit.bench.cell", str(cell_file), stage, str(work), str(out),
                              str(threads)], stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                             preexec_fn=die_with_parent)
        killed = _watch(p, res.memory_gb, res.timeout_minutes)
    if killed is not None:
        return {}, killed
    if out.is_file():
        data = json.loads(out.read_text())
        if p.returncode == 0:
            return data, None
        if "error" in data:
            return {}, data["error"]
    if p.returncode < 0:
        name = signal.Signals(-p.returncode).name
        why = " (out of memory?)" if p.returncode == -signal.SIGKILL else ""
        return {}, f"{stage} stage killed by {name}{why}; log: {log}"
    tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
    return {}, f"{stage} stage crashed (exit status {p.returncode}): {tail[0][:300]}"


def _watch(p: subprocess.Popen, memory_gb: float | None, timeout_minutes: float | None) -> str | None:
    """Wait for ``p``; kill its process group and say why if it holds more than ``memory_gb`` of
    resident memory (its whole process tree) or runs longer than ``timeout_minutes``."""
    import psutil

    t0 = time.monotonic()
    reason = None
    while p.poll() is None:
        if timeout_minutes is not None and time.monotonic() - t0 > 60 * timeout_minutes:
            reason = f"killed after {timeout_minutes:g} minutes (resources.timeout_minutes)"
        elif memory_gb is not None:
            rss = _tree_rss(psutil, p.pid)
            if rss > memory_gb * 2**30:
                reason = (f"out of memory: its processes held {rss / 2**30:.2f} GiB, above resources.memory_gb "
                          f"{memory_gb:g}")
        if reason is not None:
            break
        time.sleep(0.2)
    _kill_group(p)
    return reason


def _tree_rss(psutil: Any, pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def check_ray_address(address: str) -> None:
    """One clear LowbitError unless something answers at the Ray address ``address``
    (``host:port`` or ``ray://host:port``) within 5 seconds."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LowbitError(f"--ray {address}: expected HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise LowbitError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e})") from None


def _run_ray(cells: list[Cell], store: ResultsStore, address: str, threads: int, timing_threads: int, board: _Board,
             summary: SweepSummary) -> None:
    try:
        import ray
    except ImportError:
        raise LowbitError("--ray needs Ray: pip install 'lowbit[lab]'") from None
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        whole_node = max(1.0, min(node_cpus) if node_cpus else 1.0)
        remote = ray.remote(_ray_cell)
        futures = {}
        for cell in cells:
            cpus = max(float(timing_threads), whole_node) if cell.timed else float(threads)
            ref = remote.options(num_cpus=min(cpus, whole_node), num_gpus=cell.resources.gpus).remote(
                cell.model_dump_json(), threads, timing_threads)
            futures[ref] = cell
            board.start(_label(cell))
        pending = list(futures)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            cell = futures[ready[0]]
            try:
                fields, error, stage, seconds = ray.get(ready[0])
            except Exception as e:  # the worker died: Ray says so with its own exception
                fields, error, stage, seconds = {}, f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}", None, 0.0
            _record(store, cell, fields, "failed" if error else "done", error, seconds, stage)
            summary.count(cell, error)
            board.finish(_label(cell), error, done=True)
    finally:
        ray.shutdown()


def _ray_cell(cell_json: str, threads: int, timing_threads: int) -> tuple[dict[str, Any], str | None, str | None, float]:
    """A Ray task: both stages of one cell in a temporary folder of the worker's node."""
    cell = Cell.model_validate_json(cell_json)
    fields: dict[str, Any] = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lowbit-cell-") as tmp:
        for stage in ("quality", "timing") if cell.timed else ("quality",):
            part, error = run_stage_process(cell, stage, Path(tmp), threads if stage == "quality" else timing_threads)
            if error is not None:
                return {}, error, stage, time.perf_counter() - t0
            fields.update(part)
    return fields, None, None, time.perf_counter() - t0
