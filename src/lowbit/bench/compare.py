"""Quantize one model with several recipes and evaluate each on the same yardstick.

Every recipe starts from a fresh copy of the unquantized model; the reference log-probs are
computed once per text (and cached on disk), so each row costs one quantization and one
evaluation pass per text.
"""

from __future__ import annotations

import copy
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import lowbit
from lowbit.calibration import Text
from lowbit.evaluation import evaluate, model_size
from lowbit.models.fingerprint import model_fingerprint
from lowbit.models import LoadedModel, architecture_of, cache_dir
from lowbit.pipeline import quantize_model
from lowbit.recipes import Recipe


@dataclass
class Row:
    """One results row: a model x recipe x text."""

    model: str
    recipe: str
    recipe_digest: str | None
    text: str
    ppl: float
    delta_ppl: float
    kld: float
    kld_p99: float
    top1: float
    tokens: int
    bits_per_weight: float
    model_bytes: int
    disk_bytes: int | None
    quant_seconds: float | None
    eval_seconds: float
    dtype: str
    lowbit_version: str = lowbit.__version__
    torch_version: str = torch.__version__
    machine: str = platform.machine()

    def to_dict(self) -> dict:
        return asdict(self)


def block_linear_names(model: torch.nn.Module) -> list[str]:
    arch = architecture_of(model)
    return [f"{arch.blocks}.{i}.{name}" for i, block in enumerate(arch.block_list(model))
            for step in arch.block_steps(block) for name in step]


def folder_bytes(path: Path) -> int:
    """Bytes of a saved model's weights: a GGUF file whole, a folder's ``*.safetensors`` files
    (its config and tokenizer files are left out: they are the same for every recipe)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def compare_recipes(
    base: LoadedModel,
    recipes: list[Recipe],
    texts: list[Text],
    seq_len: int = 512,
    max_windows: int | None = None,
    dtype: torch.dtype = torch.float32,
    save_dir: Path | None = None,
    include_reference: bool = True,
    progress: bool = True,
    on_row=None,  # type: ignore[no-untyped-def]
    compute_dtype: torch.dtype = torch.float32,
) -> list[Row]:
    """Rows for the unquantized model (when ``include_reference``) and each recipe, per text.

    With ``save_dir``, each quantized model is also written there and its size on disk measured.
    Recipes whose algorithm needs calibration draw their samples from the recipe's calibration
    source (drawn once per distinct calibration config); their calibration forward passes run in
    ``compute_dtype``.
    """
    from lowbit.calibration import CalibrationSet, calibration_set

    from lowbit.io import save_quantized

    cdir = cache_dir()
    names = block_linear_names(base.model)
    rows: list[Row] = []
    # The reference (base, in float32) never changes: hash its weights once, not once per row.
    ref_fingerprint = model_fingerprint(base.model.to(torch.float32))

    def run_eval(model: torch.nn.Module, text: Text):  # type: ignore[no-untyped-def]
        return evaluate(model, base.tokenizer, text, ref=base.model, seq_len=seq_len, max_windows=max_windows,
                        dtype=dtype, cache_dir=cdir, progress=progress, ref_fingerprint=ref_fingerprint)

    def emit(row: Row) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if include_reference:
        size = model_size(base.model, names)
        disk = folder_bytes(base.path) if base.path is not None and base.path.is_dir() else None
        # Evaluating in another dtype casts the model in place: never do that to the reference.
        evaluated = base.model if dtype == torch.float32 else copy.deepcopy(base.model)
        for text in texts:
            r = run_eval(evaluated, text)
            emit(_row(base.source, "unquantized", None, r, size.bits_per_weight, size.model_bytes, disk, None))
    calibrations: dict[str, CalibrationSet] = {}
    for recipe in recipes:
        calib = None
        if recipe.needs_calibration:
            config = recipe.calibration_config()
            key = config.model_dump_json()
            if key not in calibrations:
                calibrations[key] = calibration_set(base.tokenizer, config)
            calib = calibrations[key]
        model = copy.deepcopy(base.model)
        report = quantize_model(model, recipe, progress=progress, calibration=calib, compute_dtype=compute_dtype)
        size = model_size(model, names)
        disk = None
        if save_dir is not None:
            out = save_quantized(LoadedModel(model, base.tokenizer, base.source, None), save_dir / recipe.digest(),
                                 overwrite=True)
            disk = folder_bytes(out)
        for text in texts:
            r = run_eval(model, text)
            emit(_row(base.source, recipe.label(), recipe.digest(), r, size.bits_per_weight, size.model_bytes, disk,
                      report.seconds))
        del model
    return rows


def _row(model: str, recipe: str, digest: str | None, r, bpw: float, nbytes: int, disk: int | None,
         qsec: float | None) -> Row:  # type: ignore[no-untyped-def]
    return Row(model=model, recipe=recipe, recipe_digest=digest, text=r.text, ppl=r.ppl, delta_ppl=r.delta_ppl,
               kld=r.kld, kld_p99=r.kld_p99, top1=r.top1, tokens=r.tokens, bits_per_weight=bpw, model_bytes=nbytes,
               disk_bytes=disk, quant_seconds=qsec, eval_seconds=r.seconds, dtype=r.dtype)


def format_table(rows: list[Row]) -> str:
    """A Markdown table of rows."""
    head = "| text | recipe | PPL | ΔPPL | mean KLD | KLD p99 | top-1 | bpw | model MB | disk MB | quant s |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        disk = f"{r.disk_bytes / 1e6:.1f}" if r.disk_bytes is not None else "-"
        qs = f"{r.quant_seconds:.1f}" if r.quant_seconds is not None else "-"
        lines.append(
            f"| {r.text} | {r.recipe} | {r.ppl:.3f} | {r.delta_ppl:+.3f} | {r.kld:.5f} | {r.kld_p99:.4f} | "
            f"{100 * r.top1:.2f}% | {r.bits_per_weight:.3f} | {r.model_bytes / 1e6:.1f} | {disk} | {qs} |"
        )
    return "\n".join(lines)


def temporary_save_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="lowbit-bench-"))


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
