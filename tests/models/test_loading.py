"""load_model: HF folders, GGUF files, hub ids, and every way they can be broken."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from lowbit import LowbitError
from lowbit.models import cache_dir, load_model
from lowbit.io.gguf_reader import check_gguf


def test_missing_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for spec in [str(tmp_path / "nope"), "./nope", "~/definitely/not/here", "nope.gguf", "a/b/c"]:
        with pytest.raises(LowbitError, match="no such file"):
            load_model(spec)


def test_hf_folder_loads(hf_folder, tiny_model) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder("qwen2")
    loaded = load_model(str(folder))
    assert loaded.source == str(folder) and loaded.path == folder
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert not loaded.model.training
    assert loaded.tokenizer("Hi!", add_special_tokens=False)["input_ids"] == [42, 75, 3]
    ids = torch.randint(2, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, tiny_model("qwen2")(input_ids=ids).logits)
    assert next(loaded.model.parameters()).dtype == torch.float32
    half = load_model(str(folder), dtype=torch.bfloat16)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_truncated_safetensors(hf_folder) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder()
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(LowbitError, match="cannot load model") as ei:
        load_model(str(folder))
    assert "\n" not in str(ei.value)


def test_garbage_safetensors(hf_folder) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder()
    (folder / "model.safetensors").write_bytes(os.urandom(2000))
    with pytest.raises(LowbitError, match="cannot load model"):
        load_model(str(folder))


def test_folder_without_config(hf_folder) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder()
    (folder / "config.json").unlink()
    with pytest.raises(LowbitError, match="no config.json"):
        load_model(str(folder))


def test_folder_without_weights(hf_folder) -> None:  # type: ignore[no-untyped-def]
    folder = hf_folder()
    (folder / "model.safetensors").unlink()
    with pytest.raises(LowbitError, match="cannot load model"):
        load_model(str(folder))


def test_plain_file_is_not_a_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\0" * 10)
    with pytest.raises(LowbitError, match="not a model folder or a .gguf file"):
        load_model(str(p))


def test_valid_gguf_loads(tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    path = tiny_gguf()
    check_gguf(path)
    loaded = load_model(str(path))
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert getattr(model.config, "quantization_config", None) is None  # dense now: saves as HF
    import gguf

    reader = gguf.GGUFReader(path)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert np.array_equal(np.array(emb.data), model.model.embed_tokens.weight.detach().numpy())
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert np.array_equal(np.array(down.data), model.model.layers[0].mlp.down_proj.weight.detach().numpy())
    assert loaded.tokenizer("!#", add_special_tokens=False)["input_ids"] == [3, 5]


@pytest.mark.parametrize("cut", [20, 200, -100, -1])
def test_truncated_gguf(tiny_gguf, cut: int) -> None:  # type: ignore[no-untyped-def]
    path = tiny_gguf(truncate_to=cut)
    with pytest.raises(LowbitError, match="GGUF") as ei:
        load_model(str(path))
    assert "corrupt GGUF file" in str(ei.value) and "truncated" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_random_bytes_gguf(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = tmp_path / "random.gguf"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LowbitError, match="not a GGUF file"):
        load_model(str(p))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(LowbitError, match="GGUF"):
        load_model(str(empty))


def test_hub_id_offline(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable when imported, which happened long before this test
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.monotonic()
    with pytest.raises(LowbitError, match="hub") as ei:
        load_model("lowbit-test-org/no-such-model")
    assert time.monotonic() - t0 < 20
    assert "smollm2-135m" in str(ei.value)  # says what works offline
    assert "\n" not in str(ei.value)


def test_cache_dir(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LOWBIT_CACHE")
    assert cache_dir().name == "lowbit"


def test_hub_id_unresolvable_host_fails_fast(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.lowbit-test.invalid")  # .invalid never resolves
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t0 = time.monotonic()
    with pytest.raises(LowbitError, match="unreachable"):
        load_model("lowbit-test-org/no-such-model")
    assert time.monotonic() - t0 < 20


def test_gguf_kept_quantized_f32_equals_dequantized(tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    path = tiny_gguf()
    packed, dense = load_model(str(path), keep_quantized=True).model, load_model(str(path)).model
    assert not any(type(m).__name__ == "QuantLinear" for m in packed.modules())  # F32: nothing to keep packed
    assert not packed.config.tie_word_embeddings  # the file has its own output.weight
    want = dict(dense.named_parameters())
    assert sorted(n for n, _ in packed.named_parameters()) == sorted(want)
    for name, p in packed.named_parameters():
        assert torch.equal(p, want[name]), name


def test_gguf_architecture_the_reader_does_not_know_is_dequantized(tiny_gguf, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from lowbit.io import gguf_reader

    monkeypatch.setattr(gguf_reader, "READABLE_ARCHITECTURES", {})
    with pytest.warns(UserWarning, match=r"does not know architecture 'llama' \(known: none\); loading it dequantized"):
        loaded = load_model(str(tiny_gguf()), keep_quantized=True)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"


def test_truncated_gguf_kept_quantized(tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LowbitError, match="corrupt GGUF file: tensor .* run past the end of the file"):
        load_model(str(tiny_gguf(truncate_to=-100)), keep_quantized=True)


def test_gguf_tensor_of_another_shape_is_named_on_the_dequantized_path(tiny_gguf) -> None:  # type: ignore[no-untyped-def]
    """transformers' own loader fails in numpy's words ("cannot reshape array of size 992 into
    shape (2,7,2,32)"); lowbit names the tensor."""
    import struct

    from lowbit.io.gguf_layout import read_gguf_layout

    path = tiny_gguf()
    t = next(t for t in read_gguf_layout(path).tensors if t.name == "blk.0.attn_k.weight")
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, t.at + 8 + len(t.name) + 4 + 8, 31)  # ne[1]: 16 rows -> 31 (still inside the file)
    path.write_bytes(bytes(data))
    for keep in (False, True):
        with pytest.raises(LowbitError, match=r"blk.0.attn_k.weight has 992 values, the model expects shape \(16, 32\)"):
            load_model(str(path), keep_quantized=keep)
