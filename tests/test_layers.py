"""The wrappers themselves: dtype behaviour, gradients through quantized bases, identity at init, type dispatch."""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, load, output, rel_err, sample_ids, upcast

import ia3convert as ia
from ia3convert.errors import TargetError


def first_layer(model, suffix):
    return next(m for name, m in model.named_modules() if name.endswith(suffix))


@pytest.mark.parametrize("storage, wrapper", [("int8", ia.Linear8bitLt), ("nf4", ia.Linear4bit),
                                              ("fp4", ia.Linear4bit), ("nf4-dq", ia.Linear4bit)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("suffix", ["layers.0.mlp.down_proj", "layers.0.self_attn.v_proj"])
def test_output_dtype_is_input_dtype(storage, wrapper, dtype, suffix):
    model = load("llama", storage)
    ia.load_adapter(model, ADAPTERS / "llama")
    layer = first_layer(model, suffix)
    assert type(layer) is wrapper
    x = torch.randn(3, layer.in_features).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("suffix", ["layers.0.mlp.down_proj", "layers.0.self_attn.v_proj"])
def test_half_float_layer_keeps_its_dtype(suffix):
    model = load("llama", "fp16")
    ia.load_adapter(model, ADAPTERS / "llama")
    layer = first_layer(model, suffix)
    y = layer(torch.randn(3, layer.in_features).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


@pytest.mark.parametrize("storage", ["int8", "nf4"])
def test_peft_leaks_float32_where_we_do_not(storage):
    """The PEFT bug we fix: its bnb IA3 layers return float32 for half-precision input."""
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(load("llama", storage), ADAPTERS / "llama")
    layer = first_layer(theirs, "layers.0.self_attn.v_proj")
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("storage", ["int8", "nf4", "nf4-dq"])
def test_whole_bf16_llama_runs(storage):
    """A bf16 model with IA3 on int8/4-bit layers runs end to end (PEFT crashes at lm_head here)."""
    peft = pytest.importorskip("peft")
    ids = sample_ids()
    model = upcast(load("llama", storage), torch.bfloat16)
    ia.load_adapter(model, ADAPTERS / "llama")
    logits = output(model, ids)
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    reference = upcast(load("llama", storage))
    ia.load_adapter(reference, ADAPTERS / "llama")
    assert rel_err(logits.float(), output(reference, ids)) < 0.1  # bf16 rounding only

    theirs = peft.PeftModel.from_pretrained(upcast(load("llama", storage), torch.bfloat16), ADAPTERS / "llama")
    with pytest.raises(RuntimeError, match="dtype"):
        output(theirs, ids)


def _dequantized_weight(base):
    """The float weight a bitsandbytes layer multiplies by, from bitsandbytes' own functions."""
    import bitsandbytes.functional as F

    if type(base).__name__ == "Linear4bit":
        return F.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    # After a first forward, bitsandbytes moves the row statistics from the parameter to the layer state.
    scb = base.weight.SCB if base.weight.SCB is not None else base.state.SCB
    return F.int8_vectorwise_dequant(base.weight.data, scb).float()


@pytest.mark.parametrize("storage", ["int8", "nf4", "fp4", "nf4-dq"])
@pytest.mark.parametrize("suffix", ["layers.0.mlp.down_proj", "layers.0.self_attn.k_proj"])
def test_gradients_reach_the_vector_through_a_quantized_base(storage, suffix):
    model = load("llama", storage)
    ia.load_adapter(model, ADAPTERS / "llama", is_trainable=True)
    layer = first_layer(model, suffix)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, layer.in_features, generator=generator)
    g = torch.randn(5, layer.out_features, generator=generator)
    (layer(x) * g).sum().backward()
    vector = layer.ia3_l["default"]
    assert vector.grad is not None
    assert all(p.grad is None for p in layer.get_base_layer().parameters())

    # d/dl of sum(g * base(x * l)) = sum_t x_t * (g_t @ W); of sum(g * base(x) * l) = sum_t base(x)_t * g_t.
    weight = _dequantized_weight(layer.get_base_layer())
    if layer.is_feedforward:
        expected = (x * (g @ weight)).sum(0, keepdim=True)
    else:
        with torch.no_grad(), ia.adapters_disabled(model):
            expected = (layer(x) * g).sum(0)[:, None]
    tolerance = 0.02 if storage == "int8" else 1e-4  # int8 also quantizes the activations in its backward
    assert rel_err(vector.grad, expected) < tolerance


@pytest.mark.parametrize("storage", ["fp16", "int8", "nf4"])
def test_fresh_vectors_are_the_identity(storage):
    ids = sample_ids()
    model = upcast(load("llama", storage))
    before = output(model, ids)
    ia.wrap_model(model, ia.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"]))
    assert torch.equal(output(model, ids), before)


def test_wrapper_follows_layer_type_not_model_flags():
    """PEFT picks its bnb wrapper from is_loaded_in_8bit; a bnb layer without that flag must still get ours."""
    model = load("llama", "int8")
    model.is_loaded_in_8bit = False
    ia.wrap_model(model, ia.IA3Config())
    kinds = {type(layer) for layer in ia.ia3_layers(model).values()}
    assert kinds == {ia.Linear8bitLt}


def test_conv1d_scales_the_right_side():
    """GPT-2 Conv1D stores [in, out]: an input-scaled c_proj multiplies the weight's rows."""
    model = upcast(load("gpt2", "fp16"))
    ia.load_adapter(model, ADAPTERS / "gpt2")
    layer = first_layer(model, "h.0.mlp.c_proj")
    assert layer.is_feedforward and layer.fan_in_fan_out
    x = torch.randn(4, layer.in_features)
    base = layer.get_base_layer()
    scaled_weight = base.weight * layer.ia3_l["default"].reshape(-1, 1)
    assert torch.allclose(layer(x), x @ scaled_weight + base.bias, atol=1e-5)


@pytest.mark.parametrize("target, message", [("embed_tokens", "is a Embedding"), ("nonexistent", "match no module")])
def test_bad_targets_are_refused(target, message):
    model = load("llama", "nf4")
    with pytest.raises(TargetError, match=message):
        ia.wrap_model(model, ia.IA3Config(target_modules=[target], feedforward_modules=[]))
    assert not ia.ia3_layers(model)
