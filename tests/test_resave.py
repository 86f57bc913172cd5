"""resave: every fixture adapter re-saved in the canonical format loads in PEFT with the identical forward,
validates clean, and comes out whole or not at all."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, load, output, sample_ids, upcast
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ia3convert as ia
from ia3convert.cli import main
from ia3convert.errors import OutputError

SOURCES = [(arch, name) for arch in ("llama", "opt", "gpt2", "bert") for name in ("default", "second")]
SOURCES.append(("gpt2-legacy", "default"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def folder_of(arch: str, name: str):
    return ADAPTERS / arch if name == "default" else ADAPTERS / arch / name


@pytest.mark.parametrize("arch, name", SOURCES, ids=[f"{a}-{n}" for a, n in SOURCES])
def test_resave_round_trips_through_peft(arch, name, tmp_path):
    from peft import PeftModel

    result = ia.resave(ADAPTERS / arch, tmp_path / "out", select=name)
    assert result.folder == tmp_path / "out" and result.dropped == []
    assert ia.validate(tmp_path / "out").ok

    model_arch = arch.removesuffix("-legacy")
    ids = sample_ids()
    original = PeftModel.from_pretrained(upcast(load(model_arch, "nf4")), folder_of(arch, name)).eval()
    resaved = PeftModel.from_pretrained(upcast(load(model_arch, "nf4")), tmp_path / "out").eval()
    assert torch.equal(output(original, ids), output(resaved, ids))
    configs = [m.peft_config["default"] for m in (original, resaved)]
    for field in ("target_modules", "feedforward_modules"):
        a, b = (getattr(c, field) for c in configs)
        assert (set(a) == set(b)) if isinstance(a, (set, list)) else a == b


def test_canonical_format_and_dtype(tmp_path):
    result = run("resave", ADAPTERS / "gpt2-legacy", tmp_path / "out", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 4 vectors of") and "as bfloat16" in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    original = torch.load(ADAPTERS / "gpt2-legacy" / "adapter_model.bin", weights_only=True)
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(original)
        for key in original:
            assert torch.equal(f.get_tensor(key), original[key].to(torch.bfloat16))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert all(config[k] == sorted(config[k]) for k in ("target_modules", "feedforward_modules"))


def test_adapter_name_puts_it_in_a_sub_folder(tmp_path):
    from peft import PeftModel

    result = ia.resave(ADAPTERS / "llama", tmp_path / "out", select="second", adapter_name="task")
    assert result.folder == tmp_path / "out" / "task"
    assert ia.list_adapters(tmp_path / "out") == ["task"]
    ours = ia.read_adapter(tmp_path / "out", "task")
    theirs = ia.read_adapter(ADAPTERS / "llama", "second")
    assert all(torch.equal(ours.vectors[k], theirs.vectors[k]) for k in theirs.vectors)
    model = PeftModel.from_pretrained(upcast(load("llama", "int8")), tmp_path / "out", subfolder="task")
    assert len(model.peft_config["default"].target_modules) == 4


def test_non_ia3_tensors_are_dropped_with_a_warning_naming_them(tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(ADAPTERS / "opt" / "second", folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    extra = ["base_model.model.model.decoder.layers.0.fc1.lora_A.weight", "base_model.model.score.weight"]
    tensors.update({k: torch.ones(2, 2) for k in extra})
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ia.AdapterError, match=r"lora_A\.weight' is not an IA3 vector"):
        ia.read_adapter(folder)  # everything but resave still refuses them

    with pytest.warns(UserWarning, match="dropped 2 tensor"):
        result = ia.resave(folder, tmp_path / "out")
    assert result.dropped == sorted(extra)
    clean = ia.read_adapter(tmp_path / "out")
    assert clean.vectors.keys() == ia.read_adapter(ADAPTERS / "opt", "second").vectors.keys()

    cli = run("resave", folder, tmp_path / "out2")
    assert cli.exit_code == 0
    assert cli.stderr.count("\n") == 1 and cli.stderr.startswith("warning: ")
    assert all(k in cli.stderr for k in extra)


def test_refusals_write_nothing(tmp_path):
    adapter = ia.read_adapter(ADAPTERS / "llama")
    first = sorted(adapter.vectors)[0]
    adapter.vectors[first] = adapter.vectors[first].clone()
    adapter.vectors[first][0, 0] = 1e6
    adapter.save(tmp_path / "big")
    with pytest.raises(OutputError, match="overflow float16"):
        ia.resave(tmp_path / "big", tmp_path / "out", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]

    ia.resave(ADAPTERS / "llama", tmp_path / "out")
    before = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        ia.resave(ADAPTERS / "llama", tmp_path / "out", select="second")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == before
    ia.resave(ADAPTERS / "llama", tmp_path / "out", select="second", force=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"]


def test_resave_is_the_function():
    import ia3convert.resaving  # noqa: F401  (importing the implementation must not shadow ia3convert.resave)

    assert ia.resave.__module__ == "ia3convert.resaving" and ia.ResaveResult.__name__ == "ResaveResult"
