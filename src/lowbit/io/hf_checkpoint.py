"""What every reader and writer of a Hugging Face model folder shares (lowbit's own folder,
:mod:`lowbit.io.compressed_tensors`, and the GPTQ / AWQ layouts of :mod:`lowbit.io.int_checkpoint`).

Reading: the safetensors weights (``model.safetensors``, a sharded index, or a single
``*.safetensors`` of another name as AutoGPTQ writes), the model rebuilt from ``config.json``
with its parameters on ``meta`` (:func:`empty_model`), then :func:`assemble`: the quantized
linears set in as :class:`~lowbit.modules.QuantLinear` and every other tensor assigned, so that
no float copy of a quantized weight is ever made.

Writing (GPTQ, AWQ, compressed-tensors): one folder, atomically: ``model.safetensors`` (the
format's tensors and the dense state), ``config.json`` with its ``quantization_config``,
optional extra JSON files, the tokenizer and lowbit's ``recipe.json``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.codecs import QuantizedTensor
from lowbit.errors import LowbitError
from lowbit.io.folder import atomic_folder
from lowbit.modules import QuantLinear, dense_tensors, linear_weight

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
RECIPE = "recipe.json"


# -- JSON ----------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, None if absent; LowbitError if unreadable."""
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LowbitError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LowbitError(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x})") from None
    except json.JSONDecodeError as e:
        raise LowbitError(f"{path}: not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise LowbitError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{path}: not a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any], sort_keys: bool = False) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def hf_quantization_config(path: Path) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` (None without one)."""
    config = read_json(path / CONFIG)
    if config is None:
        raise LowbitError(f"{path}: no {CONFIG}, not a Hugging Face model folder")
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def holds_checkpoint(path: Path, config_of: Callable[[Path], dict[str, Any] | None]) -> bool:
    """Whether ``path`` is a folder in which ``config_of`` finds a layout's quantization config
    (an unreadable config: no)."""
    try:
        return Path(path).is_dir() and config_of(Path(path)) is not None
    except LowbitError:
        return False


# -- reading -------------------------------------------------------------------------------------
def read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of one safetensors file and its metadata; LowbitError if it is corrupt
    (:func:`lowbit.io.safetensors_layout.check_safetensors` names the damaged tensor)."""
    from lowbit.io.safetensors_layout import check_safetensors

    check_safetensors(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the header walk found nothing wrong: what the library refuses is said as it says it
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise LowbitError(f"{file}: corrupt safetensors file ({first})") from None
    return tensors, metadata


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors weights: the files of its shard index, else
    ``model.safetensors``, else its one ``*.safetensors`` file of another name."""
    index_file = path / WEIGHTS_INDEX
    index = read_json(index_file)
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise LowbitError(f"{index_file}: corrupt safetensors index (no weight_map of file names)")
        files = sorted({path / f for f in weight_map.values()})
    elif (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    else:
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise LowbitError(f"{path}: missing {WEIGHTS}" + (" (and several other .safetensors files)" if files else ""))
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise LowbitError(f"{path}: missing {file.name} (named in {WEIGHTS_INDEX})")
        tensors.update(read_safetensors(file)[0])
    return tensors


def meta_model(config: Any, dtype: torch.dtype | None = None, buffers: bool = True) -> nn.Module:
    """The transformers model of ``config`` with its parameters on ``meta`` (no memory, no
    initialization) and its buffers (rotary tables) real, unless ``buffers`` is False; in
    ``dtype``, else the config's."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kwargs = {} if dtype is None else {"dtype": dtype}  # dtype=None would set config.dtype to None
    with no_init_weights(), init_empty_weights(include_buffers=not buffers):
        return AutoModelForCausalLM.from_config(config, **kwargs)


def empty_model(path: Path, dtype: torch.dtype, tensors: dict[str, torch.Tensor],
                keep_quantization_config: bool = False) -> tuple[nn.Module, object]:
    """The folder's model (:func:`meta_model`) and its tokenizer. The config's
    ``quantization_config`` (the stored layout's: GPTQ, AWQ, compressed-tensors) is dropped,
    as the model in memory is lowbit's, unless ``keep_quantization_config``.

    The config is checked against the folder's ``tensors`` before anything is allocated (a
    damaged ``num_hidden_layers`` or ``hidden_size`` would otherwise build a model of that
    size): its block count against the blocks the tensors name, then every tensor's shape
    against a model built wholly on ``meta``."""
    from transformers import AutoConfig, AutoTokenizer

    from lowbit.models.loaded import first_line, quiet_transformers

    quiet_transformers()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if not keep_quantization_config and hasattr(config, "quantization_config"):
            del config.quantization_config
    except Exception as e:  # transformers raises many types for corrupt or partial folders
        raise LowbitError(f"cannot rebuild the model of {path}: {config_problem(path) or first_line(e)}") from None
    _check_block_count(path, config, tensors)
    try:
        probe = meta_model(config, dtype, buffers=False)
    except Exception as e:
        raise LowbitError(f"cannot rebuild the model of {path}: {config_problem(path) or first_line(e)}") from None
    for k, t in probe.state_dict(keep_vars=True).items():
        if k in tensors and tuple(tensors[k].shape) != tuple(t.shape):
            raise LowbitError(f"{path}: tensor {k} has shape {list(tensors[k].shape)}, the model that {CONFIG} describes "
                              f"has {list(t.shape)}")
    del probe
    try:
        model = meta_model(config, dtype)
    except Exception as e:
        raise LowbitError(f"cannot rebuild the model of {path}: {first_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise LowbitError(f"cannot load the tokenizer of {path}: {first_line(e)}") from None
    return model, tokenizer


MAX_BLOCKS = 10_000
_BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _check_block_count(path: Path, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        return
    blocks = {int(m.group(1)) for k in tensors if (m := _BLOCK_INDEX.search(k))}
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LowbitError(f"{path / CONFIG}: num_hidden_layers is {str(n)[:40]!r}, not a positive integer")
    if blocks and n != max(blocks) + 1:
        raise LowbitError(f"{path / CONFIG}: num_hidden_layers is {n}, but the weights hold blocks 0..{max(blocks)}")


def config_problem(path: Path) -> str | None:
    """Which field of the folder's ``config.json`` transformers refuses, for a config it cannot
    build a model of: the first top-level field without which it can (None when there is no
    such single field, or no readable config). Its errors name Python internals ("'float'
    object has no attribute 'to_dict'"), not the field."""
    from transformers import AutoConfig

    try:
        data = read_json(path / CONFIG)
    except LowbitError as e:
        return str(e)
    if data is None:
        return f"no {CONFIG}"
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        return f"{path / CONFIG}: model_type is {str(model_type)[:40]!r}, not the name of a transformers model type"

    qc = data.get("quantization_config")
    if qc is not None and not (isinstance(qc, dict) and isinstance(qc.get("quant_method"), str)):
        return f"{path / CONFIG}: quantization_config is {json.dumps(qc)[:60]}, not a mapping with a quant_method"
    layers = data.get("num_hidden_layers", data.get("n_layer"))
    if isinstance(layers, int) and layers > MAX_BLOCKS:  # each try would build them all
        return f"{path / CONFIG}: {layers} layers: more than any model has ({MAX_BLOCKS})"

    def builds(d: dict[str, Any]) -> bool:
        try:
            meta_model(AutoConfig.for_model(**d), buffers=False)  # nothing allocated, whatever the sizes say
            return True
        except Exception:
            return False

    if builds(data):
        return None
    for key in data:
        if key != "model_type" and builds({k: v for k, v in data.items() if k != key}):
            return f"{path / CONFIG}: field {key!r} = {json.dumps(data[key])[:60]} is not what transformers accepts"
    return None


def assemble(
    model: nn.Module, path: Path, quantized: dict[str, QuantizedTensor], tensors: dict[str, torch.Tensor],
    consumed: set[str], dtype: torch.dtype,
) -> Any:
    """Set each of ``quantized`` in as a QuantLinear (with its ``NAME.bias``), assign every other
    tensor not in ``consumed`` (floats cast to ``dtype``), tie weights; LowbitError for a tensor
    the model lacks or a tensor of the model missing from the folder. Returns what
    ``load_state_dict`` returned (its ``missing_keys``, for a stricter check)."""
    for name, qt in quantized.items():
        try:
            old = model.get_submodule(name)
            weight, _ = linear_weight(old)
        except (AttributeError, LowbitError):
            raise LowbitError(f"{path}: quantized tensors for {name}, which is not a linear of the model") from None
        if tuple(weight.shape) != qt.shape:
            raise LowbitError(f"{path}: {name} is stored as a {qt.shape[0]}x{qt.shape[1]} weight, the model's linear "
                              f"is {weight.shape[0]}x{weight.shape[1]}")
        bias = tensors.get(f"{name}.bias")
        if getattr(old, "bias", None) is not None and bias is None:
            raise LowbitError(f"{path}: missing {name}.bias")
        consumed.add(f"{name}.bias")
        model.set_submodule(name, QuantLinear(qt, None if bias is None else bias.to(dtype)))
    rest = {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in tensors.items() if k not in consumed}
    result = model.load_state_dict(rest, strict=False, assign=True)
    # rotary inv_freq: a buffer older checkpoints stored and transformers now derives from the config
    unexpected = sorted(k for k in result.unexpected_keys if not k.endswith(".inv_freq"))
    if unexpected:
        raise LowbitError(f"{path}: unexpected tensors {unexpected[:5]}")
    if not isinstance(model.get_input_embeddings(), QuantLinear):  # a quantized table's tied head is set already
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise LowbitError(f"{path}: missing tensors {missing[:5]}")
    model.eval()
    return result


# -- writing -------------------------------------------------------------------------------------
def dense_state(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every dense tensor (biases of quantized linears included) by name, tied ones once, floats
    in ``dtype`` (as they are when None)."""
    out = {}
    for mod_name, _, name, t in dense_tensors(model):
        t = t.detach()
        cast = dtype is not None and t.dtype.is_floating_point
        out[f"{mod_name}.{name}" if mod_name else name] = (t.to(dtype) if cast else t).contiguous()
    return out


def write_folder(
    loaded: "LoadedModel", out: Path, overwrite: bool, tensors: dict[str, torch.Tensor],
    quantization_config: dict[str, Any], extra_json: dict[str, dict[str, Any]] | None = None,
    sort_config_keys: bool = False,
) -> Path:
    """Write the folder ``out`` atomically: ``tensors`` plus the dense state (in the recipe's
    ``dense_dtype``), ``config.json`` with ``quantization_config`` (keys sorted throughout with
    ``sort_config_keys``), ``extra_json`` files, tokenizer and recipe."""
    model = loaded.model
    recipe = getattr(model, "lowbit_recipe", None)
    dense_dtype = None if recipe is None else getattr(torch, recipe.dense_dtype)
    out = Path(out)
    with atomic_folder(out, overwrite) as tmp:
        save_file({**tensors, **dense_state(model, dense_dtype)}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / CONFIG).read_text())
        config["quantization_config"] = quantization_config
        write_json(tmp / CONFIG, config, sort_keys=sort_config_keys)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        if recipe is not None:
            write_json(tmp / RECIPE, recipe.to_dict())
    return out
