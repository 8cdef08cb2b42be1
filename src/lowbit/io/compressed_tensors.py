"""The compressed-tensors checkpoint layout: what llm-compressor writes and transformers (with the
``compressed-tensors`` package) and vLLM read.

A folder::

    config.json          the transformers config plus its ``quantization_config``
                         (``quant_method: compressed-tensors``; ``config_groups``: one scheme per
                         distinct codec; ``format``; ``ignore``: the linears left dense)
    model.safetensors    dense tensors as in the model (a tied LM head stored once, under its
                         embedding) and, for each quantized linear NAME, the tensors below
    tokenizer files
    recipe.json          lowbit's recipe, and lowbit_export.json its source model (lowbit only)

Per quantized linear with an ``(out, in)`` weight, as compressed-tensors 0.20 reads them:

* ``pack-quantized``, lowbit's ``int`` codec: ``NAME.weight_packed`` int32
  ``(out, ceil(in * bits / 32))``: each row's codes as one bit stream, code ``c`` at bits
  ``[c*bits, (c+1)*bits)``, least significant bit first, cut into little-endian 32-bit words
  (lowbit's own packing, row by row, each row padded to whole words); ``NAME.weight_shape``
  int64 ``[out, in]``; ``NAME.weight_scale`` fp16 ``(out, G)`` per group, ``(out, 1)`` per
  channel, ``(1,)`` per tensor; asymmetric: ``NAME.weight_zero_point``, packed the same way along
  the *output* dimension, int32 ``(ceil(out * bits / 32), G)``, or int8 ``(1,)`` per tensor.
  compressed-tensors decodes a signed code ``q`` in ``[-2**(bits-1), 2**(bits-1) - 1]`` as
  ``scale * (q - zp)`` (``zp = 0`` when symmetric) and packs ``q + 2**(bits-1)``: the stored
  bits are lowbit's unsigned codes unchanged, and its zero point is lowbit's ``zero - 2**(bits-1)``
  (so a packed zero point holds lowbit's ``zero``). Releases up to 0.17 packed ``32 // bits``
  codes per word instead (none straddling two words): the same bytes for 2, 4 and 8 bits; the
  reader also accepts that older layout for 3, 5, 6 and 7 bits.
* ``float-quantized``, lowbit's ``fp8`` codec (E4M3): ``NAME.weight`` float8_e4m3fn ``(out, in)``
  and ``NAME.weight_scale`` float32, shaped as above.
* ``int-quantized``, lowbit's 8-bit ``int`` codec on a linear whose inputs are quantized to int8
  (W8A8, what vLLM's int8 kernels read): ``NAME.weight`` int8, the signed code, and
  ``NAME.weight_scale``; asymmetric: ``NAME.weight_zero_point`` int8 ``(out, G)``.
* quantized inputs (the recipe's ``activations``, the scheme's ``input_activations``): int8 or FP8
  E4M3, dynamic per token (no tensor) or static per tensor: ``NAME.input_scale`` float32 ``(1,)``
  and, for asymmetric int8, ``NAME.input_zero_point`` int8 ``(1,)`` (lowbit's zero minus 128).
* the KV cache (the recipe's ``kv_cache``), when it is vLLM's FP8 cache (E4M3 keys and values,
  static per-tensor scales from calibration, no full-precision window): ``kv_cache_scheme``
  ``{num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}`` and, per
  attention module ATTN, ``ATTN.k_scale`` / ``ATTN.v_scale`` float32 ``(1,)`` (the value is
  ``fp8 * scale``). Another KV cache is not written (a warning says so): it is a runtime choice.

The bytes are those of compressed-tensors' own compressors (the tests compare them), and both
decode as lowbit does (``(q - zp) * scale``, ``fp8 * scale``) in the scale's dtype. What that
means in transformers 5.23 with compressed-tensors 0.20:

* its default load keeps the modules compressed and decompresses on the first forward pass,
  with scales in the model dtype: loaded in float32, the weights are lowbit's bit for bit (a bf16
  load rounds the fp16 scales to bf16 first);
* that path cannot read packed asymmetric zero points (it allocates them unpacked: a size
  mismatch, for compressed-tensors' own files too); ``CompressedTensorsConfig(dequantize=True)``
  reads them, decoding in the stored fp16 scale dtype (each weight rounded once to fp16), but it
  applies one scheme to every module, so it cannot load a mix of int and fp8 schemes.

Groups that do not divide a row (compressed-tensors raises "tensor column shape must be
divisible" on them) are written as finer whole groups repeating their scale data
(:func:`whole_groups`: the same weights). What the layout cannot hold is refused before anything
is written: other codecs (:func:`unsupported_reason`), act-order with a ``g_idx`` (``actorder: group`` was dropped after compressed-tensors 0.18),
linears that transformers does not build as ``nn.Linear`` (GPT-2's Conv1D, fused experts) and
quantized embeddings, and input quantization other than the above (per-group or per-channel
scales, LLM.int8()'s outlier columns). The reader also takes ``weight_g_idx`` from older files and
int8 ``naive-quantized`` weights, and refuses output activations, KV-cache schemes other than
the FP8 one above, transforms and sparsity, which lowbit's linears cannot run.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.codecs import Codec, QuantizedTensor, codec_from_dict, pack_codes, unpack_codes
from lowbit.codecs.activations import ActivationQuantizer
from lowbit.codecs.base import GroupedCodec, group_order
from lowbit.codecs.fp8 import FP8Codec
from lowbit.codecs.ggml_legacy import GGMLBlockCodec
from lowbit.codecs.integer import IntCodec
from lowbit.errors import LowbitError
from lowbit.io.hf_checkpoint import (
    RECIPE,
    assemble,
    empty_model,
    hf_quantization_config,
    holds_checkpoint,
    meta_model,
    read_tensors,
    write_folder,
)
from lowbit.io.int32_packing import pack_int32, unpack_int32
from lowbit.modules import QuantEmbedding, QuantLinear
from lowbit.modules.kv_cache import attention_modules, kv_scale_tensors, set_kv_scales, take_kv_scales

if TYPE_CHECKING:
    from lowbit.models.loaded import LoadedModel
    from lowbit.recipes.kv_cache import KVCache

QUANT_METHOD = "compressed-tensors"
LAYOUT_VERSION = "0.20.0"  # the compressed-tensors release whose reader this layout was checked against
MARKER = "lowbit_export.json"
_FORMATS = {"int": "pack-quantized", "fp8": "float-quantized"}
_READABLE_FORMATS = ("pack-quantized", "float-quantized", "naive-quantized", "int-quantized")
_DENSE_PACKING_SINCE = (0, 18)  # 3/5/6/7-bit codes straddle words from this release on


# -- what the layout can hold ------------------------------------------------------------------


def unsupported_reason(codec: dict[str, Any]) -> str | None:
    """Why compressed-tensors cannot hold weights of ``codec`` (a ``Codec.model_dump()``), or None
    when it can (per-weight limits, such as groups that must divide a row, are checked on save)."""
    name = codec.get("name")
    if name == "int":
        if not codec.get("symmetric", True) and codec.get("zero_point", "integer") != "integer":
            return ("int with a float zero point (zero_point='float') has no compressed-tensors scheme: its zero "
                    "points are integers; lowbit's own format holds it")
        return None
    if name == "fp8":
        if codec.get("fmt", "e4m3") != "e4m3":
            return (f"fp8 {codec.get('fmt')}: compressed-tensors stores FP8 weights as E4M3 only; lowbit's own format "
                    "holds it")
        return None
    cls = Codec.registry.get(str(name))
    ggml = cls is not None and issubclass(cls, GGMLBlockCodec)
    where = "a GGUF file or lowbit's own format" if ggml else "lowbit's own format"
    return (f"codec {name!r} has no compressed-tensors layout (it holds int codes as pack-quantized and fp8 E4M3 "
            f"as float-quantized); {where} holds it")


def activations_reason(act: Any) -> str | None:
    """Why compressed-tensors (as vLLM serves it) cannot hold this input quantization (a recipe's
    ``Activations``), or None: it holds int8 and FP8 E4M3 inputs, dynamic per token or static per
    tensor (int8 static ones asymmetric too)."""
    if act.outlier_threshold is not None:
        return "LLM.int8()'s 16-bit outlier columns have no compressed-tensors scheme; lowbit's own format holds them"
    if act.outlier_channels is not None:
        return "fixed 16-bit input channels have no compressed-tensors scheme; lowbit's own format holds them"
    if act.format not in ("int8", "fp8_e4m3"):
        return f"{act.format} inputs have no compressed-tensors scheme (int8 and fp8 E4M3 do)"
    if (act.dynamic, act.granularity) not in ((True, "token"), (False, "tensor")):
        how = "dynamic" if act.dynamic else "static"
        return (f"{how} per-{act.granularity} input scales: compressed-tensors' W8A8 schemes are dynamic per token or "
                "static per tensor")
    if not act.symmetric and act.dynamic:
        return "dynamic asymmetric inputs: compressed-tensors' dynamic schemes are symmetric"
    return None


def input_args(q: QuantLinear) -> dict[str, Any] | None:
    """The compressed-tensors ``input_activations`` arguments of a linear's input quantization."""
    a = q.input_quant
    if a is None:
        return None
    return {"num_bits": 8, "type": "int" if a.format == "int8" else "float", "symmetric": a.symmetric,
            "strategy": a.granularity, "group_size": None, "dynamic": q.input_scale is None, "observer": None}


