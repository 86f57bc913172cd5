"""Structural folds: input-side scales moved onto the producing layer's rows, exact against PEFT's unmerged
model, refused (with the reason in the report) where the math does not allow them."""

from __future__ import annotations

import pytest
import torch
from conftest import ADAPTERS, MODELS, output, rel_err, sample_ids, upcast
from test_merge import load_plain, peft_model

import ia3convert as ia
from ia3convert.folds import RULES, Fold, find_fold


def adapter_with(tmp_path, arch, edit, name="default"):
    """A fixture adapter changed by ``edit(adapter)``, saved in PEFT's format for both tools to load."""
    adapter = ia.read_adapter(ADAPTERS / arch, name)
    edit(adapter)
    adapter.config.target_modules = sorted(adapter.vectors)
    adapter.config.feedforward_modules = sorted(p for p in adapter.vectors if adapter.is_feedforward(p))
    folder = tmp_path / f"{arch}-edited"
    adapter.save(folder)
    return folder


def positive_fc2(adapter):
    for path in adapter.vectors:
        if path.endswith("fc2"):
            adapter.vectors[path] = adapter.vectors[path].abs()


def attention_only(adapter):
    keep = ("attention.self.key", "attention.self.value", "attention.output.dense")
    adapter.vectors = {p: v for p, v in adapter.vectors.items() if p.endswith(keep)}


CASES = [("llama", None), ("opt", positive_fc2), ("bert", attention_only)]


@pytest.mark.parametrize("storage", ["int8", "nf4", "nf4-dq"])
@pytest.mark.parametrize("arch, edit", CASES)
def test_default_targets_merge_exactly_with_folds(arch, edit, storage, tmp_path):
    adapter_dir = adapter_with(tmp_path, arch, edit) if edit else ADAPTERS / arch
    base = MODELS / f"{arch}-{storage}"
    folded = ia.merge(base, adapter_dir, tmp_path / "folded")
    plain = ia.merge(base, adapter_dir, tmp_path / "plain", fold=False)
    kinds = {m.transform for m in folded.modules}
    assert kinds <= {"exact-fold", "folded"} and "folded" in kinds, folded.table()
    assert "requantize" in {m.transform for m in plain.modules}

    ids = sample_ids()
    truth = output(peft_model(arch, storage, adapter_dir), ids)
    with_folds = rel_err(output(upcast(load_plain(tmp_path / "folded")), ids), truth)
    without = rel_err(output(upcast(load_plain(tmp_path / "plain")), ids), truth)
    print(f"{arch}-{storage}: whole model vs PEFT unmerged {with_folds:.2e} with folds, {without:.2e} without")
    assert with_folds <= 1e-5
    assert without > 1e-3  # what the folds save


def test_folded_consumer_is_untouched_and_report_names_both(tmp_path):
    from ia3convert.checkpoint import CheckpointReader

    report = ia.merge(MODELS / "llama-nf4", ADAPTERS / "llama", tmp_path / "m")
    by_module = {m.module: m for m in report.modules}
    down, up = by_module["model.layers.0.mlp.down_proj"], by_module["model.layers.0.mlp.up_proj"]
    assert down.transform == "folded" and "model.layers.0.mlp.up_proj (gated)" in down.reason
    assert up.transform == "exact-fold" and "input scale of model.layers.0.mlp.down_proj" in up.reason
    base, out = CheckpointReader(MODELS / "llama-nf4"), CheckpointReader(tmp_path / "m")
    for key in base.tensors:
        if key.startswith("model.layers.0.mlp.down_proj."):
            assert out.raw(key) == base.raw(key)


