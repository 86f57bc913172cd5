"""Merging into quantized and float checkpoints, against independent oracles: PEFT's unmerged IA3 model on the
same quantized base (whole model and per layer), transformers' own loader and quantizer, and the base's bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, ARCHS, MODELS, STORAGES, load, output, rel_err, sample_ids, upcast

import ia3convert as ia
from ia3convert.checkpoint import CheckpointReader
from ia3convert.cli import main
from ia3convert.merging import merge

# Whole-model bound per storage for PEFT's default adapters, which scale some inputs (re-quantized modules).
MODEL_BOUND = {"fp16": 2e-3, "int8": 0.06, "nf4": 0.2, "fp4": 0.25, "nf4-dq": 0.2}


def load_plain(path: Path):
    """What a user does with a merged model: the class from its config, no extra arguments."""
    import transformers

    config = json.loads((path / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(path).eval()


def peft_model(arch: str, storage: str, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(upcast(load(arch, storage)), adapter_dir).eval()


def layer_errors(truth_model, merged_model, paths: list[str], ids) -> dict[str, float]:
    """Feed each merged layer the input its IA3 twin sees in the ground-truth forward; relative error."""
    seen = {}
    hooks = [truth_model.base_model.model.get_submodule(p).register_forward_hook(
        lambda mod, args, out, p=p: seen.__setitem__(p, (args[0].detach(), out.detach()))) for p in paths]
    output(truth_model, ids)
    for h in hooks:
        h.remove()
    errors = {}
    with torch.no_grad():
        for p in paths:
            x, expected = seen[p]
            errors[p] = rel_err(merged_model.get_submodule(p)(x), expected)
    return errors


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("arch", ARCHS)
def test_merged_model_matches_peft_unmerged(arch, storage, tmp_path):
    """Module by module (no folds, so that each merged layer stands for its IA3 twin) and, with folds, whole."""
    out = tmp_path / "merged"
    before = digest(MODELS / f"{arch}-{storage}")
    report = merge(MODELS / f"{arch}-{storage}", ADAPTERS / arch, out, fold=False)
    merge(MODELS / f"{arch}-{storage}", ADAPTERS / arch, tmp_path / "folded")
    assert digest(MODELS / f"{arch}-{storage}") == before

    ids = sample_ids()
    truth = peft_model(arch, storage, ADAPTERS / arch)
    merged = upcast(load_plain(out))
    whole = rel_err(output(merged, ids), output(truth, ids))
    per_layer = layer_errors(truth, merged, [m.module for m in report.modules], ids)
    kinds = {m.module: m.transform for m in report.modules}
    exact = [p for p, k in kinds.items() if k == "exact-fold"]
    worst_exact = max((per_layer[p] for p in exact), default=0)
    worst_other = max((e for p, e in per_layer.items() if p not in exact), default=0)
    folded = rel_err(output(upcast(load_plain(tmp_path / "folded")), ids), output(truth, ids))
    print(f"{arch}-{storage}: whole model {whole:.2e} ({folded:.2e} with folds); exact folds max "
          f"{worst_exact:.1e} ({len(exact)}); others max {worst_other:.1e}")
    assert whole <= MODEL_BOUND[storage]
    assert folded <= whole * 1.5 + 1e-6
    assert all(per_layer[p] <= 1e-6 for p in exact), per_layer
    if storage != "fp16":
        assert exact, "output-side modules of a quantized base must fold exactly"
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["passed"] and len(saved["modules"]) == len(report.modules)


@pytest.mark.parametrize("storage", ["int8", "nf4", "fp4", "nf4-dq"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_output_side_adapter_merges_exactly(arch, storage, tmp_path):
    """With only output-scaled modules every fold is exact: the whole model equals PEFT's unmerged one."""
    adapter = ia.read_adapter(ADAPTERS / arch, "second")
    adapter.vectors = {p: v for p, v in adapter.vectors.items() if not adapter.is_feedforward(p)}
    adapter.config.target_modules = sorted(adapter.vectors)
    adapter.config.feedforward_modules = []
    adapter.save(tmp_path / "outputs-only")
    merge(MODELS / f"{arch}-{storage}", tmp_path / "outputs-only", tmp_path / "merged")
    ids = sample_ids()
    error = rel_err(output(upcast(load_plain(tmp_path / "merged")), ids),
                    output(peft_model(arch, storage, tmp_path / "outputs-only"), ids))
    print(f"{arch}-{storage} output-side only: whole model {error:.2e}")
    assert error <= 1e-5


