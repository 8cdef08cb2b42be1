"""Resume state of an interrupted sequential run.

After each finished block the runner writes, into a work folder beside the output:
``block_NNNN.safetensors`` (the block's quantized and dense tensors), ``inputs.pt`` (the next
block's inputs) and, last, ``state.json`` (the run's fingerprint and the number of finished
blocks). Each file is written to a temporary name and renamed, so a kill at any point leaves a
consistent state. A restart with the same fingerprint (model, recipe, calibration tokens,
compute dtype) continues after the last finished block; a different fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.codecs import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.modules import QuantLinear

if TYPE_CHECKING:
    from lowbit.calibration.samples import CalibrationSet
    from lowbit.io.imatrix import ImportanceMatrix
    from lowbit.recipes import Recipe

STATE = "state.json"
INPUTS = "inputs.pt"
QUANT_KEY = "lowbit.quantized"

BlockInputs = list[tuple[torch.Tensor, dict]]


def run_fingerprint(
    model: nn.Module, model_id: str | None, recipe: "Recipe", calibration: "CalibrationSet", compute_dtype: str,
    importance: "ImportanceMatrix | None" = None,
) -> str:
    """SHA-256 of everything that determines a run's result: the model (``model_id`` when the
    caller knows its identity, else a hash of its weights), the recipe, the calibration tokens,
    the compute dtype and a supplied importance matrix."""
    if model_id is None:
        from lowbit.models.fingerprint import model_fingerprint

        model_id = model_fingerprint(model)
    spec = {"model": model_id, "recipe": recipe.digest(), "calibration": calibration.digest, "dtype": compute_dtype}
    if importance is not None:  # only then: earlier fingerprints stay valid
        spec["importance"] = importance.digest()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


class ResumeState:
    def __init__(self, folder: Path, fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def finished_blocks(self) -> int:
        """Blocks already finished by an earlier run (0 when starting afresh); LowbitError when
        the folder belongs to a different run."""
        state_file = self.folder / STATE
        if not state_file.is_file():
            return 0
        try:
            state = json.loads(state_file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise LowbitError(f"{state_file}: unreadable resume state ({e}); delete {self.folder}") from None
        if state.get("fingerprint") != self.fingerprint:
            raise LowbitError(
                f"{self.folder} holds an interrupted run of a different model, recipe or calibration; "
                "delete it (or pass --restart) to start over"
            )
        return int(state["finished"])

    def restore_block(self, block: nn.Module, index: int, recipe: "Recipe", prefix: str) -> None:
        """Install the saved quantized block ``index`` (``prefix``: its full name) into ``block``
        (which may be on meta), with the input quantization ``recipe`` gives its linears (static
        scales and fixed 16-bit channels as saved)."""
        from lowbit.io.lowbit_format import input_quantization, input_tensor_names

        path = self.folder / f"block_{index:04d}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            headers = json.loads((f.metadata() or {}).get(QUANT_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        consumed: set[str] = set()
        quantized: dict[str, QuantizedTensor] = {}
        for name, header in headers.items():
            quantized[name] = qt = QuantizedTensor.from_state_dict(header, tensors, f"{name}.weight")
            bias = tensors.get(f"{name}.bias")
            block.set_submodule(name, QuantLinear(qt, bias))
            consumed.update(qt.state_dict(f"{name}.weight"))
            consumed.add(f"{name}.bias")
        full = {f"{prefix}.{n}": qt for n, qt in quantized.items()}
        inputs = input_quantization(recipe, full, {f"{prefix}.{k}": v for k, v in tensors.items()}, path)
        for name, (quantizer, scale, channels) in inputs.items():
            short = name[len(prefix) + 1:]
            block.get_submodule(short).set_input_quant(quantizer, scale, channels)
            consumed.update(input_tensor_names(short, scale, channels))
        rest = {k: v for k, v in tensors.items() if k not in consumed}
        result = block.load_state_dict(rest, strict=False, assign=True)
        if result.unexpected_keys:
            raise LowbitError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")

    def load_inputs(self) -> BlockInputs:
        data = torch.load(self.folder / INPUTS, weights_only=True, map_location="cpu")
        return list(zip(data["hidden"], data["kwargs"]))

    def save(self, block: nn.Module, index: int, next_inputs: BlockInputs) -> None:
        from lowbit.io.lowbit_format import quantized_state

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors, headers = quantized_state(block, torch.float32)
        path = self.folder / f"block_{index:04d}.safetensors"
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"format": "pt", QUANT_KEY: json.dumps(headers)})
        os.replace(path.with_suffix(".tmp"), path)
        tmp = self.folder / (INPUTS + ".tmp")
        torch.save({"hidden": [h for h, _ in next_inputs], "kwargs": [k for _, k in next_inputs]}, tmp)
        os.replace(tmp, self.folder / INPUTS)
        state_tmp = self.folder / (STATE + ".tmp")
        state_tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "finished": index + 1}))
        os.replace(state_tmp, self.folder / STATE)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