def _export_problem(name: str, qt: QuantizedTensor, module: nn.Module | None) -> str | None:
    """Why the quantized linear ``name`` cannot be written (``module``: its meta twin in the
    transformers model), or None."""
    reason = unsupported_reason(qt.codec)
    if reason is not None:
        return f"{name}: {reason}"
    if not isinstance(module, nn.Linear):
        kind = "absent" if module is None else f"a {type(module).__name__}"
        return (f"{name}: compressed-tensors quantizes nn.Linear layers only, and transformers builds this one as "
                f"{kind}; lowbit's own format holds it")
    codec = qt.get_codec()
    assert isinstance(codec, GroupedCodec)
    rows, cols = qt.shape
    if codec.granularity == "group":
        assert codec.group_size is not None
        if "g_idx" in qt.data and not _trivial_g_idx(qt.data["g_idx"], codec.group_size):
            return (f"{name}: act-order with a g_idx (GPTQ act_order without static_groups) cannot be stored: "
                    "compressed-tensors no longer reads a g_idx (actorder='group', dropped after 0.18); quantize "
                    "with static_groups (act-order without g_idx), or write the GPTQ layout or lowbit's own format")
    return None


def _input_problem(name: str, layer: QuantLinear) -> str | None:
    """Why the input quantization of ``layer`` cannot be written, or None."""
    q = layer.input_quant
    if q is None:
        return None
    static = layer.input_scale is not None
    if getattr(layer, "outlier_threshold", None) is not None:
        return f"{name}: LLM.int8()'s 16-bit outlier columns have no compressed-tensors scheme"
    if layer.input_channels is not None:
        return f"{name}: fixed 16-bit input channels have no compressed-tensors scheme"
    if q.format not in ("int8", "fp8_e4m3") or (static, q.granularity) not in ((False, "token"), (True, "tensor")) \
            or (not static and not q.symmetric):
        how = "static" if static else "dynamic"
        return (f"{name}: {how} {q.describe()} inputs: compressed-tensors holds int8 and FP8 E4M3 inputs, dynamic "
                "symmetric per token or static per tensor")
    return None


