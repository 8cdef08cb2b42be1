"""lm-evaluation-harness backend: ``--model lowbit`` runs any model lowbit loads (built-in names,
HF folders, lowbit folders with their packed kernels, ``.gguf`` files, GPTQ / AWQ /
compressed-tensors checkpoints) on lm-eval's tasks.

The model class is lm-eval's own ``HFLM`` given the model lowbit loaded (a transformers model
whose linears are lowbit modules), so request handling, batching and generation are lm-eval's.
lm-eval is imported only when used: lowbit works without it.

lm-eval 0.4.13 discovers no external models, so its own ``lm_eval`` command does not know
``lowbit``; ``python -m lowbit.evaluation.lm_eval_backend ARGS`` is that command with ``lowbit``
registered first. Later lm-eval releases read the ``lm_eval.models`` entry point group (which
names ``LowbitLM`` here) and import ``--plugins`` modules: imported after lm-eval, this module
registers itself.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lowbit.errors import LowbitError

MODEL_NAME = "lowbit"
ENTRY_POINT_GROUP = "lm_eval.models"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_INSTALL = "lm-evaluation-harness is not installed: pip install 'lowbit[lab]'"

_model_class: type | None = None


def _require_lm_eval():  # type: ignore[no-untyped-def]
    try:
        import lm_eval
    except ImportError as e:
        raise LowbitError(_INSTALL) from e
    return lm_eval


def register() -> type:
    """Define the lowbit lm-eval model class and register it as ``lowbit`` (once); returns it."""
    global _model_class
    if _model_class is None:
        _require_lm_eval()
        from lm_eval.api.registry import register_model

        _model_class = register_model(MODEL_NAME)(_define_model_class())
    return _model_class


def __getattr__(name: str) -> Any:
    # ``LowbitLM`` subclasses lm-eval's HFLM, so it exists only once lm-eval is imported; the
    # entry point names it, and loading an entry point is a getattr on this module
    if name == "LowbitLM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flag(value: object, name: str) -> bool:
    """A model_args boolean: lm-eval passes True/False, 1/0 or the strings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise LowbitError(f"model_args {name}={value!r}: expected True or False")


def _device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise LowbitError(f"device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        # lm-eval's command line asks for cuda:0 unless told otherwise; its hf model falls back too
        warnings.warn(f"device {device!r}: CUDA is not available here, running on the CPU", stacklevel=2)
        return torch.device("cpu")
    return dev


def load_for_lm_eval(spec: str, dtype: str = "auto", kernels: bool = True,  # type: ignore[no-untyped-def]
                     device: str | None = None):
    """Load ``spec`` as :func:`lowbit.evaluation.speed.load_for_running` does, on ``device``
    (default: cuda if there is one). The fast kernels are CPU operators: elsewhere every
    quantized linear runs dequantized. Returns ``(LoadedModel, info dict)``."""
    from lowbit.evaluation.speed import load_for_running
    from lowbit.modules import keep_dequantized_weights
    from lowbit.modules.quant_linear import release_dequantized_weights

    if dtype not in DTYPES:
        raise LowbitError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    dev = _device(device)
    on_cpu = dev.type == "cpu"
    loaded, dtype_name, counts, memory = load_for_running(spec, dtype, kernels=kernels and on_cpu)
    if not on_cpu:
        release_dequantized_weights(loaded.model)  # made on the CPU; remade on the device below
        loaded.model.to(dev)
        keep_dequantized_weights(loaded.model, getattr(torch, dtype_name))
    info = {"lowbit_spec": spec, "lowbit_dtype": dtype_name, "lowbit_device": str(dev),
            "lowbit_linears": counts, **{f"lowbit_{k}": v for k, v in memory.items()}}
    return loaded, info


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _define_model_class() -> type:
    from lm_eval.models.huggingface import HFLM

    hflm_args = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs", "pretrained"}

    class LowbitLM(HFLM):
        """lm-eval's HF model over a model lowbit loaded: ``pretrained=SPEC`` (any layout lowbit
        reads), ``dtype=auto|float32|bfloat16|float16``, ``kernels=True|False`` (lowbit's fast
        CPU kernels), ``device``, ``tokenizer`` (default: the model's own), and HFLM's
        arguments (``batch_size``, ``max_length``, ``add_bos_token``, ...)."""

        def __init__(self, pretrained: str, dtype: str = "auto", kernels: object = True,
                     device: str | None = None, tokenizer: object = None, **kwargs: Any) -> None:
            if not isinstance(pretrained, str):
                raise LowbitError("the lowbit lm-eval model takes pretrained=SPEC (a path or name), not a model")
            unknown = sorted(set(kwargs) - hflm_args)
            if unknown:  # HFLM would silently drop them for an already-loaded model
                raise LowbitError(f"model_args {', '.join(unknown)}: not an argument of the lowbit model")
            loaded, self.lowbit_info = load_for_lm_eval(pretrained, dtype, _flag(kernels, "kernels"), device)
            with _quiet(HFLM.__module__):  # its warnings about being given a model object are for users of HFLM
                super().__init__(pretrained=loaded.model,
                                 tokenizer=loaded.tokenizer if tokenizer is None else tokenizer, **kwargs)
            self.pretrained = pretrained  # HFLM keeps the model object here

        def get_model_info(self) -> dict:
            # HFLM's asks the hub for a commit of `pretrained`: not a hub id here
            return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                    "model_dtype": str(self.model.dtype), **self.lowbit_info}

    LowbitLM.__module__, LowbitLM.__qualname__ = __name__, "LowbitLM"  # where the entry point finds it
    return LowbitLM


