"""Imports point one way (DESIGN.md): every import in lowbit's source, at module level or inside a
function, goes to a module of the same layer or a lower one. The layers, lowest first:

0. errors, registry (the names every layer shares)
1. codecs: how numbers are stored; imports nothing else of lowbit
2. calibration: texts, samples, input statistics, observers
3. modules: runtime modules (QuantLinear, kernels)
4. transforms: equivalence transforms of a block
5. algorithms: which codes are chosen
6. model facts: the architecture table, the loaded-model record, weight fingerprints
7. recipes: typed recipes, presets, llama-quantize's type mixes
8. io: formats (readers and writers)
9. models: loading a model from anywhere (built-in, hub, GGUF, checkpoints)
10. pipeline, evaluation: quantizing, measuring (neither imports the other)
11. bench: sweeps, reports, comparisons
12. cli

Nothing imports cli.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import lowbit

SRC = Path(lowbit.__file__).resolve().parent
LAYERS: list[tuple[str, ...]] = [
    ("lowbit", "lowbit.errors", "lowbit.registry"),
    ("lowbit.codecs",),
    ("lowbit.calibration",),
    ("lowbit.modules",),
    ("lowbit.transforms",),
    ("lowbit.algorithms",),
    ("lowbit.models.architectures", "lowbit.models.loaded", "lowbit.models.fingerprint"),
    ("lowbit.recipes",),
    ("lowbit.io",),
    ("lowbit.models",),
    ("lowbit.pipeline", "lowbit.evaluation"),
    ("lowbit.bench",),
    ("lowbit.cli", "lowbit.__main__"),
]
SIBLINGS_APART = {("lowbit.pipeline", "lowbit.evaluation"), ("lowbit.evaluation", "lowbit.pipeline")}


def group_of(module: str) -> str:
    """The most specific LAYERS entry that ``module`` is (or lies under)."""
    best = ""
    for layer in LAYERS:
        for name in layer:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best = name
    assert best, module
    return best


def layer_of(module: str) -> int:
    g = group_of(module)
    return next(i for i, layer in enumerate(LAYERS) if g in layer)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, current: str, is_package: bool) -> list[str]:
    """The lowbit modules an import statement brings in: ``from P import x`` counts as P.x when
    that is a module, else as the module that defines x."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "lowbit"]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != "lowbit":
        return []
    out = []
    for alias in node.names:
        try:
            out.append(importlib.import_module(f"{source}.{alias.name}").__name__)
            continue
        except ImportError:
            pass
        obj = getattr(importlib.import_module(source), alias.name, None)
        defined = getattr(obj, "__module__", None)
        out.append(defined if isinstance(defined, str) and defined.startswith("lowbit") else source)
    return out


def test_imports_point_one_way() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        current = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in imported(node, current, path.name == "__init__.py"):
                if target == "lowbit.cli" and current not in ("lowbit.__main__",):
                    wrong.append(f"{current}:{node.lineno} imports the cli")
                elif layer_of(target) > layer_of(current):
                    wrong.append(f"{current}:{node.lineno} -> {target} (layer {layer_of(current)} -> {layer_of(target)})")
                elif (group_of(current), group_of(target)) in SIBLINGS_APART:
                    wrong.append(f"{current}:{node.lineno} -> {target} (pipeline and evaluation stay apart)")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer() -> None:
    for path in SRC.rglob("*.py"):
        layer_of(module_name(path))
