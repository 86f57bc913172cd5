"""Model surgery: adding, switching, disabling, deleting and removing adapters on a live model."""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, load, output, sample_ids, upcast

import ia3convert as ia
from ia3convert.errors import AdapterError, TargetError


@pytest.fixture()
def nf4_pair():
    model = upcast(load("llama", "nf4"))
    ids = sample_ids()
    return model, ids, output(model, ids)


def test_second_adapter_is_added_inactive_then_switched(nf4_pair):
    model, ids, base = nf4_pair
    ia.load_adapter(model, ADAPTERS / "llama", is_trainable=True)
    one = output(model, ids)
    ia.load_adapter(model, ADAPTERS / "llama", adapter_name="other", select="second", is_trainable=True)
    assert ia.adapter_names(model) == ["default", "other"]
    assert torch.equal(output(model, ids), one)  # like PEFT, a new adapter is not active yet
    ia.set_adapter(model, "other")
    other = output(model, ids)
    assert not torch.equal(other, one)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("ia3_l.other") for n in trainable)
    ia.set_adapter(model, "default")
    assert torch.equal(output(model, ids), one)
    with ia.adapters_disabled(model):
        assert torch.equal(output(model, ids), base)
    assert torch.equal(output(model, ids), one)
    ia.set_adapters_enabled(model, False)
    assert torch.equal(output(model, ids), base)
    ia.set_adapters_enabled(model, True)
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        ia.set_adapter(model, "nope")


def test_delete_and_unwrap_restore_the_original_layers(nf4_pair):
    model, ids, base = nf4_pair
    originals = {name: module for name, module in model.named_modules()}
    ia.load_adapter(model, ADAPTERS / "llama")
    ia.load_adapter(model, ADAPTERS / "llama", adapter_name="second", select="second")
    ia.delete_adapter(model, "second")
    assert ia.adapter_names(model) == ["default"]
    # up_proj and q_proj had only the second adapter: they are plain layers again.
    assert not isinstance(model.model.layers[0].mlp.up_proj, ia.IA3Layer)
    assert isinstance(model.model.layers[0].mlp.down_proj, ia.IA3Layer)
    ia.unwrap_model(model)
    assert not ia.ia3_layers(model)
    assert {name: module for name, module in model.named_modules()} == originals
    assert torch.equal(output(model, ids), base)
    assert not hasattr(model, "ia3_configs")


def test_duplicate_name_and_conflicting_sides_are_refused(nf4_pair):
    model, _, _ = nf4_pair
    ia.load_adapter(model, ADAPTERS / "llama")
    with pytest.raises(TargetError, match="already has an adapter named 'default'"):
        ia.load_adapter(model, ADAPTERS / "llama")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TargetError, match=r"down_proj scales its input .* scales its output"):
        ia.wrap_model(model, ia.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=[]), "flipped")
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert ia.adapter_names(model) == ["default"]


def test_adapter_for_another_model_is_refused():
    model = load("opt", "int8")
    with pytest.raises(TargetError, match="does not exist in this OPTForCausalLM"):
        ia.load_adapter(model, ADAPTERS / "llama")
    assert not ia.ia3_layers(model)


def test_wrong_vector_shape_is_refused(tmp_path):
    adapter = ia.read_adapter(ADAPTERS / "llama")
    path = "model.layers.0.self_attn.k_proj"
    adapter.vectors[path] = torch.ones(16, 1)
    model = load("llama", "nf4")
    expected = r"k_proj: vector shape \(16, 1\) does not fit the layer \(expected \(32, 1\)\)"
    with pytest.raises(TargetError, match=expected):
        ia.load_adapter(model, adapter)
    assert not ia.ia3_layers(model) and not ia.adapter_names(model)


def test_unknown_model_type_needs_explicit_targets():
    model = load("llama", "fp16")
    model.config.model_type = "mystery"
    with pytest.raises(AdapterError, match="no default for model type 'mystery'"):
        ia.wrap_model(model, ia.IA3Config())
