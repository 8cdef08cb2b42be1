"""Fuzzing of every reader of untrusted files (``reader_fuzzing``): seeded, bounded mutants of
files lowbit writes itself; each must be read, or refused with one LowbitError line that names
the file and leaks no Python internals. ``scripts/fuzz_readers.py`` runs the same for longer."""

from __future__ import annotations

from pathlib import Path

import pytest

from reader_fuzzing import LEAKS, Target, build_targets, mutate_json, run_case, run_target

# cases per target in the default run: a few thousand in all, under a minute on two cores
CASES = {"gguf-q-structure": 800, "gguf-f32-structure": 800, "gguf-packed": 250, "gguf-dequantized": 150,
         "imatrix-gguf": 600, "imatrix-dat": 600, "safetensors": 800, "folder-lowbit": 300, "folder-gptq": 200,
         "folder-awq": 200, "folder-compressed-tensors": 200, "recipe-json": 600, "recipe-yaml": 600}


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_targets(tmp_path_factory.mktemp("seeds"))


def test_every_target_has_a_budget(targets: dict[str, Target]) -> None:
    assert set(targets) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_damaged_files_are_read_or_refused_in_one_line(targets: dict[str, Target], name: str,
                                                       tmp_path: Path) -> None:
    import warnings

    target = targets[name]
    assert run_case(target.reader, target.folder / target.entry if target.entry else target.folder).kind == "ok"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "dequantized to float" for a type lowbit has no codec for
        tally = run_target(target, CASES[name], rng_seed=20261203, work=tmp_path, time_limit=20.0)
    assert tally.failures == [], tally.failures[:5]
    # the mutants reach both outcomes: most are refused, and some still read (values, not structure)
    assert tally.kinds["refused"] > tally.cases // 2 and tally.kinds["ok"] > 0


def test_the_oracle_catches_what_it_must(tmp_path: Path) -> None:
    """A reader that leaks an internal message, raises another type or hangs is a failure."""
    import time

    from lowbit import LowbitError

    def leaky(_: Path) -> None:
        raise LowbitError("x.gguf: index 5 is out of bounds for axis 0 with size 3")

    def crashing(_: Path) -> None:
        [][1]  # noqa: B018

    def hanging(_: Path) -> None:
        time.sleep(5)

    assert run_case(leaky, tmp_path).kind == "leak"
    assert run_case(lambda _: (_ for _ in ()).throw(LowbitError("two\nlines")), tmp_path).kind == "leak"
    assert run_case(crashing, tmp_path).kind == "crash"
    assert run_case(hanging, tmp_path, time_limit=0.2).kind == "timeout"
    assert LEAKS.search("cannot reshape array of size 228192 into shape (1536,324)")


def test_json_mutation_is_seeded_and_changes_the_value() -> None:
    import random

    seed = {"codec": {"name": "int", "bits": 4}, "rules": [{"match": "*"}], "shape": [64, 32]}
    a = [mutate_json(seed, random.Random(i)) for i in range(50)]
    b = [mutate_json(seed, random.Random(i)) for i in range(50)]
    assert repr(a) == repr(b)
    assert sum(x != seed for x in a) >= 45
    assert seed == {"codec": {"name": "int", "bits": 4}, "rules": [{"match": "*"}], "shape": [64, 32]}
