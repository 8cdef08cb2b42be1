"""Hostile input to the `lowbit` command, as a new user tries it: each is one clear line (or a
one-line warning where the input is legal but suspicious), a non-zero exit, nothing left on
disk, and no work done before the refusal."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from test_cli import assert_nothing_written, assert_one_line_error, quantize, run, text_file  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("lowbit_cache")


@pytest.fixture
def model_dir(hf_folder) -> Path:  # type: ignore[no-untyped-def]
    return hf_folder("llama")


@pytest.fixture
def no_work(monkeypatch):  # type: ignore[no-untyped-def]
    """Fails the test if quantization starts."""
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("quantization ran before the refusal")

    monkeypatch.setattr("lowbit.pipeline.quantize_model", refuse)


# 1. a recipe file that is not UTF-8
def test_recipe_that_is_not_text(capsys, model_dir, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\x89PNG\x00")
    out = tmp_path / "o"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", str(recipe))
    assert_one_line_error(code, err, "r.yaml is not UTF-8 text (byte 0 is 0x89)")
    assert_nothing_written(out)


# 2. an empty prompt
def test_generate_an_empty_prompt(capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("lowbit.cli._load_for_running", lambda args: pytest.fail("the model was loaded"))
    code, _, err = run(capsys, "generate", "smollm2-135m", "--prompt", "")
    assert_one_line_error(code, err, "--prompt is empty")


# 3. outputs that cannot be written: checked before the model is loaded, or before the work
def test_out_under_a_file(capsys, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    afile = tmp_path / "passwd"
    afile.write_text("x")
    code, _, err = quantize(capsys, tmp_path / "no-such-model", afile / "x", "--recipe", "int8")
    assert_one_line_error(code, err, f"cannot write {afile}/x: {afile} is a file, not a folder")
    code, _, err = quantize(capsys, tmp_path / "no-such-model", afile / "x.gguf", "--recipe", "gguf-q8_0")
    assert_one_line_error(code, err, "is a file, not a folder")


def test_out_in_a_folder_that_takes_no_files(capsys, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    else:  # root writes anywhere permissions allow; sysfs takes no new files, even from root
        folder = Path("/sys")
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=folder):
                pytest.skip("this machine's /sys takes new files")
        except OSError:
            pass
    code, _, err = quantize(capsys, tmp_path / "no-such-model", folder / "out", "--recipe", "int8")
    assert_one_line_error(code, err, f"cannot write {folder}/out: {folder} does not take new files")


def test_out_on_a_full_disk_is_refused_before_the_work(capsys, model_dir, tmp_path, monkeypatch,
                                                      no_work) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from lowbit.io import folder

    from conftest import build_tiny_model, make_byte_level_tokenizer

    bpe_model = tmp_path / "bpe-model"  # a tokenizer the GGUF writer can write
    build_tiny_model("llama", vocab_size=260).save_pretrained(bpe_model)
    make_byte_level_tokenizer().save_pretrained(bpe_model)
    monkeypatch.setattr(folder.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    for out, recipe, model in ((tmp_path / "o", "int8", model_dir), (tmp_path / "o.gguf", "gguf-q8_0", bpe_model),
                               (tmp_path / "g", "w4a16-gptq", model_dir)):
        code, _, err = quantize(capsys, model, out, "--recipe", recipe)
        assert_one_line_error(code, err, f"cannot write {out}: it needs about", "and", "has 5 kB free")
        assert_nothing_written(out)


@pytest.mark.parametrize("out_name", ["o", "o.gguf"])
def test_disk_full_while_writing(capsys, tiny_model, tmp_path, monkeypatch, recwarn, out_name: str) -> None:  # type: ignore[no-untyped-def]
    import gc

    from conftest import make_byte_level_tokenizer

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=260).save_pretrained(model_dir)
    make_byte_level_tokenizer().save_pretrained(model_dir)

    def full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lowbit.io.lowbit_format.save_file", full)
    monkeypatch.setattr("gguf.GGUFWriter.write_tensors_to_file", full)
    out = tmp_path / "nested" / out_name
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "gguf-q8_0" if out_name.endswith(".gguf") else "int8")
    assert_one_line_error(code, err, f"cannot write {out}: No space left on device (nothing was written)")
    assert not (tmp_path / "nested").exists()  # not even the folder it made for the output
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, ResourceWarning)]  # the GGUF writer's file is closed


# 4. and 5. lengths past the model's context (the tiny model's: 1024 tokens)
def test_bench_speed_past_the_context(capsys, model_dir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr("lowbit.evaluation.speed.measure_speed", lambda *a, **k: pytest.fail("it measured"))
    code, _, err = run(capsys, "bench-speed", str(model_dir), "--prompt-tokens", "100000")
    assert_one_line_error(code, err, "--prompt-tokens 100000 and --new-tokens 32: sequences of 100032 tokens, but the "
                          "model's context is 1024 tokens")


def test_eval_past_the_context(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "eval", str(model_dir), "--no-ref", "--seq-len", "100000", "--no-progress")
    assert_one_line_error(code, err, "--seq-len 100000: sequences of 100000 tokens, but the model's context is 1024")
    code, _, err = run(capsys, "bench", str(model_dir), "--recipes", "int8", "--seq-len", "4096", "--no-progress")
    assert_one_line_error(code, err, "--seq-len 4096")


def test_calibration_past_the_context(capsys, model_dir, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "g"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16-gptq", "--calib-seq-len", "2048")
    assert_one_line_error(code, err, "--calib-seq-len 2048: sequences of 2048 tokens, but the model's context is 1024")
    assert_nothing_written(out)


# 6. a YAML syntax error
def test_yaml_syntax_error_is_one_line(capsys, model_dir, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("codec: {name: int\nbits: 4\n")
    code, _, err = quantize(capsys, model_dir, tmp_path / "o", "--recipe", str(recipe))
    assert_one_line_error(code, err, "bad.yaml is not valid YAML: line 2, column 5: expected ',' or '}', but got ':'")


# 7. a recipe that quantizes nothing; a rule that matches nothing
def test_a_recipe_that_quantizes_nothing(capsys, model_dir, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "none.yaml"
    recipe.write_text('codec: {name: int, bits: 4}\nignore: ["*"]\n')
    out = tmp_path / "o"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", str(recipe))
    assert_one_line_error(code, err, "quantizes none of the model's 14 linears", "nothing to do")
    assert_nothing_written(out)


def test_a_rule_that_matches_nothing_warns_in_one_line(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    recipe = tmp_path / "typo.yaml"
    recipe.write_text('codec: {name: int, bits: 4, group_size: 32}\n'
                      'rules: [{match: "*.mlp.donw_proj", codec: {name: int, bits: 8}}]\n')
    code, stdout, err = quantize(capsys, model_dir, tmp_path / "o", "--recipe", str(recipe))
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["lowbit: warning: int4 g32 sym rtn: rules[0] '*.mlp.donw_proj' matches no linear of the model "
                     "(they are named like model.layers.0.self_attn.q_proj)"]
    assert "quantized 14 linears" in stdout


# 8. an empty list of recipes or texts
@pytest.mark.parametrize("argv, match", [(["--recipes", ""], "--recipes '' names no presets or recipe files"),
                                         (["--recipes", " , "], "names no presets"),
                                         (["--recipes", "int8", "--text", ""], "--text '' names no texts")])
def test_bench_with_nothing_to_compare(capsys, model_dir, argv, match: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "bench", str(model_dir), *argv, "--no-progress")
    assert_one_line_error(code, err, match)


# 9. a temperature that is not a number of at least 0
@pytest.mark.parametrize("value", ["nan", "-1", "inf", "hot"])
def test_generate_temperature(capsys, value: str) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(capsys, "generate", "smollm2-135m", "--prompt", "hi", "--temperature", value)
    assert code == 2
    assert "argument --temperature:" in err and ("finite number >= 0" in err or "expected a number" in err)


# 10. inspect a GGUF file, and other layouts' folders
def test_inspect_a_gguf_file(capsys, tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    import json

    from lowbit.io.gguf_layout import read_gguf_layout

    path = tiny_gguf()
    code, stdout, err = run(capsys, "inspect", str(path), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    lay = read_gguf_layout(path)
    assert info["layout"] == "gguf" and info["architecture"] == "llama" and info["tensors"] == len(lay.tensors) == 12
    row = next(layer for layer in info["layers"] if layer["module"] == "blk.0.ffn_down.weight")
    assert row == {"module": "blk.0.ffn_down.weight", "codec": "F32", "shape": [32, 64], "bpw": 32.0, "bytes": 8192}
    code, stdout, err = run(capsys, "inspect", str(path))
    assert code == 0 and any(line.startswith("blk.0.attn_q.weight ") and " F32 " in line for line in stdout.splitlines())
    notes = path.with_suffix(".txt")
    notes.write_text("x")
    code, _, err = run(capsys, "inspect", str(notes))
    assert_one_line_error(code, err, "not a .gguf file")


def test_inspect_a_gptq_folder(capsys, model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    out = tmp_path / "g"
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16", "--group-size", "32", "--format", "gptq")
    assert code == 0, err
    code, stdout, err = run(capsys, "inspect", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["layout"] == "gptq" and info["quantized_layers"] == 14
    assert all(layer["codec"] == "int4 g32 sym" and layer["bpw"] == 4.5 for layer in info["layers"])
    code, _, err = run(capsys, "inspect", str(model_dir))
    assert_one_line_error(code, err, "not a quantized model folder")


# 11. resume: the whole run counted; a partial run left by another command
def test_a_resumed_run_counts_every_linear(capsys, model_dir, text_file, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import lowbit.pipeline.quantize as pq

    real, calls = pq.quantize_block_sequential, {"n": 0}

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "g"
    calib = ("--calib", str(text_file), "--calib-samples", "4", "--calib-seq-len", "64")
    monkeypatch.setattr(pq, "quantize_block_sequential", interrupted)
    code, _, err = quantize(capsys, model_dir, out, "--recipe", "w4a16-gptq", "--group-size", "32", *calib)
    assert code == 130 and out.with_name("g.partial").is_dir()
    monkeypatch.setattr(pq, "quantize_block_sequential", real)
    # another command for the same output, without calibration: the partial run is named, and kept
    other = tmp_path / "other"
    (tmp_path / "other.partial").mkdir()
    code, stdout, err = quantize(capsys, model_dir, other, "--recipe", "int8")
    assert code == 0 and (tmp_path / "other.partial").is_dir()
    assert [line for line in err.splitlines() if line.strip()] == [
        f"lowbit: warning: {tmp_path}/other.partial holds an interrupted calibrated run that this one (int8, no "
        "calibration) does not resume; it is left as it is: finish that run with its own command, or delete it"]
    code, stdout, err = quantize(capsys, model_dir, out, "--recipe", "w4a16-gptq", "--group-size", "32", *calib)
    assert code == 0, err
    assert "quantized 14 linears with w4a16-gptq" in stdout and "(1 blocks resumed from g.partial)" in stdout
    assert not out.with_name("g.partial").exists()


# 12. a damaged GGUF: the tensor and the byte named, not numpy's words
def test_a_damaged_gguf_names_the_tensor(capsys, tiny_gguf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tiny_gguf(truncate_to=-100)
    code, _, err = quantize(capsys, path, tmp_path / "o", "--recipe", "int8")
    line = assert_one_line_error(code, err, "corrupt GGUF file: tensor blk.0.ffn_down.weight at byte",
                                 "run past the end of the file")
    assert "reshape" not in line and "axis" not in line


# issue 15's bad input: what a GGUF file cannot hold is refused before the work
def test_a_gguf_that_llama_cpp_would_compute_otherwise_is_refused_first(capsys, hf_folder, tmp_path, no_work) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "m.gguf"
    code, _, err = quantize(capsys, hf_folder("llama"), out, "--recipe", "gguf-q8_0")  # a character tokenizer
    assert_one_line_error(code, err, "the GGUF writer does not know this pre-tokenizer")
    gemma2 = hf_folder("gemma2", name="gemma2")  # query_pre_attn_scalar 256, head_dim 16
    code, _, err = quantize(capsys, gemma2, out, "--recipe", "gguf-q8_0")
    assert_one_line_error(code, err, "Gemma 2 with query_pre_attn_scalar 256 and head_dim 16: llama.cpp scales")
    assert_nothing_written(out)