def whole_groups(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` with groups that divide its rows: compressed-tensors refuses a shorter last group
    ("tensor column shape must be divisible"), so groups of ``g`` on ``cols`` columns are stored
    as groups of ``gcd(cols, g)`` that repeat their group's scale data (576 columns in groups of
    128: groups of 64). The weights are the same values; the scale data grows accordingly."""
    codec = qt.codec
    rows, cols = qt.shape
    if codec.get("granularity") != "group" or cols % int(codec["group_size"]) == 0 or "g_idx" in qt.data:
        return qt
    finer, source_group = qt.get_codec().grouping.whole_groups(cols)
    data = {k: (v if k == "codes" else v[:, source_group].contiguous()) for k, v in qt.data.items()}
    return QuantizedTensor({**codec, "group_size": finer}, qt.shape, data)


def _trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    cols = g_idx.numel()
    return torch.equal(g_idx.to(torch.long), torch.arange(cols, device=g_idx.device) // group_size)


# -- int32 row packing ---------------------------------------------------------------------------


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(rows, n)`` -> int32 ``(rows, ceil(n * bits / 32))``: each row one bit
    stream (:func:`lowbit.io.int32_packing.pack_int32`), its last word padded with zero bits."""
    n = codes.shape[1]
    padded = F.pad(codes.to(torch.uint8), (0, (-n) % 32))  # a row of 32k codes fills whole words
    return pack_int32(padded, bits)[:, : packed_width(n, bits)].contiguous()


def unpack_rows(words: torch.Tensor, bits: int, n: int, legacy: bool = False) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 codes ``(rows, n)``; with ``legacy``, words holding
    ``32 // bits`` codes each (compressed-tensors up to 0.17)."""
    rows, width = words.shape
    if legacy:
        per = 32 // bits
        w = words.to(torch.int64) & 0xFFFFFFFF
        codes = (w.unsqueeze(-1) >> (torch.arange(per) * bits)) & ((1 << bits) - 1)
        return codes.reshape(rows, -1)[:, :n].to(torch.uint8)
    padded = F.pad(words.to(torch.int32), (0, (-width) % bits))  # `bits` words hold whole codes
    return unpack_int32(padded, bits)[:, :n]


def packed_width(n: int, bits: int, legacy: bool = False) -> int:
    """int32 words per row of ``n`` codes."""
    return -(-n // (32 // bits)) if legacy else -(-n * bits // 32)


# -- lowbit -> compressed-tensors --------------------------------------------------------------


def _scheme(codec: dict[str, Any]) -> dict[str, Any]:
    """The compressed-tensors weight arguments of a lowbit codec."""
    c = codec_from_dict(codec)
    assert isinstance(c, (IntCodec, FP8Codec))
    return {
        "num_bits": c.bits if isinstance(c, IntCodec) else 8,
        "type": "int" if isinstance(c, IntCodec) else "float",
        "symmetric": c.symmetric if isinstance(c, IntCodec) else True,
        "strategy": c.granularity,
        "group_size": c.group_size if c.granularity == "group" else None,
        "dynamic": False,
    }


def _scale_shape(granularity: str, rows: int, groups: int) -> tuple[int, ...]:
    return (1,) if granularity == "tensor" else (rows, groups)


def weight_format(codec: dict[str, Any], inputs: dict[str, Any] | None) -> str:
    """The compressed-tensors format of a weight: int8 weights beside quantized int8 inputs are
    ``int-quantized`` (one signed byte each, what vLLM's W8A8 kernels read), other int weights
    ``pack-quantized``, FP8 ``float-quantized``."""
    if codec["name"] == "int" and codec.get("bits") == 8 and inputs is not None and inputs["type"] == "int":
        return "int-quantized"
    return _FORMATS[codec["name"]]


def ct_tensors(qt: QuantizedTensor, fmt: str | None = None, input_scale: dict[str, torch.Tensor] | None = None,
               ) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one quantized linear, by local name (``weight_packed``, ...),
    in format ``fmt`` (default: the codec's), with static ``input_scale`` data as ``input_scale``
    (and ``input_zero_point``)."""
    codec = qt.get_codec()
    assert isinstance(codec, (IntCodec, FP8Codec))
    rows, cols = qt.shape
    codes = unpack_codes(qt.data["codes"], codec.code_bits, rows * cols).view(rows, cols)
    scale = qt.data["scale"]
    scale = scale.reshape(_scale_shape(codec.granularity, *scale.shape))
    inputs: dict[str, torch.Tensor] = {}
    if input_scale is not None:
        inputs["input_scale"] = input_scale["scale"].reshape(1).to(torch.float32).contiguous()
        if "zero" in input_scale:  # lowbit's unsigned zero point; compressed-tensors' is signed
            inputs["input_zero_point"] = (input_scale["zero"].reshape(1).to(torch.int64) - 128).to(torch.int8)
    if isinstance(codec, FP8Codec):
        return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale": scale.to(torch.float32).contiguous(), **inputs}
    half = 1 << (codec.bits - 1)
    if fmt == "int-quantized":
        out = {"weight": (codes.to(torch.int16) - half).to(torch.int8), "weight_scale": scale.contiguous(), **inputs}
    else:
        out = {
            "weight_packed": pack_rows(codes, codec.bits),
            "weight_shape": torch.tensor([rows, cols], dtype=torch.int64),
            "weight_scale": scale.contiguous(),
            **inputs,
        }
    if not codec.symmetric:
        zero = qt.data["zero"].to(torch.int64)  # integer-valued fp16 in [0, 2**bits - 1]
        if codec.granularity == "tensor":
            out["weight_zero_point"] = (zero.reshape(1) - half).to(torch.int8)
        elif fmt == "int-quantized":
            out["weight_zero_point"] = (zero - half).to(torch.int8).contiguous()
        else:
            out["weight_zero_point"] = pack_rows(zero.t(), codec.bits).t().contiguous()
    return out


KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def kv_cache_problem(kv: "KVCache | None") -> str | None:
    """Why compressed-tensors' ``kv_cache_scheme`` cannot hold the recipe's KV cache (it holds
    vLLM's: FP8 E4M3 keys and values with static per-tensor scales, no full-precision window);
    None when it can or there is no KV cache."""
    if kv is None:
        return None
    fp8_static = all(c.format == "fp8_e4m3" and c.static for c in (kv.keys, kv.values))
    if not fp8_static:
        return f"its kv_cache_scheme holds FP8 E4M3 keys and values with static scales (vLLM's), not {kv.describe()}"
    if kv.residual:
        return f"its kv_cache_scheme has no full-precision window (the recipe keeps the last {kv.residual} tokens)"
    return None


def quantization_config(quantized: dict[str, QuantizedTensor], dense_linears: list[str],
                        inputs: dict[str, dict[str, Any] | None] | None = None,
                        kv_cache_scheme: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json``'s ``quantization_config``: one config group per distinct codec and input
    quantization (``inputs``: a linear's ``input_activations``, see :func:`input_args`); a single
    group targets every ``Linear`` but the dense ones (llm-compressor's way), several name their
    modules."""
    inputs = inputs or {}
    by_scheme: dict[str, list[str]] = {}
    for name, qt in quantized.items():
        by_scheme.setdefault(json.dumps([qt.codec, inputs.get(name)], sort_keys=True), []).append(name)
    single = len(by_scheme) == 1
    groups = {}
    formats = set()
    for i, (key, names) in enumerate(by_scheme.items()):
        codec, acts = json.loads(key)
        fmt = weight_format(codec, acts)
        formats.add(fmt)
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if single else names,
            "weights": _scheme(codec),
            "input_activations": acts,
            "output_activations": None,
            "format": fmt,
        }
    return {
        "quant_method": QUANT_METHOD,
        "version": LAYOUT_VERSION,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": dense_linears if single else [],
        "kv_cache_scheme": kv_cache_scheme,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def save_compressed_tensors(
    loaded: "LoadedModel", out: Path, overwrite: bool = False, source: str | None = None
) -> Path:
    """Write a quantized model as a compressed-tensors folder ``out`` (see the module docstring);
    a LowbitError, before anything is written, when the layout cannot hold it."""
    model = loaded.model
    if any(isinstance(m, QuantEmbedding) for m in model.modules()):
        raise LowbitError("compressed-tensors cannot hold a quantized token embedding (a GGUF type mix): write a "
                          "GGUF file (--out FILE.gguf)")
    quantized = {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise LowbitError("the model is not quantized (no quantized linears)")
    twin = meta_model(model.config)
    twins = dict(twin.named_modules())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    problems = [p for n, qt in quantized.items()
                if (p := _export_problem(n, qt, twins.get(n)) or _input_problem(n, layers[n])) is not None]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LowbitError(f"cannot write compressed-tensors: {problems[0]}{more}")
    quantized = {n: whole_groups(qt) for n, qt in quantized.items()}
    dense_linears = [n for n, m in twin.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    recipe = getattr(model, "lowbit_recipe", None)
    inputs = {n: input_args(m) for n, m in layers.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, qt in quantized.items():
        fmt = weight_format(qt.codec, inputs[name])
        tensors.update({f"{name}.{k}": v for k, v in ct_tensors(qt, fmt, layers[name].input_scale).items()})
    kv = None if recipe is None else recipe.kv_cache
    problem = kv_cache_problem(kv)
    if problem is not None:
        warnings.warn(f"compressed-tensors: the recipe's KV cache is not written ({problem}); choose the cache when "
                      "running the model (vLLM's --kv-cache-dtype, lowbit's --kv-cache)", stacklevel=2)
    scheme = None
    if kv is not None and problem is None:
        scheme = dict(KV_CACHE_SCHEME)
        tensors.update(kv_scale_tensors(model))
    marker = {
        "format": QUANT_METHOD,
        "lowbit_version": lowbit.__version__,
        "source": source or loaded.source,
        "recipe_digest": None if recipe is None else recipe.digest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return write_folder(loaded, out, overwrite, tensors, quantization_config(quantized, dense_linears, inputs, scheme),
                        {MARKER: marker}, sort_config_keys=True)


# -- compressed-tensors -> lowbit --------------------------------------------------------------


def ct_config(path: Path) -> dict[str, Any] | None:
    """``config.json``'s compressed-tensors ``quantization_config``, or None (another or none)."""
    qc = hf_quantization_config(path)
    return qc if qc is not None and qc.get("quant_method") == QUANT_METHOD else None


def is_compressed_tensors_folder(path: Path) -> bool:
    """Whether ``path`` is a model folder whose config declares compressed-tensors quantization."""
    return holds_checkpoint(path, ct_config)


def _read_quantization_config(path: Path) -> dict[str, Any]:
    qc = ct_config(path)
    if qc is None:
        raise LowbitError(f"{path}: config.json declares no compressed-tensors quantization_config")
    return qc


class _Group:
    """One config group of a compressed-tensors config, as lowbit reads it."""

    def __init__(self, path: Path, name: str, group: Any, default_format: str) -> None:
        where = f"{path}: quantization_config.config_groups.{name}"
        if not isinstance(group, dict) or not _strings(group.get("targets")):
            raise LowbitError(f"{where}: not a scheme with a list of targets")
        if group.get("output_activations"):
            raise LowbitError(f"{where}: quantizes output_activations, which lowbit's linears cannot run")
        self.inputs, self.static_inputs = _inputs_of(where, group.get("input_activations"))
        self.targets: list[str] = group["targets"]
        self.format = group.get("format") or default_format
        if self.format not in _READABLE_FORMATS:
            raise LowbitError(f"{where}: format {self.format!r} is not read by lowbit (it reads "
                              f"{', '.join(_READABLE_FORMATS)})")
        self.codec = _codec_of(where, group.get("weights"))

    def matches(self, name: str, module: nn.Module, ignore: list[str]) -> bool:
        hit = any(_target_hit(t, name, module) for t in self.targets)
        return hit and not any(_target_hit(t, name, module) for t in ignore)


def _inputs_of(where: str, a: Any) -> tuple[ActivationQuantizer | None, bool]:
    """The quantizer of a scheme's ``input_activations`` and whether its scales are static."""
    if a is None:
        return None, False
    if not isinstance(a, dict):
        raise LowbitError(f"{where}.input_activations: not a mapping")
    kind, bits, strategy = a.get("type", "int"), a.get("num_bits", 8), a.get("strategy") or "tensor"
    dynamic, symmetric = bool(a.get("dynamic", False)), bool(a.get("symmetric", True))
    fmt = {("int", 8): "int8", ("float", 8): "fp8_e4m3"}.get((kind, bits))
    if fmt is None or (dynamic, strategy) not in ((True, "token"), (False, "tensor")) or (dynamic and not symmetric) \
            or (fmt != "int8" and not symmetric):
        raise LowbitError(f"{where}.input_activations: {bits}-bit {kind} inputs, strategy {strategy!r}, "
                          f"{'dynamic' if dynamic else 'static'}{'' if symmetric else ' asymmetric'}: lowbit reads int8 and "
                          "fp8 inputs, dynamic symmetric per token or static per tensor")
    return ActivationQuantizer(fmt, strategy, None, symmetric), not dynamic  # type: ignore[arg-type]


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _target_hit(target: str, name: str, module: nn.Module) -> bool:
    """compressed-tensors' matching: ``re:REGEX`` (re.match) or the exact module name, or a class
    name anywhere in the module's class hierarchy."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(c.__name__ == target for c in type(module).__mro__)


def _codec_of(where: str, w: Any) -> Codec | None:
    """The lowbit codec of a scheme's weight arguments (None: weights not quantized)."""
    if w is None:
        return None
    if not isinstance(w, dict):
        raise LowbitError(f"{where}.weights: not a mapping")
    bits, kind = w.get("num_bits", 8), w.get("type", "int")
    strategy, group_size = w.get("strategy"), w.get("group_size")
    if strategy is None:  # compressed-tensors infers it from the group size
        strategy = "tensor" if group_size is None else ("channel" if group_size == -1 else "group")
    if w.get("dynamic"):
        raise LowbitError(f"{where}: dynamic weight quantization is not a stored format")
    if strategy not in ("tensor", "channel", "group"):
        raise LowbitError(f"{where}: weight strategy {strategy!r} is not read by lowbit (it reads tensor, channel "
                          "and group scales)")
    if w.get("actorder") not in (None, False, "weight", "static", "group", "dynamic"):
        raise LowbitError(f"{where}: unknown actorder {w.get('actorder')!r}")
    params: dict[str, Any] = {"granularity": strategy, "group_size": group_size if strategy == "group" else None}
    try:
        if kind == "int" and isinstance(bits, int) and 2 <= bits <= 8:
            return IntCodec(bits=bits, symmetric=bool(w.get("symmetric", True)), zero_point="integer", **params)
        if kind == "float" and bits == 8 and w.get("symmetric", True):
            return FP8Codec(fmt="e4m3", **params)
    except ValueError as e:
        raise LowbitError(f"{where}: {str(e).splitlines()[0]}") from None
    asym = "" if w.get("symmetric", True) else " (asymmetric)"
    raise LowbitError(f"{where}: {bits}-bit {kind} weights{asym} are not read by lowbit (it reads int 2..8 bits and "
                      "symmetric fp8 E4M3)")


def _version(qc: dict[str, Any]) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", str(qc.get("version", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


_SCALE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


class _Reader:
    """Turns one module's compressed-tensors tensors into a lowbit QuantizedTensor."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], version: tuple[int, int] | None) -> None:
        self.path = path
        self.tensors = tensors
        self.version = version
        self.consumed: set[str] = set()

    def take(self, key: str, required: bool = True) -> torch.Tensor | None:
        t = self.tensors.get(key)
        if t is None and required:
            raise LowbitError(f"{self.path}: missing tensor {key}")
        if t is not None:
            self.consumed.add(key)
        return t

    def quantized(self, name: str, codec: Codec, shape: tuple[int, int]) -> QuantizedTensor:
        rows, cols = shape
        assert isinstance(codec, (IntCodec, FP8Codec))
        R, G, _ = codec.grouping.grid(shape)
        scale = self.take(f"{name}.weight_scale")
        assert scale is not None
        if scale.numel() != R * G or scale.dtype not in _SCALE_DTYPES:
            raise LowbitError(f"{self.path}: {name}.weight_scale has shape {tuple(scale.shape)} and dtype "
                              f"{scale.dtype}, expected {R * G} floats for {codec.describe()} on a {rows}x{cols} "
                              "weight")
        data: dict[str, torch.Tensor] = {}
        if isinstance(codec, FP8Codec):
            codes = self._fp8_codes(name, shape)
            data["scale"] = scale.reshape(R, G).to(torch.float32)
        else:
            # the scales in their own dtype, exactly (llm-compressor keeps a float32 model's in float32)
            codec = codec.model_copy(update={"scale_dtype": _SCALE_DTYPES[scale.dtype]})
            codes = self._int_codes(name, codec, shape)
            data["scale"] = scale.reshape(R, G).contiguous()
            if not codec.symmetric:
                data["zero"] = self._zero(name, codec, rows, R, G).to(scale.dtype)
            elif (zp := self.take(f"{name}.weight_zero_point", required=False)) is not None and zp.any():
                raise LowbitError(f"{self.path}: {name} is symmetric but has a non-zero weight_zero_point")
        data = {"codes": pack_codes(codes, codec.code_bits), **data}
        g_idx = self.take(f"{name}.weight_g_idx", required=False)
        if g_idx is not None and not bool((g_idx == -1).any()):  # -1: column order
            if codec.granularity != "group":
                raise LowbitError(f"{self.path}: {name}.weight_g_idx on a weight without groups")
            data["g_idx"] = g_idx.to(torch.int32).reshape(-1).contiguous()
            try:
                group_order(data["g_idx"], codec.grouping, shape)
            except ValueError as e:
                raise LowbitError(f"{self.path}: {name}.weight_g_idx: {e}") from None
        return QuantizedTensor(codec.model_dump(), shape, data)

    def input_scale(self, name: str, quantizer: ActivationQuantizer) -> dict[str, torch.Tensor]:
        """Static per-tensor input scale data (``input_scale``, and ``input_zero_point`` when
        asymmetric) as lowbit's ``(1, 1)`` float32 scale and unsigned zero."""
        scale = self.take(f"{name}.input_scale")
        assert scale is not None
        if scale.numel() != 1 or not scale.dtype.is_floating_point:
            raise LowbitError(f"{self.path}: {name}.input_scale should be one float, found {scale.dtype} "
                              f"{tuple(scale.shape)}")
        out = {"scale": scale.reshape(1, 1).to(torch.float32)}
        zp = self.take(f"{name}.input_zero_point", required=not quantizer.symmetric)
        if not quantizer.symmetric:
            assert zp is not None
            if zp.numel() != 1 or zp.dtype.is_floating_point:
                raise LowbitError(f"{self.path}: {name}.input_zero_point should be one integer")
            out["zero"] = (zp.reshape(1, 1).to(torch.float32) + 128)
        elif zp is not None and zp.any():
            raise LowbitError(f"{self.path}: {name} has symmetric inputs but a non-zero input_zero_point")
        return out

    def _fp8_codes(self, name: str, shape: tuple[int, int]) -> torch.Tensor:
        w = self.take(f"{name}.weight")
        assert w is not None
        if w.dtype != torch.float8_e4m3fn or tuple(w.shape) != shape:
            raise LowbitError(f"{self.path}: {name}.weight is {w.dtype} {tuple(w.shape)}, expected float8_e4m3fn "
                              f"{shape}")
        return w.view(torch.uint8)

    def _int_codes(self, name: str, codec: IntCodec, shape: tuple[int, int]) -> torch.Tensor:
        rows, cols = shape
        half = 1 << (codec.bits - 1)
        packed = self.take(f"{name}.weight_packed", required=False)
        if packed is None:  # naive-quantized: signed codes stored as int8
            w = self.take(f"{name}.weight")
            assert w is not None
            if w.dtype != torch.int8 or tuple(w.shape) != shape:
                raise LowbitError(f"{self.path}: {name}.weight is {w.dtype} {tuple(w.shape)}, expected int8 {shape}")
            if int(w.min()) < -half or int(w.max()) >= half:
                raise LowbitError(f"{self.path}: {name}.weight has codes outside {codec.bits} bits")
            return (w.to(torch.int16) + half).to(torch.uint8)
        stored = self.take(f"{name}.weight_shape")
        assert stored is not None
        if [int(x) for x in stored.reshape(-1)] != [rows, cols]:
            raise LowbitError(f"{self.path}: {name}.weight_shape is {stored.tolist()}, the model's linear is "
                              f"{rows}x{cols}")
        legacy = self._legacy(codec.bits, cols, packed.shape[-1])
        if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, packed_width(cols, codec.bits, legacy)):
            raise LowbitError(f"{self.path}: {name}.weight_packed is {packed.dtype} {tuple(packed.shape)}, expected "
                              f"int32 ({rows}, {packed_width(cols, codec.bits, legacy)}) for {codec.bits}-bit codes")
        return unpack_rows(packed, codec.bits, cols, legacy)

    def _legacy(self, bits: int, n: int, width: int) -> bool:
        """Whether codes are packed ``32 // bits`` per word (compressed-tensors up to 0.17)."""
        if 32 % bits == 0:
            return False  # both layouts are the same
        if self.version is not None:
            return self.version < _DENSE_PACKING_SINCE
        return width == packed_width(n, bits, legacy=True) != packed_width(n, bits)

    def _zero(self, name: str, codec: IntCodec, rows: int, R: int, G: int) -> torch.Tensor:
        zp = self.take(f"{name}.weight_zero_point")
        assert zp is not None
        half = 1 << (codec.bits - 1)
        if codec.granularity == "tensor":
            if zp.numel() != 1 or zp.dtype.is_floating_point:
                raise LowbitError(f"{self.path}: {name}.weight_zero_point must be one integer, got {zp.dtype} "
                                  f"{tuple(zp.shape)}")
            zero = zp.reshape(1, 1).to(torch.int64) + half
        elif zp.dtype == torch.int8 and tuple(zp.shape) == (R, G):  # int-quantized: one signed byte each
            zero = zp.to(torch.int64) + half
        else:
            legacy = self._legacy(codec.bits, rows, zp.shape[0])
            want = (packed_width(rows, codec.bits, legacy), G)
            if zp.dtype != torch.int32 or tuple(zp.shape) != want:
                raise LowbitError(f"{self.path}: {name}.weight_zero_point is {zp.dtype} {tuple(zp.shape)}, expected "
                                  f"packed int32 {want}")
            zero = unpack_rows(zp.t().contiguous(), codec.bits, rows, legacy).t().to(torch.int64)
        if int(zero.min()) < 0 or int(zero.max()) > codec.qmax:
            raise LowbitError(f"{self.path}: {name}.weight_zero_point is outside the {codec.bits}-bit range")
        return zero.reshape(R, G)


def _groups(path: Path, qc: dict[str, Any]) -> tuple[list[_Group], list[str]]:
    for key, what in (("transform_config", "transforms (rotations)"),
                      ("sparsity_config", "sparsity"), ("moe_sparsity_config", "expert sparsity")):
        if qc.get(key):
            raise LowbitError(f"{path}: the checkpoint uses {what} ({key}), which lowbit does not read")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise LowbitError(f"{path}: quantization_status {status!r}: the weights are not stored compressed (load the "
                          "folder as a plain Hugging Face model)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise LowbitError(f"{path}: quantization_config has no config_groups")
    ignore = qc.get("ignore") or []
    if not _strings(ignore):
        raise LowbitError(f"{path}: quantization_config.ignore is not a list of module names")
    default_format = qc.get("format") or "dense"
    return [_Group(path, name, g, default_format) for name, g in groups.items()], ignore


def load_compressed_tensors(path: Path, dtype: torch.dtype = torch.float32) -> "LoadedModel":
    """Read a compressed-tensors folder (written by lowbit, llm-compressor or anyone else) into a
    lowbit model: its quantized linears become :class:`QuantLinear` with the equivalent codec and
    the same weights bit for bit, never materialized as floats; dense tensors are cast to ``dtype``."""
    from lowbit.models.loaded import LoadedModel

    path = Path(path)
    qc = _read_quantization_config(path)
    groups, ignore = _groups(path, qc)
    tensors = read_tensors(path)
    model, tokenizer = empty_model(path, dtype, tensors)
    reader = _Reader(path, tensors, _version(qc))
    quantized: dict[str, QuantizedTensor] = {}
    inputs: dict[str, tuple[ActivationQuantizer, dict[str, torch.Tensor] | None]] = {}
    for name, module in list(model.named_modules()):
        group = next((g for g in groups if g.codec is not None and g.matches(name, module, ignore)), None)
        if group is None:
            continue
        if not isinstance(module, nn.Linear):
            raise LowbitError(f"{path}: {name} is a quantized {type(module).__name__}; lowbit reads quantized "
                              "nn.Linear layers only")
        assert group.codec is not None
        quantized[name] = reader.quantized(name, group.codec, (module.out_features, module.in_features))
        if group.inputs is not None:
            inputs[name] = (group.inputs, reader.input_scale(name, group.inputs) if group.static_inputs else None)
    if not quantized:
        raise LowbitError(f"{path}: no linear of the model matches the quantization_config's targets")
    kv = _kv_cache_of(path, qc)
    scales = _kv_scales(path, tensors, reader.consumed, kv)
    assemble(model, path, quantized, tensors, reader.consumed, dtype)
    for name, (quantizer, scale) in inputs.items():
        model.get_submodule(name).set_input_quant(quantizer, scale)
    if kv is not None:
        _set_kv_scales(path, model, scales)
        model.lowbit_kv_cache = kv
    source = _attach_recipe(path, model, quantized)
    return LoadedModel(model, tokenizer, source or str(path), path)


def _kv_cache_of(path: Path, qc: dict[str, Any]) -> "KVCache | None":
    """The KV cache a ``kv_cache_scheme`` declares: static per-tensor FP8 E4M3 (vLLM's), or
    LowbitError for anything else."""
    scheme = qc.get("kv_cache_scheme")
    if not scheme:
        return None
    if not isinstance(scheme, dict):
        raise LowbitError(f"{path}: quantization_config.kv_cache_scheme is not a mapping")
    # compressed-tensors' defaults: symmetric, static, per tensor when no group size is given
    got = {k: scheme.get(k) if scheme.get(k) is not None else KV_CACHE_SCHEME[k] if k in ("symmetric", "dynamic", "strategy")
           else None for k in KV_CACHE_SCHEME}
    if got != KV_CACHE_SCHEME:
        raise LowbitError(f"{path}: kv_cache_scheme {json.dumps(got)}: lowbit reads the static per-tensor FP8 cache "
                          f"({json.dumps(KV_CACHE_SCHEME)})")
    from lowbit.recipes.kv_cache import kv_cache_spec

    return kv_cache_spec("fp8-static")


def _kv_scales(path: Path, tensors: dict[str, torch.Tensor], consumed: set[str],
               kv: "KVCache | None") -> dict[str, tuple[float, float]]:
    try:
        scales = take_kv_scales(tensors, consumed)
    except ValueError as e:
        raise LowbitError(f"{path}: {e}") from None
    if scales and kv is None:
        raise LowbitError(f"{path}: holds k_scale / v_scale tensors but its quantization_config has no kv_cache_scheme")
    return scales


def _set_kv_scales(path: Path, model: nn.Module, scales: dict[str, tuple[float, float]]) -> None:
    wanted = attention_modules(model)
    if set(scales) != set(wanted):
        lacking = sorted(set(wanted) - set(scales))
        raise LowbitError(f"{path}: kv_cache_scheme needs k_scale and v_scale for every attention module; "
                          f"{'missing for ' + lacking[0] if lacking else 'found some for modules the model lacks'}")
    set_kv_scales(model, scales)


def _attach_recipe(path: Path, model: nn.Module, quantized: dict[str, QuantizedTensor]) -> str | None:
    """Set ``model.lowbit_recipe`` from a lowbit-written folder whose recipe gives every quantized
    linear the codec it holds; the source model it names, or None (a foreign folder: no recipe,
    so evaluation does not take the folder itself for its unquantized reference)."""
    from lowbit.recipes import Recipe

    try:
        marker = json.loads((path / MARKER).read_text())
        recipe = Recipe.from_file(path / RECIPE)
    except (OSError, ValueError, LowbitError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != QUANT_METHOD or not marker.get("source"):
        return None
    for name, qt in quantized.items():
        assigned = recipe.assignment(name)
        if assigned is None or assigned[0].model_dump() != qt.codec:
            return None
    model.lowbit_recipe = recipe
    return str(marker["source"])
