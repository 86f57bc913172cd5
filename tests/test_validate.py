"""validate: PEFT-made adapters are clean on every fixture base, broken ones are named with a fix, the base is
judged from headers alone (the reader's own byte count), and what validate calls an error PEFT cannot load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, ARCHS, MODELS, STORAGES, load, upcast
from safetensors.torch import load_file, save_file

import ia3convert as ia
from ia3convert.checkpoint import CheckpointReader
from ia3convert.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def copy_adapter(tmp_path, arch="llama", name="a"):
    folder = tmp_path / name
    folder.mkdir()
    for item in (ADAPTERS / arch).iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
    return folder


def edit(folder, config=None, tensors=None):
    if config is not None:
        data = json.loads((folder / "adapter_config.json").read_text())
        config(data)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        data = load_file(folder / "adapter_model.safetensors")
        tensors(data)
        save_file(data, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def where(report, severity):
    return {f.where for f in report.findings if f.severity == severity}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapters_are_clean_on_every_base_and_no_tensor_data_is_read(arch, storage):
    for name in ia.list_adapters(ADAPTERS / arch):
        report = ia.validate(ADAPTERS / arch, MODELS / f"{arch}-{storage}", adapter_name=name)
        assert report.ok, report.lines()
        assert report.base_bytes_read == 0
        assert report.modules == len(ia.read_adapter(ADAPTERS / arch, name).vectors)
        # the fixtures carry one 0 and one -0.5 per vector: a warning each, never an error
        assert where(report, "warning") == set(ia.read_adapter(ADAPTERS / arch, name).vectors)


def test_the_readers_accounting_counts_tensor_reads():
    """The byte count that proves validate reads headers only does count real reads."""
    reader = CheckpointReader(MODELS / "gpt2-fp16")
    assert reader.bytes_read == 0
    key = "transformer.h.0.attn.c_attn.weight"
    reader.get(key)
    reader.raw(key)
    assert reader.bytes_read == 2 * reader.tensors[key].nbytes


def test_largest_fixture_is_validated_from_headers_only():
    largest = max(MODELS.iterdir(), key=lambda p: sum(f.stat().st_size for f in p.iterdir()))
    arch = largest.name.split("-")[0]
    report = ia.validate(ADAPTERS / arch, largest, adapter_name="second")
    assert report.ok and report.base_bytes_read == 0


def test_broken_adapters_are_named_alone(tmp_path):
    lora = edit(copy_adapter(tmp_path, name="lora"), config=lambda c: c.update(peft_type="LORA"))
    assert [f.message for f in ia.validate(lora).errors] == ["a LORA adapter, not IA3"]

    k = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    q = "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"
    v = "base_model.model.model.layers.1.self_attn.v_proj.ia3_l"

    def break_tensors(t):
        t[k][3, 0] = float("inf")
        t[q] = torch.ones(64, 1)  # a module the config does not target
        t[v] = t[v].reshape(1, -1).clone()  # output module saved with an input-side shape
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(2, 64)
        t["base_model.model.model.layers.1.mlp.down_proj.ia3_l"] = torch.ones(1, 128)
        t["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] *= 1000

    def break_config(c):
        c["target_module"] = ["q_proj"]  # a typo: PEFT ignores it
        c["target_modules"].append("gate_proj")

    broken = edit(copy_adapter(tmp_path, name="broken"), config=break_config, tensors=break_tensors)
    report = ia.validate(broken)
    assert report.exit_code == 1
    assert where(report, "error") == {"model.layers.0.self_attn.k_proj", q, v,
                                      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"}
    errors = {f.where: f for f in report.errors}
    assert "1 of 32 scales are NaN or infinite" in errors["model.layers.0.self_attn.k_proj"].message
    assert "target_modules does not select" in errors[q].message
    assert "scales the input of model.layers.1.self_attn.v_proj" in errors[v].message
    assert "resave" in errors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].fix
    warnings = {f.where: f for f in report.warnings}
    assert "did you mean 'target_modules'" in warnings["adapter_config.json: target_module"].fix
    assert "untrained" in warnings["model.layers.1.mlp.down_proj"].message
    assert "extreme scale magnitude" in warnings["model.layers.0.mlp.down_proj"].message
    assert "'gate_proj' has no vector" in warnings["adapter_config.json: target_modules"].message
    assert all(f.fix for f in report.errors + report.warnings)


def test_untrained_adapter_is_one_warning(tmp_path):
    ones = edit(copy_adapter(tmp_path), tensors=lambda t: [v.fill_(1.0) for v in t.values()])
    report = ia.validate(ones, MODELS / "llama-int8")
    assert report.ok
    assert [f.where for f in report.warnings] == ["adapter"] and "untrained" in report.warnings[0].message


def test_against_the_wrong_base_every_module_is_named(tmp_path):
    report = ia.validate(ADAPTERS / "llama", MODELS / "opt-int8")
    assert report.exit_code == 1
    assert where(report, "error") >= set(ia.read_adapter(ADAPTERS / "llama").vectors)
    assert any("no such module in the base (OPTForCausalLM)" in f.message for f in report.errors)
    assert any(f.where == "adapter_config.json: auto_mapping" for f in report.warnings)


def test_modules_that_cannot_take_ia3_are_errors(tmp_path):
    def add(t):
        t["base_model.model.lm_head.ia3_l"] = torch.ones(260, 1)  # GPT-2's lm_head is tied: no weight of its own
        t["base_model.model.transformer.wte.ia3_l"] = torch.ones(64, 1)  # an Embedding

    def target(c):
        c["target_modules"] += ["lm_head", "wte"]

    folder = edit(copy_adapter(tmp_path, "gpt2"), config=target, tensors=add)
    report = ia.validate(folder, MODELS / "gpt2-nf4")
    errors = {f.where: f.message for f in report.errors}
    assert "no weight of its own" in errors["lm_head"]
    assert "is a Embedding in the base, not a Linear or Conv1D" in errors["transformer.wte"]


def test_default_targets_are_resolved_against_the_base(tmp_path):
    """With null targets PEFT's per-architecture defaults apply: a missing default module is reported."""
    def nulls(c):
        c["target_modules"] = None
        c["feedforward_modules"] = None

    folder = edit(copy_adapter(tmp_path), config=nulls,
                  tensors=lambda t: t.pop("base_model.model.model.layers.1.mlp.down_proj.ia3_l"))
    alone = ia.validate(folder)
    assert alone.ok and any("PEFT's defaults" in f.message for f in alone.findings if f.severity == "info")
    report = ia.validate(folder, MODELS / "llama-nf4")
    assert report.ok
    assert any(f.where == "model.layers.1.mlp.down_proj" and "no vector" in f.message for f in report.warnings)