def run_lm_eval(spec: str, tasks: list[str], *, include_path: Path | None = None, limit: int | None = None,
                batch_size: int = 8, dtype: str = "auto", kernels: bool = True,
                num_fewshot: int | None = None, device: str | None = None) -> dict:
    """Evaluate ``spec`` on lm-eval ``tasks`` (built-in, or defined under ``include_path``) on
    ``device`` (default: cuda if there is one); returns lm-eval's results dict (``results``,
    ``configs``, ``samples`` and, in ``config``, what lowbit loaded: ``lowbit_dtype``,
    ``lowbit_linears``, ...)."""
    lm_eval = _require_lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise LowbitError("no lm-eval tasks given")
    if include_path is not None and not Path(include_path).is_dir():
        raise LowbitError(f"{include_path}: not a folder of lm-eval task files")
    manager = _task_manager(TaskManager, tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LowbitError(f"unknown lm-eval task(s): {', '.join(unknown)} (`lm-eval ls tasks` lists them)")
    lm = register()(pretrained=spec, dtype=dtype, kernels=kernels, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager)
    if results is None:  # only on ranks other than 0 of a distributed run, which this is not
        raise LowbitError("lm-eval returned no results")
    return results


def _task_manager(TaskManager: type, tasks: list[str], include_path: Path | None):  # type: ignore[no-untyped-def]
    """lm-eval's task index; without its built-in tasks when ``include_path`` holds every task
    asked for as a plain task (indexing lm-eval's ~14k built-in files takes ~10 s; a group or
    tag may name built-in tasks, so those get the whole index)."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_subtasks for t in tasks):
            return local
    return TaskManager(include_path=None if include_path is None else str(include_path))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_lm_eval_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--lm-eval-tasks``, ``--lm-eval-include``, ``--limit``, ``--lm-eval-batch-size`` and
    ``--num-fewshot`` to ``parser`` (the ``lowbit eval`` command)."""
    g = parser.add_argument_group("lm-evaluation-harness (needs pip install 'lowbit[lab]')")
    g.add_argument("--lm-eval-tasks", metavar="A,B", help="run these lm-eval tasks (or groups) on the model "
                   "instead of perplexity, e.g. hellaswag,arc_easy")
    g.add_argument("--lm-eval-include", type=Path, metavar="DIR", help="folder of extra lm-eval task YAML files")
    g.add_argument("--limit", type=_positive, metavar="N", help="at most N examples per lm-eval task, or the first N HumanEval problems")
    g.add_argument("--lm-eval-batch-size", type=_positive, default=8, metavar="N",
                   help="requests per forward pass (default 8)")
    g.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples per prompt (default: the task's)")


def parse_tasks(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise LowbitError("--lm-eval-tasks: no task names given")
    return tasks


def request_loglikelihoods(results: dict, tasks: list[str]) -> list[float]:
    """Every loglikelihood request's value in lm-eval's results (``simple_evaluate`` with
    ``log_samples``), task by task in ``tasks``' order, each task's documents in order."""
    out = []
    for task in tasks:
        for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
            for resp in sample["resps"]:
                value = resp[0]  # (loglikelihood, is_greedy) for loglikelihood requests, a float for rolling ones
                out.append(float(value[0] if isinstance(value, (tuple, list)) else value))
    return out


def format_lm_eval(results: dict) -> str:
    """A table of task, metric, value and standard error, one row per metric."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # lm-eval's keys: "metric,filter"
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            rows.append((task, name, value, stderr))
    if not rows:
        return "no lm-eval results"
    tw = max(4, *(len(r[0]) for r in rows))
    mw = max(6, *(len(r[1]) for r in rows))
    lines = [f"{'task':{tw}s}  {'metric':{mw}s}  {'value':>11s}  {'stderr':>8s}"]
    for task, name, value, stderr in rows:
        err = f"{stderr:8.4f}" if isinstance(stderr, (int, float)) and math.isfinite(stderr) else f"{'-':>8s}"
        lines.append(f"{task:{tw}s}  {name:{mw}s}  {value:11.6g}  {err}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with the ``lowbit`` model registered:
    ``python -m lowbit.evaluation.lm_eval_backend --model lowbit --model_args pretrained=DIR ...``."""
    # the importable module's register, not a second class defined in __main__
    from lowbit.evaluation.lm_eval_backend import register as register_importable

    try:
        register_importable()
    except LowbitError as e:
        raise SystemExit(f"lowbit: error: {e}") from None
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:  # lm-eval's parser reads sys.argv itself
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
elif "lm_eval" in sys.modules:  # imported by lm-eval itself (a plugin module it was told to import)
    register()
