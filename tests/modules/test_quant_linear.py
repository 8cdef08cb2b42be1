"""QuantLinear: the reference forward, dtype casts that must not touch packed data, the cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.codecs import IntCodec
from lowbit.modules import QuantLinear, cache_dequantized_weights
from lowbit.pipeline import quantize_model
from lowbit.recipes import resolve_recipe


def _layer(bias: bool = True, symmetric: bool = False) -> tuple[QuantLinear, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 80, generator=g)
    b = torch.randn(48, generator=g) if bias else None
    qt = IntCodec(bits=4, symmetric=symmetric, group_size=32).quantize(w)
    return QuantLinear(qt, b), qt.dequantize(), b


@pytest.mark.parametrize("bias", [True, False])
def test_forward_is_linear_with_dequantized_weight(bias: bool) -> None:
    layer, w, b = _layer(bias)
    x = torch.randn(3, 5, 80, generator=torch.Generator().manual_seed(1))
    assert torch.equal(layer(x), F.linear(x, w, b))
    assert (layer.out_features, layer.in_features) == (48, 80)
    assert torch.equal(layer.weight, w)
    assert (layer.bias is None) == (not bias)


def test_forward_in_half_precision() -> None:
    layer, w, b = _layer()
    for dt in (torch.bfloat16, torch.float16):
        x = torch.randn(4, 80, generator=torch.Generator().manual_seed(2)).to(dt)
        y = layer(x)
        assert y.dtype == dt
        assert torch.equal(y, F.linear(x, w.to(dt), b.to(dt)))


def test_buffers_and_state_dict() -> None:
    layer, _, _ = _layer()
    sd = layer.state_dict()
    assert set(sd) == {"qweight_codes", "qweight_scale", "qweight_zero", "bias"}
    assert sd["qweight_codes"].dtype == torch.uint8 and sd["qweight_codes"].numel() == 48 * 80 // 2
    assert layer.parts == ["codes", "scale", "zero"]
    # 48 x 80 at 4 bits = 1920 bytes; 3 groups per row (the last one short) x fp16 scale and zero
    assert layer.qweight.nbytes == 1920 + 48 * 3 * 2 * 2
    assert "bpw=5.2000" in repr(layer)
    assert not layer.bias.requires_grad


def test_model_to_bfloat16_keeps_packed_data(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    quantize_model(model, resolve_recipe("w4a16-asym", group_size=32), progress=False)
    before = {n: b.clone() for n, b in model.named_buffers() if "qweight_" in n}
    assert before and {b.dtype for n, b in before.items() if n.endswith("scale")} == {torch.float16}
    model.to(torch.bfloat16)
    after = dict(model.named_buffers())
    for n, b in before.items():
        assert after[n].dtype == b.dtype, n
        assert torch.equal(after[n], b), n
    # while everything dense did follow the cast
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    # and the model still runs, in bf16
    ids = torch.randint(2, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    model.to(torch.float32)
    for n, b in before.items():
        assert torch.equal(dict(model.named_buffers())[n], b) and dict(model.named_buffers())[n].dtype == b.dtype


def test_half_and_double_casts_keep_packed_data() -> None:
    layer, _, _ = _layer()
    scale = layer.qweight_scale.clone()
    layer.half()
    assert layer.qweight_scale.dtype == torch.float16 and torch.equal(layer.qweight_scale, scale)
    assert layer.bias.dtype == torch.float16
    layer.double()
    assert layer.qweight_scale.dtype == torch.float16 and layer.qweight_codes.dtype == torch.uint8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_dequantized_weights_gives_identical_outputs(tiny_model, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("gpt2")
    quantize_model(model, resolve_recipe("w4a16-g64"), progress=False)
    model.to(dtype)
    ids = torch.randint(2, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with cache_dequantized_weights(model, dtype):
            assert all(m._dense is not None and m._dense.dtype == dtype for m in layers)
            cached = model(input_ids=ids).logits
        assert all(m._dense is None for m in layers)  # released on exit
    assert torch.equal(plain, cached)


def test_cache_is_released_on_error(tiny_model) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    quantize_model(model, resolve_recipe("w4a16-g64"), progress=False)
    with pytest.raises(RuntimeError):
        with cache_dequantized_weights(model, torch.float32):
            raise RuntimeError("boom")
    assert all(m._dense is None for m in model.modules() if isinstance(m, QuantLinear))


def test_deepcopy_is_independent() -> None:
    layer, w, b = _layer()
    other = copy.deepcopy(layer)
    other.qweight_codes.zero_()
    assert torch.equal(layer.weight, w)
    assert not torch.equal(other.weight, w)
    assert isinstance(other, nn.Module)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_layer_moved_to_cuda_computes_there_and_comes_back_unchanged() -> None:
    from lowbit.modules import enable_fast_kernels
    from lowbit.modules.native import int4_rows

    layer, w, b = _layer(symmetric=True)
    holder = nn.Sequential(layer)
    assert enable_fast_kernels(holder) == {"int4-rows-cpu" if int4_rows() else "int4-packed-cpu": 1}
    codes = layer.qweight.data["codes"].clone()
    holder.cuda()  # the kernel is a CPU operator: it is dropped and the codes restored
    assert layer.kernel is None and layer.qweight_codes.device.type == "cuda"
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    y = layer(x.cuda())
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    holder.cpu()
    assert torch.equal(layer.qweight_codes, codes)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "untied-head"])
def test_an_int8_table_looks_rows_up_in_the_heads_kernel(tiny_model, tied: bool) -> None:  # type: ignore[no-untyped-def]
    """With kernels, an int8-per-row token embedding keeps no codes of its own: its rows are decoded from the
    int8 kernel's (the tied head's, else its own), only those looked up, as the dense table holds them."""
    from lowbit.evaluation.speed import held_bytes
    from lowbit.modules import QuantEmbedding, enable_fast_kernels, keep_dequantized_weights
    from lowbit.pipeline import quantize_model
    from lowbit.recipes import resolve_recipe

    model = tiny_model("llama", tie_word_embeddings=tied)
    model.tie_weights()
    quantize_model(model, resolve_recipe("int8-e8"), progress=False)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding)
    table = emb.qweight.dequantize(torch.float64)
    ids = torch.tensor([[0, 5, 5, 199], [3, 1, 2, 7]])
    before = held_bytes(model)
    counts = enable_fast_kernels(model)
    keep_dequantized_weights(model, torch.bfloat16)
    assert emb.kernel is not None and (emb.kernel is head.kernel) == tied
    assert counts == {"int8-cpu": 15, f"embedding rows (int8{', the tied head' + chr(39) + 's codes' if tied else ''})": 1}
    assert emb._dense is None and emb.qweight_codes.numel() == 0  # the kernel holds the codes
    rows = emb(ids)
    assert rows.dtype == torch.bfloat16 and rows.shape == (2, 4, table.shape[1])
    # float32 decoding, rounded once to bf16
    assert torch.equal(rows, table[ids].to(torch.float32).to(torch.bfloat16)) or \
        ((rows.double() - table[ids]).abs() <= 2 ** -8 * table[ids].abs() + 1e-7).all()
    assert torch.equal(emb.qweight.dequantize(), table.float())  # the stored codes, unchanged
    if tied:  # one int8 copy of the table (the kernel's, counted once): a second would add its numel
        assert held_bytes(model) < before + table.numel()