def test_shape_errors_are_what_peft_cannot_load(tmp_path):
    """The oracle: the adapter validate rejects for this base, PEFT refuses to load onto it."""
    from peft import PeftModel

    key = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"
    folder = edit(copy_adapter(tmp_path), tensors=lambda t: t.__setitem__(key, t[key][:31].clone()))
    assert not ia.validate(folder, MODELS / "llama-fp16").ok
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(upcast(load("llama", "fp16")), folder)


def test_cli_exit_codes_and_json(tmp_path):
    clean = run("validate", ADAPTERS / "bert", "--base", MODELS / "bert-int8")
    assert clean.exit_code == 0, clean.output
    lines = clean.output.strip().splitlines()
    assert lines[-1].startswith("adapter ") and "ok, 0 error(s), 8 warning(s)" in lines[-1]
    assert all(line.split(": ")[0] in ("warning", "info") for line in lines[:-1])

    as_json = run("validate", ADAPTERS / "llama", "--adapter-name", "second", "--json")
    data = json.loads(as_json.output)
    assert as_json.exit_code == 0 and data["ok"] and data["adapter_name"] == "second" and data["modules"] == 8

    broken = run("validate", ADAPTERS / "llama", "--base", MODELS / "gpt2-int8", "--json")
    assert broken.exit_code == 1 and json.loads(broken.output)["errors"] > 0

    unreadable = run("validate", ADAPTERS / "llama", "--base", tmp_path)
    assert unreadable.exit_code == 2 and unreadable.output.startswith("error: ")
    assert "has no config.json" in unreadable.output and unreadable.output.count("\n") == 1


def test_validate_is_the_function():
    import ia3convert.validation  # noqa: F401  (importing the implementation must not shadow ia3convert.validate)

    assert callable(ia.validate) and isinstance(ia.validate(ADAPTERS / "gpt2-legacy"), ia.ValidationReport)
