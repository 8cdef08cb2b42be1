"""The `lowbit` command, in-process: every bad input is one line on stderr and leaves nothing
behind; the happy path quantizes, inspects and evaluates a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.cli import main
from lowbit.modules.native import int4_rows, row_products
from lowbit.recipes import preset_names

# the tiny model's dense LM head on lowbit's row operator, where it is built and vectorized here
DENSE_HEAD = {"dense (row operator at 1-4 rows)": 1} if row_products() else {}

pytestmark = pytest.mark.usefixtures("lowbit_cache")


def run(capsys, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lowbit: error:"), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(out_dir: Path) -> None:
    assert not out_dir.exists()
    assert [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}")] == []


@pytest.fixture
def model_dir(hf_folder) -> Path:  # type: ignore[no-untyped-def]
    return hf_folder("llama")


@pytest.fixture
def text_file(tmp_path, text_factory) -> Path:  # type: ignore[no-untyped-def]
    p = tmp_path / "eval.txt"
    p.write_text(text_factory(1500))
    return p


def quantize(capsys, model: Path | str, out: Path, *extra: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
    return run(capsys, "quantize", str(model), "--out", str(out), "--no-progress", *extra)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_missing_model(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code, _, err = quantize(capsys, tmp_path / "nope", out, "--recipe", "w4a16")
    assert code == 1
    assert_one_line_error(code, err, "no such file")
    assert_nothing_written(out)


def test_truncated_safetensors(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    st = model_dir / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    out = tmp_path / "out"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16")
    assert_one_line_error(code, err, "cannot load model")
    assert_nothing_written(out)


def test_truncated_gguf(capsys, tiny_gguf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tiny_gguf(truncate_to=-64)
    out = tmp_path / "out"
    code, _, err = quantize(capsys, path, out, "--recipe", "w4a16")
    assert_one_line_error(code, err, "GGUF")
    assert_nothing_written(out)


def test_unknown_preset(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w5a16")
    assert_one_line_error(code, err, "unknown preset 'w5a16'", "w4a16")
    assert_nothing_written(out)


def test_recipe_with_unknown_field(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("codec:\n  name: int\n  bits: 4\n  group_size: 32\n  rounding: stochastic\n")
    out = tmp_path / "out"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", str(recipe))
    assert_one_line_error(code, err, "codec.rounding", "Extra inputs")
    assert_nothing_written(out)


def test_bits_out_of_range(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--bits", "9")
    assert code == 1
    assert_one_line_error(code, err, "codec.bits", "less than or equal to 8")
    assert_nothing_written(out)


@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_group_size_not_positive(capsys, model_dir, tmp_path, value: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ei:
        main(["quantize", str(model_dir), "--recipe", "w4a16", "--out", str(out), "--group-size", value])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "--group-size" in err and ("must be positive" in err or "expected an integer" in err)
    assert_nothing_written(out)


def test_nan_weight(capsys, hf_folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def plant(model) -> None:  # type: ignore[no-untyped-def]
        model.model.layers[1].mlp.gate_proj.weight[3, 7] = float("nan")

    folder = hf_folder("llama", name="nan-model", mutate=plant)
    out = tmp_path / "out"
    code, _, err = quantize(capsys, folder, out, "--recipe", "w4a16")
    assert_one_line_error(code, err, "model.layers.1.mlp.gate_proj.weight", "NaN or Inf")
    assert_nothing_written(out)


def test_empty_text_file(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, out, err = run(capsys, "eval", str(model_dir), "--text", str(empty), "--no-progress")
    assert_one_line_error(code, err, "empty")
    assert out == ""


def test_too_short_text_file(capsys, model_dir, tmp_path, lowbit_cache) -> None:  # type: ignore[no-untyped-def]
    short = tmp_path / "short.txt"
    short.write_text("tiny text")
    code, out, err = run(capsys, "eval", str(model_dir), "--text", str(short), "--ref", str(model_dir),
                         "--no-progress")
    assert_one_line_error(code, err, "too short")
    assert out == ""
    assert not (lowbit_cache / "reference").exists() or not any((lowbit_cache / "reference").iterdir())


def test_missing_text_file(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "eval", str(model_dir), "--text", str(tmp_path / "none.txt"), "--no-progress")
    assert_one_line_error(code, err, "no such text file")


def test_inspect_not_a_folder(capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "inspect", str(tmp_path / "nope"))
    assert_one_line_error(code, err, "no such file or folder")


def test_existing_out(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16")
    assert_one_line_error(code, err, "exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    code, stdout, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--overwrite")
    assert code == 0, err
    assert (out / "lowbit.json").is_file() and not (out / "mine.txt").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


# ---------------------------------------------------------------------------------------------
# happy path
# ---------------------------------------------------------------------------------------------
def test_quantize_inspect_eval(capsys, model_dir, text_file, tmp_path, lowbit_cache) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, stdout, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--group-size", "32")
    assert code == 0, err
    assert "quantized 14 linears with w4a16" in stdout and "4.500 bits per weight" in stdout
    assert str(out) in stdout

    code, stdout, err = run(capsys, "inspect", str(out))
    assert code == 0, err
    layers = [f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    lines = stdout.splitlines()
    for name in layers:
        row = next(line for line in lines if line.startswith(name + " "))
        assert "int4 g32 sym" in row and " 4.500 " in row
    assert any(line.startswith("quantized_layers") and line.split()[-1] == "14" for line in lines)
    assert any(line.startswith("quantized_bits_per_weight") and "4.5000" in line for line in lines)

    code, stdout, err = run(capsys, "inspect", str(out), "--json")
    info = json.loads(stdout)
    natural = sorted(layers, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])
    assert info["quantized_layers"] == 14 and [layer["module"] for layer in info["layers"]] == natural
    assert all(layer["bpw"] == 4.5 for layer in info["layers"])
    assert info["source"] == str(model_dir)

    common = ("--text", str(text_file), "--seq-len", "64", "--max-windows", "4", "--json", "--no-progress")
    code, stdout, err = run(capsys, "eval", str(out), "--ref", str(model_dir), *common)
    assert code == 0, err
    r = json.loads(stdout)
    for key in ("ppl", "ref_ppl", "delta_ppl", "kld", "top1", "tokens", "seconds", "bits_per_weight", "model_bytes"):
        assert r[key] is not None, key
    assert r["tokens"] == 4 * 63 and r["windows"] == 4
    assert r["bits_per_weight"] == 4.5
    assert r["kld"] > 0 and 0 < r["top1"] <= 1
    assert r["delta_ppl"] == pytest.approx(r["ppl"] - r["ref_ppl"])
    assert r["model"] == str(out) and r["ref"] == str(model_dir)
    assert any((lowbit_cache / "reference").iterdir())  # the reference logits were cached

    # a lowbit folder's default reference is its source model: same numbers, from the cache
    code, stdout, err = run(capsys, "eval", str(out), *common)
    assert code == 0, err
    r2 = json.loads(stdout)
    assert r2["ref"] == str(model_dir)
    assert (r2["kld"], r2["top1"], r2["ppl"], r2["ref_ppl"]) == (r["kld"], r["top1"], r["ppl"], r["ref_ppl"])

    # the unquantized model against itself, and without a reference
    code, stdout, err = run(capsys, "eval", str(model_dir), "--ref", str(model_dir), *common)
    r3 = json.loads(stdout)
    assert r3["kld"] < 1e-6 and r3["top1"] == 1 and r3["bits_per_weight"] == 32
    assert r3["ppl"] == pytest.approx(r["ref_ppl"], rel=1e-6)
    code, stdout, err = run(capsys, "eval", str(out), "--no-ref", *common)
    r4 = json.loads(stdout)
    assert r4["kld"] is None and r4["ref"] is None and r4["ppl"] == r["ppl"]

    # text output
    code, stdout, err = run(capsys, "eval", str(out), "--no-ref", "--text", str(text_file), "--seq-len", "64",
                            "--max-windows", "2", "--no-progress")
    assert code == 0 and any(line.split()[0] == "ppl" for line in stdout.splitlines())


def test_quantize_a_gguf(capsys, tiny_gguf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, stdout, err = quantize(capsys, tiny_gguf(), out, "--recipe", "int8")
    assert code == 0, err
    assert "quantized 7 linears with int8" in stdout
    from lowbit.models import load_model

    model = load_model(str(out)).model
    assert model.lowbit_recipe.name == "int8"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits).all()


def test_help_mentions_presets(capsys) -> None:  # type: ignore[no-untyped-def]
    for argv in (["--help"], ["quantize", "--help"]):
        with pytest.raises(SystemExit) as ei:
            main(argv)
        assert ei.value.code == 0
        text = capsys.readouterr().out
        for name in ("w4a16", "int8", "w3a16-asym"):
            assert name in text, (argv, name)
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in preset_names())


def test_no_command(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as ei:
        main([])
    assert ei.value.code == 2


def test_quantize_with_gptq_from_a_text_file(capsys, model_dir, text_file, tmp_path, lowbit_cache) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "gptq"
    code, stdout, err = quantize(capsys, model_dir, out, "--recipe", "w4a16-gptq", "--group-size", "32",
                                 "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "64")
    assert code == 0, err
    assert "quantized 14 linears with w4a16-gptq" in stdout
    assert not out.with_name(out.name + ".partial").exists()  # resume state removed once saved
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["algorithm"]["name"] == "gptq"
    assert recipe["calibration"]["samples"] == 4 and recipe["calibration"]["source"] == str(text_file)


def test_calib_options_on_an_rtn_recipe_are_refused(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--calib-samples", "4")
    assert_one_line_error(code, err, "uses no calibration data")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------
# GGUF output, compute device
# ---------------------------------------------------------------------------------------------
def test_quantize_to_a_gguf_file(capsys, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGMLQuantizationType, GGUFReader

    from conftest import make_byte_level_tokenizer

    folder = tmp_path / "model"
    tiny_model("llama", vocab_size=260).save_pretrained(folder)
    make_byte_level_tokenizer().save_pretrained(folder)
    out = tmp_path / "m.gguf"
    code, stdout, err = quantize(capsys, folder, out, "--recipe", "gguf-q8_0")
    assert code == 0, err
    assert "quantized 14 linears with gguf-q8_0" in stdout and str(out) in stdout
    types = {t.name: t.tensor_type for t in GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_up.weight"] == GGMLQuantizationType.Q8_0
    assert [p.name for p in tmp_path.iterdir()] == ["model", "m.gguf"]


def test_gguf_output_with_a_tokenizer_it_cannot_write(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.gguf"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "gguf-q4_0")
    assert_one_line_error(code, err, "pre-tokenizer")
    assert not out.exists() and not (tmp_path / "m.gguf.tmp").exists()


def test_gguf_output_of_an_architecture_llama_cpp_cannot_run_fails_before_quantizing(capsys, hf_folder, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.gguf"
    code, stdout, err = quantize(capsys, hf_folder("opt"), out, "--recipe", "gguf-q4_0")
    assert_one_line_error(code, err, "cannot write architecture 'opt' as GGUF: llama.cpp has no OPT architecture")
    assert "quantized" not in stdout and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")
def test_calib_device_without_a_gpu(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16-gptq", "--calib", "stdlib-calib",
                            "--calib-samples", "2", "--calib-seq-len", "64", "--calib-device", "cuda")
    assert_one_line_error(code, err, "no CUDA GPU")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------
# importance matrix (imatrix)
# ---------------------------------------------------------------------------------------------
def test_save_an_imatrix_then_quantize_with_it(capsys, model_dir, text_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io.imatrix import read_imatrix_file
    from lowbit.io.lowbit_format import read_weights

    imatrix = tmp_path / "m.imatrix.gguf"
    collected, supplied = tmp_path / "collected", tmp_path / "supplied"
    code, stdout, err = quantize(capsys, model_dir, collected, "--recipe", "gguf-q4_0-imatrix", "--calib",
                                 str(text_file), "--calib-samples", "4", "--calib-seq-len", "64",
                                 "--save-imatrix", str(imatrix))
    assert code == 0, err
    assert f"importance matrix of 14 linears -> {imatrix}" in stdout
    raw = read_imatrix_file(imatrix)
    assert len(raw.values) == 14 and set(raw.counts.values()) == {4 * 64} and raw.datasets == [str(text_file)]

    code, stdout, err = quantize(capsys, model_dir, supplied, "--recipe", "gguf-q4_0-imatrix", "--imatrix", str(imatrix))
    assert code == 0, err
    assert "quantized 14 linears with gguf-q4_0-imatrix" in stdout
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    ours, theirs = read_weights(collected)[0], read_weights(supplied)[0]
    assert ours.keys() == theirs.keys()
    # the file keeps sums: means come back within one ulp, which may tip a near-tie (none here)
    assert sum(not torch.equal(ours[k], theirs[k]) for k in ours) <= 2


def test_imatrix_errors(capsys, model_dir, tiny_model, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from lowbit.io.imatrix import ImportanceMatrix, linear_gguf_names, write_imatrix

    other = tiny_model("llama", intermediate_size=96)
    foreign = write_imatrix(tmp_path / "other.gguf", ImportanceMatrix(
        {k: torch.ones(w) for k, (_, w) in linear_gguf_names(other).items()}), other)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + np.arange(40, dtype=np.int32).tobytes())
    mine = tmp_path / "mine.gguf"
    model = tiny_model("llama")
    write_imatrix(mine, ImportanceMatrix({k: torch.ones(w) for k, (_, w) in linear_gguf_names(model).items()}), model)
    imatrix_recipe = ("--recipe", "gguf-q4_0-imatrix")
    cases = [
        ((*imatrix_recipe, "--imatrix", str(corrupt)), "corrupt.gguf: corrupt GGUF file"),
        ((*imatrix_recipe, "--imatrix", str(foreign)), "has 96 columns, but model.layers.0.mlp.down_proj has 128"),
        ((*imatrix_recipe, "--imatrix", str(tmp_path / "nope.gguf")), "no such importance matrix file"),
        (("--recipe", "gguf-q4_0", "--imatrix", str(mine)), "does not use one"),
        ((*imatrix_recipe, "--imatrix", str(mine), "--calib-samples", "4"), "uses no calibration data"),
        (("--recipe", "gguf-q4_0", "--save-imatrix", str(tmp_path / "s.gguf")), "collects no calibration statistics"),
        (("--recipe", "w4a16-awq", "--save-imatrix", str(tmp_path / "s.gguf")), "rescales the inputs"),
        ((*imatrix_recipe, "--save-imatrix", str(tmp_path / "s.dat")), "name it .gguf"),
        ((*imatrix_recipe, "--imatrix", str(mine), "--save-imatrix", str(tmp_path / "s.gguf")),
         "with --imatrix nothing is collected"),
    ]
    for argv, fragment in cases:
        out = tmp_path / "out"
        code, stdout, err = quantize(capsys, model_dir, out, *argv)
        assert_one_line_error(code, err, fragment)
        assert "quantized" not in stdout
        assert_nothing_written(out)
        assert not (tmp_path / "s.gguf").exists()


def test_quantize_help_mentions_imatrix_options(capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert "--imatrix FILE" in text and "--save-imatrix FILE" in text and "llama-imatrix" in text


# ---------------------------------------------------------------------------------------------
# --format, generate, bench-speed
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["gptq", "gptq_v2", "awq", "compressed-tensors"])
def test_quantize_to_each_layout_then_evaluate_it(capsys, model_dir, text_file, tmp_path, layout) -> None:  # type: ignore[no-untyped-def]
    common = ("--text", str(text_file), "--seq-len", "64", "--max-windows", "2", "--json", "--no-progress",
              "--ref", str(model_dir))
    native, other = tmp_path / "native", tmp_path / layout
    for out, extra in ((native, ()), (other, ("--format", layout))):
        code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16-asym", "--group-size", "32", *extra)
        assert code == 0, err
    code, stdout, err = run(capsys, "eval", str(native), *common)
    want = json.loads(stdout)
    code, stdout, err = run(capsys, "eval", str(other), *common)  # the folder's layout is recognized
    assert code == 0, err
    got = json.loads(stdout)
    assert (got["kld"], got["ppl"], got["bits_per_weight"]) == (want["kld"], want["ppl"], want["bits_per_weight"])


def test_a_layout_that_cannot_hold_the_codec_is_refused_before_the_work(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "nf4", "--format", "awq")
    assert_one_line_error(code, err, "--format awq cannot hold", "nf4", "lowbit's own")
    assert_nothing_written(out)
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "fp8-e5m2", "--format", "compressed-tensors")
    assert_one_line_error(code, err, "--format compressed-tensors cannot hold", "E4M3 only")
    assert_nothing_written(out)
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--format", "gguf")
    assert_one_line_error(code, err, "--out FILE.gguf")
    code, _, err = quantize(capsys, model_dir, tmp_path / "m.gguf", "--recipe", "w4a16", "--format", "gptq")
    assert_one_line_error(code, err, "names a GGUF file")


def test_generate_and_bench_speed(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--group-size", "32")
    assert code == 0, err
    code, stdout, err = run(capsys, "generate", str(out), "--prompt", "ab", "--max-new-tokens", "5")
    assert code == 0, err
    int4_kernel = "int4-rows-cpu" if int4_rows() else "int4-packed-cpu"
    assert "bfloat16 activations" in err and int4_kernel in err and "tokens/s" in err
    code, stdout, err = run(capsys, "bench-speed", str(out), "--batch", "1,2", "--prompt-tokens", "8",
                            "--new-tokens", "3", "--repeats", "1", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert r["dtype"] == "bfloat16" and r["linears"] == {int4_kernel: 14, **DENSE_HEAD}
    assert [run_["batch"] for run_ in r["runs"]] == [1, 2]
    assert all(run_["decode_tokens_per_s"] > 0 and run_["prefill_tokens_per_s"] > 0 for run_ in r["runs"])
    code, stdout, err = run(capsys, "bench-speed", str(out), "--no-kernels", "--batch", "1", "--prompt-tokens", "4",
                            "--new-tokens", "2", "--repeats", "1", "--json")
    r = json.loads(stdout)
    assert r["dtype"] == "float32" and r["linears"] == {"dequantized once": 14}
    code, _, err = run(capsys, "bench-speed", str(out), "--batch", "0")
    assert_one_line_error(code, err, "--batch")
    code, _, err = run(capsys, "bench-speed", str(out), "--w8a8", "--no-kernels")
    assert_one_line_error(code, err, "--w8a8", "--no-kernels")


def test_bench_speed_of_a_truncated_folder_is_one_line(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--group-size", "32")
    assert code == 0, err
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = run(capsys, "bench-speed", str(out), "--batch", "1")
    assert_one_line_error(code, err, "corrupt safetensors file")


def test_bench_speed_w8a8(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "int8")
    assert code == 0, err
    code, stdout, err = run(capsys, "bench-speed", str(out), "--w8a8", "--batch", "1", "--prompt-tokens", "4",
                            "--new-tokens", "2", "--repeats", "1", "--json")
    assert code == 0, err
    assert json.loads(stdout)["linears"] == {"w8a8-int8-cpu": 14, **DENSE_HEAD}


def test_bench_json_stays_json_while_gptq_reports_its_blocks(capsys, model_dir, text_file) -> None:  # type: ignore[no-untyped-def]
    # with progress on, GPTQ reports each block's output error beside the bar: on stderr, since
    # stdout carries the table or the JSON
    code, stdout, err = run(capsys, "bench", str(model_dir), "--recipes", "w4a16-gptq", "--text", str(text_file),
                            "--seq-len", "64", "--max-windows", "2", "--calib-samples", "4", "--calib-seq-len", "64",
                            "--json")
    assert code == 0, err
    rows = json.loads(stdout)
    assert [r["recipe"] for r in rows] == ["unquantized", "w4a16-gptq"]
    assert "relative output error" in err


# ---------------------------------------------------------------------------------------------
# activation quantization presets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "layout"), [
    ("w8a8", "compressed-tensors"), ("w8a8-smoothquant", "compressed-tensors"), ("w8a8-static", "compressed-tensors"),
    ("fp8-dynamic", "compressed-tensors"), ("w4a8", "native"), ("llm-int8", "native"),
    ("w4a16-g64-awq-gptq", "compressed-tensors"),
])
def test_activation_presets_quantize_save_and_evaluate(capsys, model_dir, text_file, tmp_path, lowbit_cache,  # type: ignore[no-untyped-def]
                                                       preset: str, layout: str) -> None:
    from lowbit.recipes import get_preset

    out = tmp_path / preset
    calib = ("--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "64") \
        if get_preset(preset).needs_calibration else ()
    extra = ("--group-size", "32") if "g64" in preset else ()
    code, stdout, err = quantize(capsys, model_dir, out, "--recipe", preset, "--format", layout, *calib, *extra)
    assert code == 0, err
    assert f"quantized 14 linears with {preset}" in stdout
    code, stdout, err = run(capsys, "eval", str(out), "--ref", str(model_dir), "--text", str(text_file), "--seq-len", "32",
                            "--max-windows", "2", "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["kld"] > 0  # the inputs (or the weights) really are quantized
    if preset in ("w8a8", "w8a8-static", "llm-int8"):  # as generate runs them: the int8 input kernels
        code, stdout, err = run(capsys, "eval", str(out), "--ref", str(model_dir), "--text", str(text_file), "--seq-len",
                                "32", "--max-windows", "2", "--kernels", "--json")
        assert code == 0, err
        fast = json.loads(stdout.strip().splitlines()[-1])
        assert fast["kld"] == pytest.approx(result["kld"], rel=0.5, abs=1e-3)  # bf16 around the int8 products


def test_activations_on_a_weight_only_layout_are_refused_before_any_work(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w8a8", "--format", "gptq")
    assert_one_line_error(code, err, "--format gptq cannot hold the input quantization", "weights only")
    assert_nothing_written(out)


def test_kv_cache_on_eval_generate_and_bench_speed(capsys, model_dir, text_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the tiny model's heads are 16 values: the presets' groups of 32 do not fit them
    spec = tmp_path / "kv.yaml"
    spec.write_text("keys: {bits: 2, axis: channel, group_size: 8}\nvalues: {bits: 2, axis: token, group_size: 8}\n"
                    "residual: 8\n")
    base = ("--text", str(text_file), "--seq-len", "48", "--max-windows", "2", "--json", "--no-ref")
    code, stdout, err = run(capsys, "eval", str(model_dir), *base)
    assert code == 0, err
    plain = json.loads(stdout.strip().splitlines()[-1])
    code, stdout, err = run(capsys, "eval", str(model_dir), *base, "--kv-cache", str(spec))
    assert code == 0, err
    quantized = json.loads(stdout.strip().splitlines()[-1])
    assert quantized["kv_cache"].startswith("keys int2 per-channel g8") and plain["kv_cache"] is None
    assert quantized["ppl"] != plain["ppl"]
    code, stdout, err = run(capsys, "generate", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "4",
                            "--kv-cache", str(spec))
    assert code == 0, err
    assert "KV cache keys int2 per-channel g8" in err
    code, stdout, err = run(capsys, "bench-speed", str(model_dir), "--batch", "1", "--prompt-tokens", "64",
                            "--new-tokens", "4", "--repeats", "1", "--kv-cache", str(spec), "--json")
    assert code == 0, err
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["runs"][0]["kv_bytes_per_token"] > 0
    assert result["runs"][0]["prefill_chunk"] is None  # 64 tokens: one chunk of the default 512
    # a prompt longer than --prefill-chunk goes in chunks, through the quantized cache as well
    prompt = "Hello there, a prompt of more than sixteen characters"
    for chunk in ("16", "0"):
        code, stdout, err = run(capsys, "generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", "3",
                                "--kv-cache", str(spec), "--prefill-chunk", chunk)
        assert code == 0, err
    code, stdout, err = run(capsys, "bench-speed", str(model_dir), "--batch", "1", "--prompt-tokens", "40",
                            "--new-tokens", "2", "--repeats", "1", "--kv-cache", str(spec), "--prefill-chunk", "16",
                            "--json")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["runs"][0]["prefill_chunk"] == 16
    code, _, err = run(capsys, "bench-speed", str(model_dir), "--prefill-chunk", "-1")
    assert code == 2 and "--prefill-chunk" in err
    code, _, err = run(capsys, "eval", str(model_dir), *base, "--kv-cache", "int3")
    assert_one_line_error(code, err, "unknown KV cache 'int3'")
    code, _, err = run(capsys, "eval", str(model_dir), *base, "--kv-cache", "int4")
    assert_one_line_error(code, err, "kv_cache.values: per-token groups of 32 do not divide a head of 16")
    code, _, err = run(capsys, "eval", str(model_dir), *base, "--kv-cache", "fp8-static")
    assert_one_line_error(code, err, "fp8-static takes static scales calibrated for the model, and it has none")


def test_quantize_calibrates_a_static_fp8_cache(capsys, model_dir, text_file, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q"
    code, stdout, err = quantize(capsys, model_dir, out, "--recipe", "w8a16", "--kv-cache", "fp8-static",
                                 "--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "32")
    assert code == 0, err
    assert "with w8a16+kv-fp8-static" in stdout
    assert json.loads((out / "recipe.json").read_text())["kv_cache"]["keys"]["static"] is True
    base = ("--text", str(text_file), "--seq-len", "48", "--max-windows", "2", "--json", "--no-ref")
    code, stdout, err = run(capsys, "eval", str(out), *base)  # the recipe's cache by default
    assert code == 0, err
    with_cache = json.loads(stdout.strip().splitlines()[-1])
    assert with_cache["kv_cache"] == "fp8-static: keys fp8_e4m3 static per-tensor scale, values fp8_e4m3 static per-tensor scale"
    code, stdout, err = run(capsys, "eval", str(out), *base, "--kv-cache", "none")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["ppl"] != with_cache["ppl"]