@pytest.mark.parametrize("storage", ["int8", "nf4", "nf4-dq"])
def test_codes_and_untouched_tensors_keep_their_bytes(storage, tmp_path):
    report = merge(MODELS / f"llama-{storage}", ADAPTERS / "llama", tmp_path / "m")
    base, out = CheckpointReader(MODELS / f"llama-{storage}"), CheckpointReader(tmp_path / "m")
    merged = {m.module: m.transform for m in report.modules}
    for key in base.tensors:
        module = next((p for p in merged if key.startswith(p + ".")), None)
        if module is None:
            assert out.raw(key) == base.raw(key), key
        elif merged[module] == "exact-fold" and key == f"{module}.weight":
            codes, new_codes = base.get(key), out.get(key)
            if storage == "int8":  # signs flip for negative scales, magnitudes stay
                assert torch.equal(new_codes.abs(), codes.abs())
            else:
                assert out.raw(key) == base.raw(key), key
    folded = [p for p, t in merged.items() if t == "exact-fold"]
    stat = ".SCB" if storage == "int8" else ".weight.absmax"
    assert all(out.raw(p + stat) != base.raw(p + stat) for p in folded)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (MODELS / f"llama-{storage}" / name).read_bytes()
    if storage == "nf4-dq":  # folded nested layers are stored de-nested, the rest stays nested
        assert all(f"{p}.weight.nested_absmax" not in out.tensors for p in folded)
        assert "model.layers.0.self_attn.q_proj.weight.nested_absmax" in out.tensors


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quantize, double_quant", [("int8", False), ("nf4", False), ("fp4", False), ("nf4", True)])
def test_quantize_is_the_route_users_have_today(arch, quantize, double_quant, tmp_path):
    """Float base + --quantize gives the bytes of: PEFT merge_and_unload in fp16, save, load with
    transformers' BitsAndBytesConfig, save."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    float_model = PeftModel.from_pretrained(load(arch, "fp16"), ADAPTERS / arch).merge_and_unload()
    float_model.save_pretrained(tmp_path / "peft-merged")
    config = (BitsAndBytesConfig(load_in_8bit=True) if quantize == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantize,
                                 bnb_4bit_use_double_quant=double_quant))
    route = type(float_model).from_pretrained(tmp_path / "peft-merged", quantization_config=config, device_map="cpu")
    route.save_pretrained(tmp_path / "route")

    merge(MODELS / f"{arch}-fp16", ADAPTERS / arch, tmp_path / "ours", quantize=quantize, double_quant=double_quant)
    theirs, ours = CheckpointReader(tmp_path / "route"), CheckpointReader(tmp_path / "ours")
    assert ours.tensors.keys() == theirs.tensors.keys()
    differing = [k for k in theirs.tensors if ours.raw(k) != theirs.raw(k)]
    assert not differing, differing[:5]
    ours_qc = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    theirs_qc = json.loads((tmp_path / "route" / "config.json").read_text())["quantization_config"]
    assert ours_qc == theirs_qc


@pytest.mark.parametrize("storage", ["int8", "nf4", "fp16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_writes_a_float_model(storage, dtype, tmp_path):
    merge(MODELS / f"gpt2-{storage}", ADAPTERS / "gpt2", tmp_path / "m", dtype=dtype)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == dtype
    merged = load_plain(tmp_path / "m")
    assert {p.dtype for p in merged.parameters()} == {getattr(torch, dtype)}
    ids = sample_ids()
    error = rel_err(output(upcast(merged), ids), output(peft_model("gpt2", storage, ADAPTERS / "gpt2"), ids))
    print(f"gpt2-{storage} -> {dtype}: whole model {error:.2e}")
    # 4-bit dequantizes exactly; int8 layers also round activations, bf16 rounds the weights.
    bound = {"float32": {"nf4": 1e-5, "fp16": 1e-5, "int8": 0.05}, "bfloat16": {"nf4": 0.02, "fp16": 0.02,
                                                                                 "int8": 0.05}}[dtype][storage]
    assert error <= bound


def test_sharded_output_loads_the_same(tmp_path):
    merge(MODELS / "llama-nf4", ADAPTERS / "llama", tmp_path / "one")
    merge(MODELS / "llama-nf4", ADAPTERS / "llama", tmp_path / "many", max_shard_size="40KB")
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ids = sample_ids()
    assert torch.equal(output(load_plain(tmp_path / "one"), ids), output(load_plain(tmp_path / "many"), ids))
    merge(tmp_path / "many", ADAPTERS / "llama", tmp_path / "again", max_error=1.0)  # a sharded base reads too


def test_straddling_blocks_and_renest(tmp_path):
    """OPT's fc2 has 96 inputs: 4-bit blocks of 64 straddle its rows, so an output-side scale requantizes."""
    adapter = ia.read_adapter(ADAPTERS / "opt")
    for path in list(adapter.vectors):
        if path.endswith("fc2"):
            adapter.vectors[path] = 1 + 0.1 * torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    adapter.config.feedforward_modules = []
    report = merge(MODELS / "opt-nf4-dq", adapter, tmp_path / "m", renest=True)
    by_module = {m.module: m for m in report.modules}
    fc2 = by_module["model.decoder.layers.0.fc2"]
    assert fc2.transform == "requantize" and "straddle" in fc2.reason
    renested = by_module["model.decoder.layers.0.self_attn.k_proj"]
    assert renested.transform == "fold-renest" and 0 < renested.rel_error < 1e-2
    out = CheckpointReader(tmp_path / "m")
    assert "model.decoder.layers.0.self_attn.k_proj.weight.nested_absmax" in out.tensors


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_merge_report_and_json(tmp_path):
    result = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", tmp_path / "m", "--quiet")
    assert result.exit_code == 0 and result.output == ""
    result = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", tmp_path / "m2", "--adapter-name", "second",
                 "--json")
    report = json.loads(result.output)
    assert report["adapter_name"] == "second" and report["passed"]
    # down_proj's scale folds into up_proj, which its own input scale requantizes anyway
    assert {m["transform"] for m in report["modules"]} == {"exact-fold", "folded", "requantize"}
    table = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", tmp_path / "m3").output
    assert "exact-fold" in table and "merged 8 modules into" in table


