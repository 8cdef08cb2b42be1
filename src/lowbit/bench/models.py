"""The real models the benchmark scripts run on (``--model``), and how their tables are named."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BenchModel:
    name: str  # in headings: "SmolLM2-135M"
    about: str  # one sentence for a table's note


BENCH_MODELS = {
    "smollm2-135m": BenchModel("SmolLM2-135M", "SmolLM2-135M-Instruct (built-in `smollm2-135m`, Llama family, "
                               "dequantized from its Q4_1 GGUF: its weights lie on a Q4_1 grid)"),
    "qwen2.5-coder-0.5b": BenchModel("Qwen2.5-Coder-0.5B", "Qwen2.5-Coder-0.5B-Instruct (built-in `qwen2.5-coder-0.5b`, "
                                     "Qwen2 family: q/k/v biases, 2 KV heads, a 151,936-token vocabulary, an untied "
                                     "output matrix; dequantized from its Q4_K_M GGUF: most linears lie on a Q5_0 "
                                     "grid, the down projections on Q4_K/Q6_K)"),
}


def bench_model(spec: str) -> BenchModel:
    """The :class:`BenchModel` of ``spec`` (any other model is named by its spec)."""
    return BENCH_MODELS.get(spec, BenchModel(spec, f"`{spec}`"))


def model_section(section: str, spec: str) -> str:
    """The BENCHMARKS.md section of ``section``'s table for ``spec``: the default model's keeps
    the plain name, every other model's is suffixed with its spec."""
    return section if spec == DEFAULT_MODEL else f"{section}-{spec}"
