"""lowbit sweep: validation before work, every cell stored as it finishes, resume after a kill,
failed cells recorded while the sweep goes on, and Ray giving the local results."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lowbit.bench.results import HEADER, ResultsStore, load_results
from lowbit.bench.sweep import check_ray_address, run_sweep, run_stage_process
from lowbit.bench.sweep_spec import expand_cells, load_sweep
from lowbit.errors import LowbitError
from conftest import sample_text

INT4 = {"name": "int4-g32", "recipe": {"codec": {"name": "int", "bits": 4, "granularity": "group", "group_size": 32}}}


@pytest.fixture
def sweep_dir(tmp_path: Path, hf_folder, lowbit_cache) -> Path:  # type: ignore[no-untyped-def]
    hf_folder(name="tiny")
    (tmp_path / "text.txt").write_text(sample_text(4000))
    return tmp_path


def write_sweep(folder: Path, recipes: list, name: str = "sweep.yaml", **more: object) -> Path:
    spec = {"models": [str(folder / "tiny")], "recipes": recipes,
            "evaluations": {"texts": [str(folder / "text.txt")], "seq_len": 64, "max_windows": 2,
                            "speed": {"prompt_tokens": 8, "new_tokens": 4, "repeats": 1}, **more.pop("evaluations", {})},
            **more}
    path = folder / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("change, named", [
    ({"models": ["no-such-model"]}, "unknown model 'no-such-model'"),
    ({"recipes": ["int8", "no-such-preset"]}, "recipe 'no-such-preset': unknown preset"),
    ({"recipez": ["int8"]}, "recipez: unknown field"),
    ({"evaluations": {"speed": {"batchh": 1}}}, "evaluations.speed.batchh: unknown field"),
    ({"recipes": ["int8", "int8"]}, "repeated: int8"),
])
def test_a_bad_sweep_file_is_named_before_anything_runs(tmp_path: Path, change: dict, named: str) -> None:
    spec = {"models": ["smollm2-135m"], "recipes": ["int8"], **change}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(LowbitError, match=named.replace("(", r"\(")):
        run_sweep(path, tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_a_store_of_another_schema_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "old"
    store.mkdir()
    (store / HEADER).write_text(json.dumps({"schema": 0, "lowbit_version": "0.0.1"}))
    with pytest.raises(LowbitError, match="schema 0 .*reads schema 1"):
        ResultsStore(store)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(LowbitError, match="not a lowbit results store"):
        ResultsStore(tmp_path / "other")


def test_cells_change_when_the_evaluation_changes(sweep_dir: Path) -> None:
    a = expand_cells(load_sweep(write_sweep(sweep_dir, ["int8"])))
    b = expand_cells(load_sweep(write_sweep(sweep_dir, ["int8"], name="b.yaml", evaluations={"max_windows": 3})))
    assert a[0].cell != b[0].cell  # a store never mixes rows measured another way


def test_a_dense_row_is_known_by_its_recipe_not_its_name(sweep_dir: Path) -> None:
    recipes = [{"name": "bf16", "recipe": "int8"}, {"name": "half", "recipe": "bf16"}, "unquantized"]
    cells = {c.recipe: c for c in expand_cells(load_sweep(write_sweep(sweep_dir, recipes)))}
    assert cells["bf16"].dense is None and cells["bf16"].recipe_data is not None  # quantized, whatever its label
    assert cells["half"].dense == "bfloat16" and cells["half"].recipe_data is None
    assert cells["unquantized"].dense == "float32"


def test_sweep_stores_every_cell_and_a_restart_redoes_none(sweep_dir: Path) -> None:
    # (GGUF cells: the tiny model's character tokenizer is not one the GGUF writer writes)
    path = write_sweep(sweep_dir, ["unquantized", "int8", INT4, "bf16"])
    summary = run_sweep(path, sweep_dir / "results", jobs=2, progress=False)
    assert (summary.done, summary.failed) == (4, [])
    rows = {r["recipe"]: r for r in load_results(sweep_dir / "results")}
    assert set(rows) == {"unquantized", "int8", "int4-g32", "bf16"}
    text = str(sweep_dir / "text.txt")
    assert rows["unquantized"]["texts"][text]["kld"] < 1e-6  # the reference cache rounds log-probs to 16 bits
    assert 0 < rows["int8"]["texts"][text]["kld"] < rows["int4-g32"]["texts"][text]["kld"]
    assert rows["int4-g32"]["size"]["bits_per_weight"] == pytest.approx(4.5)
    assert rows["int8"]["size"]["disk_bytes"] > 0 and rows["bf16"]["size"]["bits_per_weight"] == 16
    assert rows["bf16"]["size"]["model_bytes"] * 2 == rows["unquantized"]["size"]["model_bytes"]  # half, once
    assert 0 < rows["bf16"]["texts"][text]["kld"] < rows["int8"]["texts"][text]["kld"]
    # per-linear error: int4 loses more than int8 on every linear
    assert all(rows["int4-g32"]["layers"][k] > rows["int8"]["layers"][k] > 0 for k in rows["int8"]["layers"])
    assert rows["unquantized"]["layers"] is None and rows["bf16"]["layers"] is None
    for r in rows.values():
        assert r["status"] == "done" and r["speed"]["decode_tokens_per_s"] > 0 and r["memory"]["peak_mb"] > 0
        assert r["model_fingerprint"] == rows["unquantized"]["model_fingerprint"]
    assert not any((sweep_dir / "results" / "work").iterdir())  # the cells' work folders are gone
    before = {p.name: p.read_text() for p in (sweep_dir / "results" / "cells").iterdir()}
    again = run_sweep(path, sweep_dir / "results", progress=False)
    assert (again.skipped, again.done) == (4, 0)
    assert before == {p.name: p.read_text() for p in (sweep_dir / "results" / "cells").iterdir()}


def test_a_failed_cell_is_recorded_and_the_sweep_goes_on(sweep_dir: Path) -> None:
    broken = {"name": "broken", "recipe": {"codec": {"name": "int", "bits": 4}, "algorithm": {"name": "gptq"},
                                           "calibration": {"source": str(sweep_dir / "missing.txt")}}}
    path = write_sweep(sweep_dir, [broken, "int8"], evaluations={
        "speed": None, "humaneval": {"limit": 2, "max_new_tokens": 4, "batch_size": 2}})
    summary = run_sweep(path, sweep_dir / "results", progress=False)
    rows = {r["recipe"]: r for r in load_results(sweep_dir / "results")}
    assert rows["int8"]["status"] == "done"
    h = rows["int8"]["humaneval"]  # a random model solves nothing, but its solution likelihood is measured
    assert h["problems"] == 2 and h["pass@1"] == 0.0 and h["loglik"] < 0 and h["kld"] > 0
    assert rows["broken"]["status"] == "failed" and "missing.txt" in rows["broken"]["error"]
    assert rows["broken"]["failed_stage"] == "quality" and len(summary.failed) == 1
    # kept on restart unless asked
    assert run_sweep(path, sweep_dir / "results", progress=False).skipped == 2


def test_a_cell_above_its_memory_is_killed_and_recorded(sweep_dir: Path) -> None:
    path = write_sweep(sweep_dir, ["int8"], evaluations={"speed": None}, resources={"memory_gb": 0.05})
    run_sweep(path, sweep_dir / "results", progress=False)
    (row,) = load_results(sweep_dir / "results")
    assert row["status"] == "failed" and row["error"].startswith("out of memory")


def test_a_sweep_killed_halfway_resumes_without_redoing_finished_cells(sweep_dir: Path) -> None:
    path = write_sweep(sweep_dir, ["int8", INT4, "w4a16-g64"], evaluations={"speed": None})
    results = sweep_dir / "results"
    cmd = [sys.executable, "-m", "lowbit", "sweep", str(path), "-o", str(results), "--no-progress"]
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(r["status"] == "done" for r in _rows(results)):
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    first = {r["cell"]: r for r in _rows(results) if r["status"] == "done"}
    assert 1 <= len(first) < 3
    summary = run_sweep(path, results, progress=False)
    assert summary.skipped == len(first) and summary.done == 3 - len(first)
    after = {r["cell"]: r for r in load_results(results)}
    assert all(after[c] == r for c, r in first.items())  # untouched
    assert all(r["status"] == "done" for r in after.values())


def test_a_cell_killed_between_its_stages_reruns_only_its_timing(sweep_dir: Path) -> None:
    path = write_sweep(sweep_dir, ["int8"])
    results = sweep_dir / "results"
    run_sweep(path, results, progress=False)
    store = ResultsStore(results)
    (row,) = store.results()
    (cell,) = expand_cells(load_sweep(path))
    assert not (results / "work" / cell.cell).exists()  # a finished cell's model is gone
    _, error = run_stage_process(cell, "quality", results / "work" / cell.cell, 1)  # its model back in work/
    assert error is None
    store.put({**row, "status": "partial", "speed": None, "memory": None})  # as the quality stage left it
    summary = run_sweep(path, results, progress=False)
    assert (summary.done, summary.resumed, summary.skipped) == (1, 1, 0)
    (after,) = load_results(results)
    assert after["status"] == "done" and after["speed"]["decode_tokens_per_s"] > 0
    kept = ("texts", "size", "layers", "started_at", "quant_seconds")  # quant_seconds: not quantized again
    assert {k: after[k] for k in kept} == {k: row[k] for k in kept}
    assert not (results / "work" / cell.cell).exists()


def _rows(results: Path) -> list[dict]:
    try:
        return load_results(results)
    except LowbitError:
        return []


def test_a_ray_address_that_does_not_answer_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the check: nothing listens there
    with pytest.raises(LowbitError, match=f"127.0.0.1:{port}: no Ray cluster answers there"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(LowbitError, match="expected HOST:PORT"):
        check_ray_address("nonsense")


def test_ray_on_a_local_cluster_gives_the_local_results(sweep_dir: Path) -> None:
    pytest.importorskip("ray")
    path = write_sweep(sweep_dir, ["unquantized", "int8", INT4], evaluations={"speed": None})
    run_sweep(path, sweep_dir / "local", progress=False)
    summary = run_sweep(path, sweep_dir / "ray", ray_address="", progress=False)
    assert summary.done == 3 and not summary.failed
    local = {r["cell"]: r for r in load_results(sweep_dir / "local")}
    ray = {r["cell"]: r for r in load_results(sweep_dir / "ray")}
    assert local.keys() == ray.keys()
    for cell, r in local.items():
        assert ray[cell]["texts"] == r["texts"] and ray[cell]["size"] == r["size"] and ray[cell]["layers"] == r["layers"]
