"""Named recipes, usable as ``--recipe NAME``: one table of (help line, recipe fields)."""

from __future__ import annotations

from typing import Any

from lowbit.errors import LowbitError
from lowbit.recipes.recipe import Recipe


def _rtn(name: str, **params: Any) -> dict[str, Any]:
    return {"codec": {"name": name, **params}, "algorithm": {"name": "rtn"}}


def _int(bits: int, symmetric: bool = True, group_size: int | None = 128) -> dict[str, Any]:
    if group_size is None:
        return _rtn("int", bits=bits, symmetric=symmetric, granularity="channel", group_size=None)
    return _rtn("int", bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)


def _calibrated(algorithm: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """``base``'s codec with a calibration-based ``algorithm`` and the default calibration
    (128 samples of 512 tokens from the built-in pydoc calibration split)."""
    return {**base, "algorithm": algorithm, "calibration": {"source": "pydoc-calib", "samples": 128, "seq_len": 512}}


# the codec of a quantized token embedding / LM head: int8, one scale per row (per token)
_E8: dict[str, Any] = {"name": "int", "bits": 8, "symmetric": True, "granularity": "channel", "group_size": None}
# GPTQ's defaults, as the int and NF4 presets run it
_GPTQ = "GPTQ (act-order, static groups)"
# dynamic per-token int8 inputs, as vLLM's W8A8 kernels quantize them
_W8A8_INPUTS: dict[str, Any] = {"format": "int8", "granularity": "token"}
# the observer of w8a8-static: the lowest KLD of the observers measured on SmolLM2 (BENCHMARKS.md,
# "Quantized activations"; percentiles clip its largest inputs and cost 10x more); SmoothQuant's a
# is searched there, the static per-tensor inputs in the search's loop (3x less loss than a = 0.5)
_STATIC_OBSERVER: dict[str, Any] = {"name": "mse"}
# fixed 16-bit input features per linear (w8a8-static-channels): SmolLM2's massive activations sit in a
# few features; 16 brought its static KLD to that of dynamic per-token inputs (BENCHMARKS, activations)
_KEPT_CHANNELS = 16
# AWQ's scaling before GPTQ, each candidate scale scored by the codes GPTQ chooses for it (scored by
# RTN's codes, AWQ then GPTQ lost more than GPTQ alone on SmolLM2: BENCHMARKS.md, "GPTQ's defaults")
_AWQ_FOR_GPTQ: dict[str, Any] = {"name": "awq", "score": "algorithm"}

# llama-quantize's mixes: preset name -> mix (Q4_0 and Q8_0 as mixes; gguf-q4_0 / gguf-q8_0 are one type
# on every linear, embeddings F16)
_MIXES = {"q2_k": "q2_k", "q3_k_m": "q3_k_m", "q4_k_s": "q4_k_s", "q4_k_m": "q4_k_m", "q5_k_m": "q5_k_m",
          "q6_k": "q6_k", "q4_0-mix": "q4_0", "q8_0-mix": "q8_0"}
_MIX_VARIANTS = [
    ("", " (llama-quantize's type per tensor), RTN with llama.cpp's searches", None),
    ("-imatrix", ", RTN searches weighted by calibration activations (an importance matrix)",
     {"name": "rtn", "clip_search": True, "importance": True}),
    # columns in order, as these mixes were measured (act-order is not measured on GGML grids)
    ("-gptq", ", GPTQ on each tensor's grid, block scales from the search weighted by the Hessian's diagonal",
     {"name": "gptq", "clip_search": True, "act_order": False}),
]


def _mix(preset: str, algorithm: dict[str, Any] | None) -> dict[str, Any]:
    from lowbit.recipes.gguf_mix_table import MIXES

    mix = _MIXES[preset]
    base = {**_rtn(MIXES[mix].default), "gguf_mix": mix}
    return base if algorithm is None else _calibrated(algorithm, base)


PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "int8": ("int8 per-channel symmetric, RTN", _int(8, group_size=None)),
    "w8a16": ("same as int8", _int(8, group_size=None)),
    "w4a16": ("int4 groups of 128 symmetric, RTN", _int(4, group_size=128)),
    # the token embedding (and a tied LM head, which shares it) int8 per row too, as llama.cpp's Q8_0 and
    # Q4_0 mixes store token_embd in Q8_0: a decode step reads an 8-bit head
    "int8-e8": ("int8 per-channel symmetric, RTN; token embedding (and tied LM head) int8 per row",
                {**_int(8, group_size=None), "embedding": _E8, "lm_head": _E8}),
    "w4a16-e8": ("int4 groups of 128 symmetric, RTN; token embedding (and tied LM head) int8 per row",
                 {**_int(4, group_size=128), "embedding": _E8, "lm_head": _E8}),
    "w4a16-asym": ("int4 groups of 128 asymmetric (fp16 zero), RTN", _int(4, symmetric=False, group_size=128)),
    "w4a16-g64": ("int4 groups of 64 symmetric, RTN", _int(4, group_size=64)),
    "w4a16-asym-g64": ("int4 groups of 64 asymmetric, RTN", _int(4, symmetric=False, group_size=64)),
    "w3a16": ("int3 groups of 64 symmetric, RTN", _int(3, group_size=64)),
    "w3a16-asym": ("int3 groups of 64 asymmetric, RTN", _int(3, symmetric=False, group_size=64)),
    "w2a16": ("int2 groups of 64 symmetric, RTN", _int(2, group_size=64)),
    "w2a16-asym": ("int2 groups of 64 asymmetric, RTN", _int(2, symmetric=False, group_size=64)),
    "fp8": ("FP8 E4M3 per-channel, float32 scales (compressed-tensors style)",
            _rtn("fp8", fmt="e4m3", granularity="channel")),
    "fp8-e5m2": ("FP8 E5M2 per-channel, float32 scales", _rtn("fp8", fmt="e5m2", granularity="channel")),
    "nf4": ("NF4 (QLoRA code book), absmax blocks of 64", _rtn("nf4", block_size=64, double_quant=False)),
    "nf4-dq": ("NF4 blocks of 64 with double-quantized absmax (8-bit, blocks of 256)",
               _rtn("nf4", block_size=64, double_quant=True)),
    "fp4": ("FP4 E2M1, fp16 scale per group of 32", _rtn("fp4", granularity="group", group_size=32)),
    "mxfp4": ("OCP MXFP4: E2M1, E8M0 scale per block of 32", _rtn("mxfp4")),
    "mxfp8": ("OCP MXFP8: E4M3, E8M0 scale per block of 32", _rtn("mxfp8", element="e4m3")),
    "nvfp4": ("NVFP4: E2M1, FP8 E4M3 scale per block of 16, FP32 tensor scale", _rtn("nvfp4")),
    "w4a16-gptq": (f"int4 groups of 128 symmetric, {_GPTQ}", _calibrated({"name": "gptq"}, _int(4, group_size=128))),
    "w4a16-g64-gptq": (f"int4 groups of 64 symmetric, {_GPTQ}", _calibrated({"name": "gptq"}, _int(4, group_size=64))),
    "w3a16-gptq": (f"int3 groups of 64 symmetric, {_GPTQ}", _calibrated({"name": "gptq"}, _int(3, group_size=64))),
    "w2a16-gptq": (f"int2 groups of 64 symmetric, {_GPTQ}", _calibrated({"name": "gptq"}, _int(2, group_size=64))),
    "nf4-gptq": (f"NF4 blocks of 64, {_GPTQ}",
                 _calibrated({"name": "gptq"}, _rtn("nf4", block_size=64, double_quant=False))),
    "w4a16-awq": ("int4 groups of 128 asymmetric, AWQ (the AutoAWQ format's codec)",
                  _calibrated({"name": "awq"}, _int(4, symmetric=False, group_size=128))),
    "w4a16-g64-awq": ("int4 groups of 64 symmetric, AWQ", _calibrated({"name": "awq"}, _int(4, group_size=64))),
    "w3a16-awq": ("int3 groups of 64 symmetric, AWQ", _calibrated({"name": "awq"}, _int(3, group_size=64))),
    # weights and inputs (activations) quantized: vLLM's W8A8 and FP8 schemes, SmoothQuant, LLM.int8()
    "w8a8": ("int8 per-channel weights, int8 inputs dynamic per token (no smoothing), RTN",
             {**_int(8, group_size=None), "activations": _W8A8_INPUTS}),
    "w8a8-smoothquant": ("w8a8 after SmoothQuant (a = 0.5) folds the inputs' outlier channels into the weights",
                         _calibrated({"name": "rtn"}, {**_int(8, group_size=None), "activations": _W8A8_INPUTS,
                                                       "transforms": [{"name": "smoothquant", "alpha": 0.5}]})),
    "w8a8-static": (f"int8 per-channel weights, int8 inputs with static per-tensor scales ({_STATIC_OBSERVER['name']} "
                    "observer on calibration data) after SmoothQuant (a searched per sub-step with the static inputs "
                    "in the loop), RTN",
                    _calibrated({"name": "rtn"}, {**_int(8, group_size=None), "activations": {
                        "format": "int8", "dynamic": False, "granularity": "tensor", "observer": _STATIC_OBSERVER},
                        "transforms": [{"name": "smoothquant", "alpha": None}]})),
    "w8a8-static-channels": (f"int8 per-channel weights, int8 inputs with static per-tensor scales "
                             f"({_STATIC_OBSERVER['name']} observer) except each linear's {_KEPT_CHANNELS} input features "
                             "with the largest calibrated |x|, kept in 16-bit (lowbit's format only), RTN",
                             _calibrated({"name": "rtn"}, {**_int(8, group_size=None), "activations": {
                                 "format": "int8", "dynamic": False, "granularity": "tensor",
                                 "observer": _STATIC_OBSERVER, "outlier_channels": _KEPT_CHANNELS}})),
    "fp8-dynamic": ("FP8 E4M3 per-channel weights, FP8 E4M3 inputs dynamic per token (compressed-tensors FP8_DYNAMIC)",
                    {**_rtn("fp8", fmt="e4m3", granularity="channel"),
                     "activations": {"format": "fp8_e4m3", "granularity": "token"}}),
    "w4a8": ("int4 groups of 128 symmetric weights, int8 inputs dynamic per token, RTN",
             {**_int(4, group_size=128), "activations": _W8A8_INPUTS}),
    "llm-int8": ("LLM.int8(): int8 per-channel weights (absmax / 127, as bitsandbytes), int8 inputs per token with "
                 "the columns where some |x| >= 6 in 16-bit",
                 {**_rtn("int", bits=8, granularity="channel", group_size=None, restricted=True, scale_dtype="float32"),
                  "activations": {**_W8A8_INPUTS, "outlier_threshold": 6.0}}),
    "w4a16-awq-gptq": ("int4 groups of 128 symmetric, AWQ's scaling (each candidate scored by GPTQ's codes) then "
                       "GPTQ's codes (act-order, static groups)",
                       _calibrated({"name": "gptq", "act_order": True},
                                   {**_int(4, group_size=128), "transforms": [_AWQ_FOR_GPTQ]})),
    "w4a16-g64-awq-gptq": ("int4 groups of 64 symmetric, AWQ's scaling (each candidate scored by GPTQ's codes) then "
                           "GPTQ's codes (act-order, static groups)",
                           _calibrated({"name": "gptq", "act_order": True},
                                       {**_int(4, group_size=64), "transforms": [_AWQ_FOR_GPTQ]})),
    # llama.cpp's legacy block types (embeddings and LM head stay F16; write with --out FILE.gguf)
    **{f"gguf-{t}": (f"llama.cpp {t.upper()} on every linear, RTN (llama.cpp's reference rounding)", _rtn(t))
       for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")},
    **{f"gguf-{t}-gptq": (f"llama.cpp {t.upper()} on every linear, GPTQ on its grid, block scales from llama.cpp's "
                          "search weighted by the Hessian's diagonal",
                          _calibrated({"name": "gptq", "clip_search": True, "act_order": False}, _rtn(t)))
       for t in ("q4_0", "q4_1", "q5_0", "q5_1")},
    **{f"gguf-{t}-imatrix": (f"llama.cpp {t.upper()} on every linear, RTN with llama.cpp's scale search weighted "
                             "by calibration activations (an importance matrix)",
                             _calibrated({"name": "rtn", "clip_search": True, "importance": True}, _rtn(t)))
       for t in ("q4_0", "q4_1", "q5_0", "q5_1")},
    # unquantized GGUF files (write with --out FILE.gguf), as llama.cpp's converter writes them
    **{f"gguf-{t}": (f"unquantized GGUF: every 2-D weight {t.upper()}, norms, biases and routers F32 (llama.cpp's "
                     f"convert_hf_to_gguf.py --outtype {t})", {"targets": [], "dense_dtype": dtype})
       for t, dtype in (("f32", "float32"), ("f16", "float16"), ("bf16", "bfloat16"))},
    # llama-quantize's type mixes (write with --out FILE.gguf); token embedding quantized as llama.cpp does
    **{f"gguf-{m}{suffix}": (f"llama.cpp {m.upper()} mix{help_tail}", _mix(m, algorithm))
       for m in _MIXES for suffix, help_tail, algorithm in _MIX_VARIANTS},
}

PRESET_HELP: dict[str, str] = {name: help_line for name, (help_line, _) in PRESETS.items()}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Recipe:
    if name not in PRESETS:
        raise LowbitError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return Recipe.from_dict({"name": name, **PRESETS[name][1]}, source=f"preset {name}")
