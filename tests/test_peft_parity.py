"""A model wrapped by ia3convert computes what PEFT's wrapped model computes, on every fixture architecture and
storage, for one adapter, two active adapters and adapters disabled (PEFT is the oracle)."""

from __future__ import annotations

import pytest
from conftest import ADAPTERS, ARCHS, STORAGES, load, output, rel_err, sample_ids, upcast

import ia3convert as ia

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_output_as_peft(arch, storage, peft):
    ours = upcast(load(arch, storage))
    ia.load_adapter(ours, ADAPTERS / arch)
    ia.load_adapter(ours, ADAPTERS / arch, adapter_name="second", select="second")

    theirs = peft.PeftModel.from_pretrained(upcast(load(arch, storage)), ADAPTERS / arch)
    theirs.load_adapter(ADAPTERS / arch / "second", adapter_name="second")

    ids = sample_ids()
    with ia.adapters_disabled(ours), theirs.disable_adapter():
        off_ours, off_theirs = output(ours, ids), output(theirs, ids)
    one_ours, one_theirs = output(ours, ids), output(theirs, ids)
    ia.set_adapter(ours, ["default", "second"])
    theirs.base_model.set_adapter(["default", "second"])
    two_ours, two_theirs = output(ours, ids), output(theirs, ids)

    errors = {"off": rel_err(off_ours, off_theirs), "one": rel_err(one_ours, one_theirs),
              "two": rel_err(two_ours, two_theirs)}
    print(f"{arch}-{storage}: relative error vs PEFT {errors}")
    assert all(e <= TOLERANCE for e in errors.values()), errors
    # The comparison means something only if the adapters move the output, each in its own way.
    assert rel_err(one_ours, off_ours) > 1e-2
    assert rel_err(two_ours, one_ours) > 1e-2


@pytest.mark.parametrize(
    "arch, config",
    [
        ("llama", dict(target_modules=None, feedforward_modules=None)),
        ("llama", dict(target_modules="all-linear", feedforward_modules=["down_proj", "up_proj"])),
        ("llama", dict(target_modules=r"model\.layers\.1\..*_proj", feedforward_modules=r".*mlp\..*")),
        ("llama", dict(target_modules=["k_proj", "v_proj", "o_proj"], feedforward_modules=["o_proj"],
                       exclude_modules=["model.layers.0.self_attn.v_proj"])),
        ("opt", dict(target_modules=None, feedforward_modules=None)),
        # PEFT's bare endswith: "proj" also marks out_proj, q_proj, ... as feed-forward.
        ("opt", dict(target_modules=["q_proj", "out_proj", "fc1", "proj"], feedforward_modules=["proj"])),
        ("gpt2", dict(target_modules="all-linear", feedforward_modules=["c_proj"])),
        ("gpt2", dict(target_modules=None, feedforward_modules=None)),
        ("bert", dict(target_modules="all-linear", feedforward_modules=["output.dense"],
                      exclude_modules=r".*pooler.*")),
        ("bert", dict(target_modules=None, feedforward_modules=None)),
    ],
)
def test_module_selection_matches_peft(arch, config, peft):
    """Same modules wrapped, same side scaled, as PEFT's get_peft_model for the same config."""
    theirs = peft.get_peft_model(load(arch, "fp16"), peft.IA3Config(**config))
    expected = {
        name.removeprefix("base_model.model."): module.is_feedforward
        for name, module in theirs.named_modules()
        if isinstance(module, peft.tuners.ia3.IA3Layer)
    }
    model = load(arch, "nf4")
    wrapped = ia.wrap_model(model, ia.IA3Config(**config))
    got = {path: layer.is_feedforward for path, layer in ia.ia3_layers(model).items()}
    assert sorted(wrapped) == sorted(got)
    assert got == expected