def test_gqa_group_consistency_decides(tmp_path):
    """Llama fixture: 4 query heads share 2 KV heads. o_proj's input scale folds into v_proj only when it is
    identical across the query heads of each group."""
    heads, kv, head_dim = 4, 2, 16
    generator = torch.Generator().manual_seed(5)

    def o_proj_scale(consistent):
        def edit(adapter):
            per_kv = 1 + 0.2 * torch.randn(kv, 1, head_dim, generator=generator)
            grouped = per_kv.expand(kv, heads // kv, head_dim).clone()
            if not consistent:
                grouped[0, 1, 3] += 0.25
            for layer in (0, 1):
                adapter.vectors[f"model.layers.{layer}.self_attn.o_proj"] = grouped.reshape(1, -1)
        return edit

    ids = sample_ids()
    for consistent in (True, False):
        folder = adapter_with(tmp_path / str(consistent), "llama", o_proj_scale(consistent))
        report = ia.merge(MODELS / "llama-int8", folder, tmp_path / f"m-{consistent}")
        o_proj = {m.module: m for m in report.modules}["model.layers.0.self_attn.o_proj"]
        if consistent:
            assert o_proj.transform == "folded" and "v_proj (attention)" in o_proj.reason
            error = rel_err(output(upcast(load_plain(tmp_path / f"m-{consistent}")), ids),
                            output(peft_model("llama", "int8", folder), ids))
            assert error <= 1e-5
        else:
            assert o_proj.transform == "requantize"
            assert "differ between the 2 query heads sharing a KV head" in o_proj.reason


@pytest.mark.parametrize("arch, module, why", [
    ("gpt2", "transformer.h.0.mlp.c_proj", "activation gelu_new is not positively homogeneous"),
    ("bert", "encoder.layer.0.output.dense", "activation gelu is not positively homogeneous"),
    ("opt", "model.decoder.layers.0.fc2", "negative scale(s): ReLU does not commute"),
])
def test_unfoldable_modules_requantize_and_say_why(arch, module, why, tmp_path):
    report = ia.merge(MODELS / f"{arch}-nf4", ADAPTERS / arch, tmp_path / "m")
    entry = {m.module: m for m in report.modules}[module]
    assert entry.transform == "requantize" and why in entry.reason
    assert report.passed


def test_no_fold_flag(tmp_path):
    from click.testing import CliRunner

    from ia3convert.cli import main

    result = CliRunner().invoke(main, ["merge", str(MODELS / "llama-int8"), str(ADAPTERS / "llama"),
                                       str(tmp_path / "m"), "--no-fold", "--json"])
    import json

    transforms = {m["transform"] for m in json.loads(result.output)["modules"]}
    assert transforms == {"exact-fold", "requantize"}


def _tiny_config(model_type):
    import transformers

    common = dict(vocab_size=64)
    if model_type == "t5":
        return transformers.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, **common)
    if model_type == "gated-t5":
        return transformers.T5Config(d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                     feed_forward_proj="gated-gelu", **common)
    if model_type == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, **common)
    if model_type == "opt":
        return transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4,
                                      word_embed_proj_dim=32, **common)
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8).items():
        if hasattr(config, key) and not isinstance(getattr(type(config), key, None), property):
            setattr(config, key, value)
    config.vocab_size = 64
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 0)
    return config


@pytest.mark.parametrize("model_type", sorted(set(RULES) - {"mt5"} | {"gated-t5"}))
def test_registry_names_real_modules(model_type):
    """Every rule of the registry finds its producer in the real transformers model, with matching sizes."""
    import transformers

    from ia3convert.skeleton import linear_modules

    config = _tiny_config(model_type)
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    linear = linear_modules(model)
    sizes = {}
    for path in linear:
        module = model.get_submodule(path)
        sizes[path] = module.weight.shape[1] if linear[path] else module.weight.shape[0]
    found = []
    for path in linear:
        module = model.get_submodule(path)
        in_features = module.weight.shape[0] if linear[path] else module.weight.shape[1]
        fold = find_fold(config.model_type, config, path, torch.ones(in_features), sizes)
        if isinstance(fold, Fold):
            assert int(fold.index.min()) >= 0 and int(fold.index.max()) < sizes[fold.producer]
            assert len(set(fold.index.tolist())) == len(fold.index) == len(fold.vector)
            found.append(fold.kind)
        elif fold:
            assert "not positively homogeneous" in fold, (path, fold)
    assert "attention" in found