def test_failed_check_leaves_nothing(tmp_path):
    before = digest(MODELS / "gpt2-nf4")
    result = run("merge", MODELS / "gpt2-nf4", ADAPTERS / "gpt2", tmp_path / "m", "--max-error", "1e-3")
    assert result.exit_code == 7
    assert "merge check failed for 2 module(s)" in result.output and "mlp.c_proj" in result.output
    assert list(tmp_path.iterdir()) == []
    assert digest(MODELS / "gpt2-nf4") == before


def test_output_safety(tmp_path):
    out = tmp_path / "m"
    assert run("merge", MODELS / "llama-int8", ADAPTERS / "llama", out, "--quiet").exit_code == 0
    first = digest(out)
    again = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", out)
    assert again.exit_code == 6 and "already exists" in again.output and digest(out) == first
    forced = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", out, "--adapter-name", "second", "--force",
                 "--quiet")
    assert forced.exit_code == 0 and digest(out) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    inside = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", MODELS / "llama-int8" / "sub")
    assert inside.exit_code == 6 and "inside the input" in inside.output
    assert not (MODELS / "llama-int8" / "sub").exists()
    around = run("merge", MODELS / "llama-int8", ADAPTERS / "llama", MODELS, "--force")
    assert around.exit_code == 6 and "contains the input" in around.output


def test_mismatched_and_broken_inputs_stop_before_writing(tmp_path):
    wrong = run("merge", MODELS / "opt-int8", ADAPTERS / "llama", tmp_path / "a")
    assert wrong.exit_code == 5 and "is not a Linear layer of the base" in wrong.output

    adapter = ia.read_adapter(ADAPTERS / "llama")
    first = sorted(adapter.vectors)[0]
    adapter.vectors[first] = adapter.vectors[first].clone()
    adapter.vectors[first][0, 0] = float("nan")
    adapter.save(tmp_path / "nan")
    broken = run("merge", MODELS / "llama-nf4", tmp_path / "nan", tmp_path / "b")
    assert broken.exit_code == 3 and "NaN or infinite" in broken.output

    adapter.vectors[first][0, 0] = 1e7  # fp16 holds at most 65504
    adapter.save(tmp_path / "huge")
    overflow = run("merge", MODELS / "llama-fp16", tmp_path / "huge", tmp_path / "c")
    assert overflow.exit_code == 5 and "overflow float16" in overflow.output

    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge", "nan"]


def test_other_quantization_methods_are_named(tmp_path):
    import shutil

    base = tmp_path / "gptq"
    shutil.copytree(MODELS / "llama-fp16", base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    result = run("merge", base, ADAPTERS / "llama", tmp_path / "out")
    assert result.exit_code == 4 and "quantized with gptq" in result.output


def test_unreachable_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = run("merge", "someone/some-model", ADAPTERS / "llama", tmp_path / "out")
    assert result.exit_code == 8 and "someone/some-model" in result.output
    assert result.output.count("\n") == 1


def test_python_api_is_the_function(tmp_path):
    import ia3convert.merging  # noqa: F401  (importing the implementation must not shadow ia3convert.merge)

    report = ia.merge(MODELS / "bert-fp4", ADAPTERS / "bert", tmp_path / "m")
    assert isinstance(report, ia.MergeReport) and report.passed
    assert {m.transform for m in report.modules} == {"exact-fold", "folded", "requantize"}


def test_interrupted_merge_leaves_nothing(tmp_path):
    """Ctrl-C (or any failure) midway: no OUT, no temporary directory, inputs untouched."""
    before = digest(MODELS / "llama-int8")

    def interrupt(done, total):
        if done == total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge(MODELS / "llama-int8", ADAPTERS / "llama", tmp_path / "m", progress=interrupt)
    assert list(tmp_path.iterdir()) == []
    assert digest(MODELS / "llama-int8") == before


def test_the_check_does_not_flood_the_log(tmp_path, caplog):
    """bitsandbytes logs a note for every int8 forward of a float32 input; the check's probes are float32 on
    purpose, and a library user merging from Python should not get one line per module."""
    caplog.set_level("WARNING", logger="bitsandbytes")  # conftest quiets it for the other tests
    merge(MODELS / "llama-int8", ADAPTERS / "llama", tmp_path / "m", requantize=True)
    assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
