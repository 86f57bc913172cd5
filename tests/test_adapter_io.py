"""Adapter files: PEFT's format exactly, both ways, and refusal of what is not a tensor file."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from conftest import ADAPTERS, load, output, rel_err, sample_ids, upcast
from safetensors import safe_open

import ia3convert as ia
from ia3convert.errors import AdapterError, OutputError


def peft_state(path):
    from peft.utils import load_peft_weights

    return load_peft_weights(str(path))


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bert"])
def test_peft_to_ours_to_peft(arch, tmp_path):
    peft = pytest.importorskip("peft")
    ours = ia.read_adapter(ADAPTERS / arch)
    ours.save(tmp_path / "resaved")

    original, resaved = peft_state(ADAPTERS / arch), peft_state(tmp_path / "resaved")
    assert original.keys() == resaved.keys()
    assert all(torch.equal(original[k], resaved[k]) and original[k].dtype == resaved[k].dtype for k in original)

    ids = sample_ids()
    via_original = peft.PeftModel.from_pretrained(upcast(load(arch, "nf4")), ADAPTERS / arch)
    via_resaved = peft.PeftModel.from_pretrained(upcast(load(arch, "nf4")), tmp_path / "resaved")
    assert torch.equal(output(via_original, ids), output(via_resaved, ids))
    targets = [set(m.peft_config["default"].target_modules) for m in (via_original, via_resaved)]
    assert targets[0] == targets[1]


@pytest.mark.parametrize("storage", ["fp16", "int8", "nf4"])
def test_ours_to_peft_to_ours(storage, tmp_path):
    """An adapter trained with ia3convert loads in PEFT with the same forward, and PEFT's re-save reads back."""
    peft = pytest.importorskip("peft")
    model = upcast(load("llama", storage))
    config = ia.IA3Config(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                          feedforward_modules=["up_proj", "down_proj"])
    ia.wrap_model(model, config, adapter_name="task")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in ia.ia3_layers(model).values():
            layer.ia3_l["task"].copy_(1 + 0.3 * torch.randn(layer.vector_shape, generator=generator))
    ia.save_adapters(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "task" / "adapter_model.safetensors").is_file()

    ids = sample_ids()
    theirs = peft.PeftModel.from_pretrained(upcast(load("llama", storage)), tmp_path / "ours" / "task")
    assert rel_err(output(theirs, ids), output(model, ids)) <= 1e-6
    theirs.save_pretrained(tmp_path / "peft")
    back = ia.read_adapter(tmp_path / "peft")
    saved = ia.get_adapter(model, "task")
    assert back.vectors.keys() == saved.vectors.keys()
    assert all(torch.equal(back.vectors[k], saved.vectors[k]) for k in saved.vectors)


def test_canonical_format(tmp_path):
    adapter = ia.read_adapter(ADAPTERS / "llama", "second")
    adapter.save(tmp_path, dtype=torch.bfloat16)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = list(f.keys())
        assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.bfloat16}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert config["target_modules"] == sorted(config["target_modules"])
    assert config["feedforward_modules"] == ["down_proj", "up_proj"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overflowing_cast_is_refused(tmp_path):
    adapter = ia.read_adapter(ADAPTERS / "llama")
    first = next(iter(adapter.vectors))
    adapter.vectors[first] = adapter.vectors[first].clone()
    adapter.vectors[first][0, 0] = 1e6
    with pytest.raises(OutputError, match=r"overflow float16"):
        adapter.save(tmp_path / "out", dtype=torch.float16)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_legacy_bin_loads_like_safetensors():
    legacy, modern = ia.read_adapter(ADAPTERS / "gpt2-legacy"), ia.read_adapter(ADAPTERS / "gpt2")
    assert legacy.vectors.keys() == modern.vectors.keys()
    assert all(torch.equal(legacy.vectors[k], modern.vectors[k]) for k in modern.vectors)


class _Payload:
    """Unpickling this runs a command: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_bin_is_refused_without_running(tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(ADAPTERS / "gpt2-legacy", folder)
    marker = tmp_path / "pwned"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.transformer.h.0.attn.c_attn.ia3_l": _Payload(marker)}, f)
    before = (folder / "adapter_model.bin").read_bytes()
    with pytest.raises(AdapterError, match=r"adapter_model.bin: refused"):
        ia.read_adapter(folder)
    assert not marker.exists()
    assert (folder / "adapter_model.bin").read_bytes() == before


def test_bin_without_tensor_mapping_is_refused(tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(ADAPTERS / "gpt2-legacy", folder)
    torch.save([torch.ones(3)], folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="mapping of names to tensors"):
        ia.read_adapter(folder)


@pytest.mark.parametrize("name", ["../llama", "a/b", "", ".."])
def test_adapter_names_with_separators_are_refused(name):
    with pytest.raises(AdapterError, match="not usable"):
        ia.read_adapter(ADAPTERS / "llama", name)


def test_several_adapters_without_default_need_a_choice(tmp_path):
    for name in ("alpha", "beta"):
        shutil.copytree(ADAPTERS / "llama" / "second", tmp_path / name)
    with pytest.raises(AdapterError, match=r"several adapters \(alpha, beta\)"):
        ia.read_adapter(tmp_path)
    assert ia.list_adapters(tmp_path) == ["alpha", "beta"]
    assert ia.read_adapter(tmp_path, "beta").name == "beta"


def test_other_peft_methods_are_named(tmp_path):
    shutil.copytree(ADAPTERS / "llama" / "second", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="a LORA adapter, not IA3"):
        ia.read_adapter(tmp_path / "lora")


def test_unknown_tensor_keys_are_named(tmp_path):
    from safetensors.torch import save_file

    shutil.copytree(ADAPTERS / "llama" / "second", tmp_path / "a")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 2)},
              tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"lora_A.weight' is not an IA3 vector"):
        ia.read_adapter(tmp_path / "a")