@pytest.mark.parametrize("storage", ["int8", "nf4"])
def test_folds_compose_with_the_producers_own_scales(storage, tmp_path):
    """Every Linear adapted (gate, up, q, k, v output-side; down, o input-side): down's scale multiplies into up's
    own row scale, o's into v's, and the gate's own scale stays in the path check."""
    model = ia.load_model(MODELS / "llama-fp16")
    ia.wrap_model(model, ia.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for path, layer in ia.ia3_layers(model).items():
            if path.endswith("o_proj"):  # consistent across the 2 query heads of each KV head
                per_kv = 1 + 0.2 * torch.randn(2, 1, 16, generator=generator)
                values = per_kv.expand(2, 2, 16).reshape(1, -1)
            else:
                values = 1 + 0.2 * torch.randn(layer.vector_shape, generator=generator)
            layer.ia3_l["default"].copy_(values)
    ia.save_adapters(model, tmp_path / "all")
    report = ia.merge(MODELS / f"llama-{storage}", tmp_path / "all", tmp_path / "m")
    by_module = {m.module: m.transform for m in report.modules}
    assert by_module["model.layers.0.mlp.down_proj"] == "folded"
    assert by_module["model.layers.0.self_attn.o_proj"] == "folded"
    assert set(by_module.values()) == {"folded", "exact-fold"}
    ids = sample_ids()
    error = rel_err(output(upcast(load_plain(tmp_path / "m")), ids), output(peft_model("llama", storage,
                                                                                        tmp_path / "all"), ids))
    print(f"llama-{storage} all-linear: whole model {error:.2e}")
    assert error <= 1e-5


def test_phi_attention_folds_into_v_proj(tmp_path):
    """Phi (GQA, separate v_proj, `dense` output projection): the output projection's input scale lands on the V
    rows that feed each head; whole model equal to PEFT's unmerged one."""
    import transformers
    from peft import PeftModel

    torch.manual_seed(0)
    config = transformers.PhiConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=128, initializer_range=0.1)
    transformers.PhiForCausalLM(config).to(torch.float16).save_pretrained(tmp_path / "fp16")
    transformers.PhiForCausalLM.from_pretrained(
        tmp_path / "fp16", device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
    ).save_pretrained(tmp_path / "int8")
    model = transformers.PhiForCausalLM.from_pretrained(tmp_path / "fp16")
    ia.wrap_model(model, ia.IA3Config(target_modules=["v_proj", "dense"], feedforward_modules=["dense"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for path, layer in ia.ia3_layers(model).items():
            if path.endswith("dense"):  # identical across the 2 query heads sharing a KV head
                per_kv = 1 + 0.3 * torch.randn(2, 1, 16, generator=generator)
                layer.ia3_l["default"].copy_(per_kv.expand(2, 2, 16).reshape(1, -1))
            else:
                layer.ia3_l["default"].copy_(1 + 0.3 * torch.randn(layer.vector_shape, generator=generator))
    ia.save_adapters(model, tmp_path / "adapter")
    report = ia.merge(tmp_path / "int8", tmp_path / "adapter", tmp_path / "merged")
    assert {m.module: m.transform for m in report.modules}["model.layers.0.self_attn.dense"] == "folded"
    ids = sample_ids(8) % 128
    truth = PeftModel.from_pretrained(upcast(ia.load_model(tmp_path / "int8")), tmp_path / "adapter")
    error = rel_err(output(upcast(load_plain(tmp_path / "merged")), ids), output(truth, ids))
    print(f"phi: whole model {error:.2e}")
    assert error <= 1e-5


@pytest.mark.parametrize("layout", ["new", "multi-query", "per-head"])
def test_falcon_v_rows_match_transformers_split(layout):
    """Falcon's fused query_key_value has three layouts; the V rows the fold scales are the ones transformers'
    own _split_heads hands to each query head. (transformers 5 does not quantize Falcon's FalconLinear with
    bitsandbytes, so no quantized Falcon checkpoint exists to merge end to end.)"""
    import transformers

    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=8, vocab_size=64,
                                       new_decoder_architecture=layout == "new",
                                       num_kv_heads=2 if layout == "new" else None,
                                       multi_query=layout == "multi-query", alibi=False)
    with torch.device("meta"):
        attention = transformers.FalconForCausalLM(config).transformer.h[0].self_attention
    heads, head_dim = 8, 8
    total = attention.query_key_value.weight.shape[0]
    sizes = {"transformer.h.0.self_attention.query_key_value": total, "transformer.h.0.self_attention.dense": 64}
    fold = find_fold("falcon", config, "transformer.h.0.self_attention.dense", torch.ones(heads * head_dim), sizes)
    assert isinstance(fold, Fold)
    rows = torch.arange(total, dtype=torch.float32).reshape(1, 1, total)  # each fused row labelled by its index
    _, _, value = attention._split_heads(rows)
    per_head = value.reshape(heads, head_dim) if value.numel() == heads * head_dim else \
        value.reshape(-1, head_dim).expand(heads, head_dim)
    _, kv_heads, _ = fold.heads
    expected = per_head.reshape(kv_heads, heads // kv_heads, head_dim)[:, 0, :].reshape(-1).long()
    assert torch.equal(fold.index, expected)


@pytest.mark.parametrize("storage, limit", [("int8", 1e-3), ("nf4", 1e-5)])
def test_fold_limits_allow_for_an_int8_consumers_input_rounding(storage, limit, tmp_path):
    report = ia.merge(MODELS / f"llama-{storage}", ADAPTERS / "llama", tmp_path / "m")
    limits = {m.module: m.limit for m in report.modules}
    assert limits["model.layers.0.mlp.down_proj"] == limits["model.layers.0.mlp.up_proj"] == limit
    assert limits["model.layers.0.self_attn.k_proj"] == 1e-5  # no int8 consumer on this path
