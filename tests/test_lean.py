"""Quantized bases of the llama family merge without importing transformers (its import and the model
skeleton cost seconds and ~100 MB): modules known from their stored statistics, config from config.json.
The result must be what the transformers-based plan gives, and anything the lean view cannot judge falls
back to it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ADAPTERS, MODELS
from test_merge import digest

import ia3convert as ia
from ia3convert.merging import Base, MergeJob, MergeOptions, run_pass
from ia3convert.skeleton import build_skeleton, linear_modules, quantized_modules
from ia3convert.verify import activation


def merge_with(base: Base, adapter, out, **options):
    job = MergeJob(adapter, out, MergeOptions(**options), "base", "adapter")
    (report,) = run_pass(base, [job])
    assert isinstance(report, ia.MergeReport), report
    return report


def skeleton_base(path) -> Base:
    base = Base.open(path)
    base.complete()
    assert base.skeleton
    return base


def weights(folder) -> dict[str, str]:
    return {k: v for k, v in digest(folder).items() if k != "merge_report.json"}


@pytest.mark.parametrize("storage", ["int8", "nf4", "fp4", "nf4-dq"])
def test_lean_plan_is_the_transformers_plan(storage, tmp_path):
    path = MODELS / f"llama-{storage}"
    lean = Base.open(path)
    assert not lean.skeleton
    full = skeleton_base(path)
    quantized = {p: m for p, m in full.modules.items() if m.kind != "float"}
    assert set(lean.modules) == set(quantized)
    assert all((lean.modules[p].kind, lean.modules[p].in_features, lean.modules[p].out_features, lean.modules[p].info)
               == (m.kind, m.in_features, m.out_features, m.info) for p, m in quantized.items())
    adapter = ia.read_adapter(ADAPTERS / "llama")
    a = merge_with(lean, adapter, tmp_path / "lean")
    b = merge_with(full, adapter, tmp_path / "full")
    assert not lean.skeleton  # nothing in this merge needed transformers
    assert weights(tmp_path / "lean") == weights(tmp_path / "full")
    assert [(m.module, m.transform, m.reason, m.rel_error) for m in a.modules] == \
        [(m.module, m.transform, m.reason, m.rel_error) for m in b.modules]


def test_cli_merge_of_a_quantized_llama_never_imports_transformers(tmp_path):
    code = ("import sys; from ia3convert.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('transformers' in sys.modules, 'bitsandbytes' in sys.modules)")
    args = ["merge", str(MODELS / "llama-nf4"), str(ADAPTERS / "llama"), str(tmp_path / "m"), "--quiet"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"], done.stderr
    opt = subprocess.run([sys.executable, "-c", code, "merge", str(MODELS / "opt-nf4"), str(ADAPTERS / "opt"),
                          str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, check=True)
    assert opt.stdout.split() == ["True", "True"]  # not a lean model type: transformers builds the skeleton


def test_a_float_module_or_float_output_brings_the_skeleton_back(tmp_path):
    """lm_head is float in the quantized fixtures: only the skeleton says it is a Linear."""
    adapter = ia.read_adapter(ADAPTERS / "llama")
    out_features = Base.open(MODELS / "llama-nf4").reader.tensors["lm_head.weight"].shape[0]
    adapter.vectors["lm_head"] = 1 + 0.1 * torch.randn(out_features, 1, generator=torch.Generator().manual_seed(0))
    adapter.config.target_modules = sorted(adapter.vectors)
    lean = Base.open(MODELS / "llama-nf4")
    report = merge_with(lean, adapter, tmp_path / "lean")
    assert lean.skeleton
    assert {m.module: m.transform for m in report.modules}["lm_head"] == "multiply"
    merge_with(skeleton_base(MODELS / "llama-nf4"), adapter, tmp_path / "full")
    assert weights(tmp_path / "lean") == weights(tmp_path / "full")

    for_dtype = Base.open(MODELS / "llama-int8")
    merge_with(for_dtype, ia.read_adapter(ADAPTERS / "llama"), tmp_path / "float", dtype="float16")
    assert for_dtype.skeleton


def test_an_adapter_naming_a_non_linear_is_refused_as_before(tmp_path):
    adapter = ia.read_adapter(ADAPTERS / "llama")
    adapter.vectors["model.embed_tokens"] = torch.ones(1, 64)
    base = Base.open(MODELS / "llama-nf4")
    (result,) = run_pass(base, [MergeJob(adapter, tmp_path / "m", MergeOptions(), "base", "adapter")])
    assert isinstance(result, ia.TargetError) and "model.embed_tokens is not a Linear layer" in str(result)
    assert base.skeleton and not (tmp_path / "m").exists()  # judged by transformers' model structure


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "bert"])
def test_quantized_modules_are_the_ones_transformers_quantized(arch):
    base = Base.open(MODELS / f"{arch}-int8")
    skeleton = linear_modules(build_skeleton(MODELS / f"{arch}-int8"))
    quantized = {p for p, m in skeleton_base(MODELS / f"{arch}-int8").modules.items() if m.kind == "int8"}
    assert set(quantized_modules(base.reader.tensors)) == quantized and quantized <= set(skeleton)


@pytest.mark.parametrize("name", ["silu", "swish", "relu", "gelu", "gelu_pytorch_tanh"])
def test_local_activations_are_transformers_own(name):
    from transformers.activations import ACT2FN

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(activation(name)(x), ACT2FN[name](x))
