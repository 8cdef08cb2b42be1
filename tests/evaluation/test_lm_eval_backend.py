"""lowbit models through lm-evaluation-harness: the ``lowbit`` backend gives the same answers as
lm-eval's own ``hf`` backend on an HF folder (loglikelihood, rolling loglikelihood and greedy
generation, on local JSONL tasks), runs a quantized folder, and is reachable from lm-eval's
command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lowbit.errors import LowbitError
from lowbit.evaluation.lm_eval_backend import (
    ENTRY_POINT_GROUP,
    MODEL_NAME,
    format_lm_eval,
    main,
    register,
    request_loglikelihoods,
    run_lm_eval,
)

pytestmark = pytest.mark.usefixtures("lowbit_cache")

MC, GEN, PPL = "lowbit_tiny_mc", "lowbit_tiny_gen", "lowbit_tiny_ppl"
TASKS = [MC, GEN, PPL]
REPO = Path(__file__).resolve().parents[2]


def _task_yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
            f"test_split: test\n{body}")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tasks(root: Path, text_factory) -> Path:  # type: ignore[no-untyped-def]
    """A multiple-choice, a generation and a perplexity task over JSONL files in ``root``."""
    root.mkdir()
    cache = root / "hf-datasets"
    mc = _write_jsonl(root / "mc.jsonl", [
        {"question": f"Q: {text_factory(40, seed=i)}\nA:", "choices": [" yes", " no", " the value"], "answer": i % 3}
        for i in range(6)])
    gen = _write_jsonl(root / "gen.jsonl", [
        {"prompt": text_factory(30, seed=10 + i), "target": " the"} for i in range(4)])
    ppl = _write_jsonl(root / "ppl.jsonl", [{"text": text_factory(300, seed=20 + i)} for i in range(3)])
    (root / "mc.yaml").write_text(_task_yaml(MC, mc, cache, (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")))
    (root / "gen.yaml").write_text(_task_yaml(GEN, gen, cache, (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")))
    (root / "ppl.yaml").write_text(_task_yaml(PPL, ppl, cache, (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}\n"
        "  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}\n")))
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def task_dir(tmp_path: Path, text_factory) -> Path:  # type: ignore[no-untyped-def]
    return write_tasks(tmp_path / "tasks", text_factory)


def loglikelihoods(results: dict, task: str) -> list[float]:
    return request_loglikelihoods(results, [task])


def generations(results: dict) -> list[str]:
    return [s["filtered_resps"][0] for s in sorted(results["samples"][GEN], key=lambda s: s["doc_id"])]


def metrics(results: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in results["results"][task].items() if isinstance(v, float) and "stderr" not in k}


def hf_backend(folder: Path, task_dir: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(folder), "device": "cpu", "dtype": "float32"},
        tasks=TASKS, batch_size=8, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))


def test_matches_hf_backend_then_quantized_differs(hf_folder, task_dir, tmp_path, offline) -> None:  # type: ignore[no-untyped-def]
    from lowbit.cli import main as lowbit_main

    folder = hf_folder("llama")
    ours = run_lm_eval(str(folder), TASKS, include_path=task_dir, batch_size=8, device="cpu")
    theirs = hf_backend(folder, task_dir)
    assert ours["config"]["lowbit_dtype"] == "float32"  # an HF folder: no kernels, float32
    for task in (MC, PPL):
        assert loglikelihoods(ours, task) == pytest.approx(loglikelihoods(theirs, task), rel=1e-6, abs=1e-5)
        assert metrics(ours, task) == pytest.approx(metrics(theirs, task), rel=1e-6)
    assert len(loglikelihoods(ours, MC)) == 6 * 3
    assert generations(ours) == generations(theirs)
    assert any(generations(ours)), "greedy generation produced only empty strings"
    table = format_lm_eval(ours).splitlines()
    acc = [line.split() for line in table if line.split()[:2] == [MC, "acc"]]
    assert acc and float(acc[0][2]) == pytest.approx(ours["results"][MC]["acc,none"], rel=1e-5)
    assert len(table) == 1 + 2 + 1 + 3  # header, then one row per metric: no sample counts, no aliases

    out = tmp_path / "w4"
    assert lowbit_main(["quantize", str(folder), "--recipe", "w4a16", "--group-size", "32", "--out", str(out),
                        "--no-progress"]) == 0
    quant = run_lm_eval(str(out), [MC, PPL], include_path=task_dir, batch_size=8, device="cpu")
    assert quant["config"]["lowbit_linears"], "the quantized folder loaded without lowbit linears"
    for task in (MC, PPL):
        q, base = loglikelihoods(quant, task), loglikelihoods(ours, task)
        assert len(q) == len(base) and all(math.isfinite(v) for v in q)
        assert q != pytest.approx(base, rel=1e-4, abs=1e-4)


def test_lm_eval_command_line(hf_folder, task_dir, tmp_path, offline, capsys) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder("llama")
    out = tmp_path / "lm-eval-out"
    main(["--model", MODEL_NAME, "--model_args", f"pretrained={folder},dtype=float32,kernels=False",
          "--tasks", MC, "--include_path", str(task_dir), "--batch_size", "4", "--device", "cpu",
          "--output_path", str(out)])
    (path,) = out.rglob("results_*.json")
    saved = json.loads(path.read_text())
    direct = run_lm_eval(str(folder), [MC], include_path=task_dir, batch_size=4, dtype="float32", kernels=False,
                         device="cpu")
    assert saved["results"][MC]["acc,none"] == direct["results"][MC]["acc,none"]
    assert saved["config"]["model"] == MODEL_NAME
    assert MC in capsys.readouterr().out  # lm-eval's own table


def test_bad_model_args_and_tasks_are_lowbit_errors(hf_folder, task_dir, offline) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder("llama")
    cls = register()
    with pytest.raises(LowbitError, match="batchsize"):
        cls(pretrained=str(folder), batchsize=2)
    with pytest.raises(LowbitError, match="dtype 'int8'"):
        cls(pretrained=str(folder), dtype="int8")
    with pytest.raises(LowbitError, match="kernels"):
        cls(pretrained=str(folder), kernels="maybe")
    with pytest.raises(LowbitError, match="no_such_task"):
        run_lm_eval(str(folder), [MC, "no_such_task"], include_path=task_dir)


def test_registered_under_lowbit() -> None:
    from lm_eval.api.registry import get_model

    cls = register()
    assert get_model(MODEL_NAME) is cls is register()  # registered once, found by name
    import lowbit.evaluation.lm_eval_backend as backend

    assert backend.LowbitLM is cls  # the name the entry point points at


def test_importing_after_lm_eval_registers() -> None:
    """What lm-eval's plugin import (``--plugins MODULE`` in later releases) relies on."""
    code = ("import lm_eval, lowbit.evaluation.lm_eval_backend as b\n"
            "from lm_eval.api.registry import model_registry\n"
            "assert model_registry.get('lowbit') is b.register(), 'not registered on import'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_entry_point_once_declared() -> None:
    """Runs once pyproject.toml declares the entry point (and the package is reinstalled)."""
    import importlib.metadata as md

    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("entry-points", {})
    if MODEL_NAME not in declared.get(ENTRY_POINT_GROUP, {}):
        pytest.skip(f"pyproject.toml declares no {ENTRY_POINT_GROUP} entry point {MODEL_NAME!r} yet")
    found = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.name == MODEL_NAME]
    assert found, "declared but not installed: run `pip install -e .` again"
    assert found[0].load() is register()


def test_without_lm_eval_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(LowbitError, match=r"pip install 'lowbit\[lab\]'"):
        run_lm_eval("any", [MC])
