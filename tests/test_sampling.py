"""Sampled merge checks: sub-layers are the full layer's rows and columns bit for bit (bitsandbytes' own
dequantization is the oracle), samples always hold the special rows, a sampled check still catches a wrong
row, and sampling never changes what is written."""

from __future__ import annotations

import json

import bitsandbytes.functional as F
import pytest
import torch
from conftest import ADAPTERS, MODELS
from test_merge import digest

import ia3convert as ia
from ia3convert.checkpoint import CheckpointReader
from ia3convert.codecs import four_bit
from ia3convert.merging import MergeOptions, Module, Step, check_module, transform_module
from ia3convert.sampling import restrict, sample, special_indices
from ia3convert.verify import build_layer

PATH = "layer"


def stored_4bit(weight: torch.Tensor, quant_type: str, nested: bool, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """A weight quantized by bitsandbytes itself, keyed as transformers stores it."""
    codes, state = F.quantize_4bit(weight.half(), blocksize=blocksize, quant_type=quant_type,
                                   compress_statistics=nested, quant_storage=torch.uint8)
    return {f"{PATH}.weight": codes, **{f"{PATH}.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def stored_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    codes, scb, _ = F.int8_vectorwise_quant(weight.half())
    return {f"{PATH}.weight": codes, f"{PATH}.SCB": scb.float()}


def bnb_dequantized(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight bitsandbytes computes from the stored tensors (its own QuantState and kernel)."""
    stats = {k[len(PATH) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(f"{PATH}.weight.")}
    state = F.QuantState.from_dict(stats, device=torch.device("cpu"))
    state.dtype = torch.float32
    return F.dequantize_4bit(tensors[f"{PATH}.weight"], state)


@pytest.mark.parametrize("quant_type, nested", [("nf4", False), ("fp4", False), ("nf4", True)])
def test_4bit_sublayer_is_the_full_layer_sliced_bit_for_bit(quant_type, nested):
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    tensors = stored_4bit(weight, quant_type, nested)
    full = bnb_dequantized(tensors)
    rows = torch.tensor([0, 5, 17, 40, 95])
    cols = torch.cat([torch.arange(64, 128), torch.arange(192, 256)])
    for r, c in [(rows, None), (None, cols), (rows, cols)]:
        cut, n_in, n_out = restrict("4bit", tensors, PATH, 256, 96, False, r, c)
        expected = full[r if r is not None else slice(None)][:, c if c is not None else slice(None)]
        assert (n_out, n_in) == tuple(expected.shape)
        assert torch.equal(bnb_dequantized(cut), expected)
    with pytest.raises(ValueError, match="whole blocks"):
        restrict("4bit", tensors, PATH, 256, 96, False, None, torch.arange(32, 96))


@pytest.mark.parametrize("kind", ["int8", "nf4", "float"])
def test_row_sublayer_forward_is_the_full_forward_rows(kind):
    weight = torch.randn(128, 192, generator=torch.Generator().manual_seed(2))
    if kind == "int8":
        tensors = stored_int8(weight)
    elif kind == "nf4":
        tensors = stored_4bit(weight, "nf4", False)
    else:
        tensors = {f"{PATH}.weight": weight.half()}
    tensors[f"{PATH}.bias"] = torch.randn(128).half()
    storage = "4bit" if kind == "nf4" else kind
    x = torch.randn(16, 192, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([3, 64, 65, 127])
    with torch.no_grad():
        full = build_layer(storage, tensors, PATH, 192, 128)(x)
        cut, n_in, n_out = restrict(storage, tensors, PATH, 192, 128, False, rows, None)
        part = build_layer(storage, cut, PATH, n_in, n_out)(x)
    torch.testing.assert_close(part, full[:, rows], rtol=1e-5, atol=1e-4)  # GEMM blocking order only


def test_samples_are_seeded_aligned_and_hold_the_special_rows():
    vector = torch.ones(4096)
    vector[[7, 1000]] = torch.tensor([-0.5, 0.0])
    vector[2000], vector[3000] = 3.0, 0.1
    special = special_indices(vector)
    assert set(special.tolist()) == {7, 1000, 2000}  # negative, zero (also the smallest), largest
    rows = sample(4096, 256, "m", seed=0, special=special)
    assert rows is not None and {7, 1000, 2000} <= set(rows.tolist()) and 256 <= rows.numel() <= 259
    assert torch.equal(rows, sample(4096, 256, "m", seed=0, special=special))
    assert not torch.equal(rows, sample(4096, 256, "other", seed=0, special=special))
    chunks = sample(4096, 256, "m", seed=0, chunk=64, special=special)
    assert chunks is not None and chunks.numel() % 64 == 0
    starts = chunks.reshape(-1, 64)
    assert torch.equal(starts, starts[:, :1] + torch.arange(64)) and (starts[:, 0] % 64 == 0).all()
    assert {7, 1000, 2000} <= set(chunks.tolist())
    assert sample(4096, 0, "m", 0) is None and sample(4096, 2048, "m", 0) is None  # everything


def _step(tensors: dict[str, torch.Tensor], vector: torch.Tensor, in_f: int, out_f: int) -> Step:
    key = next(k for k in tensors if ".quant_state." in k)
    info = json.loads(bytes(tensors[key].tolist()).decode())
    module = Module(PATH, "4bit", sorted(tensors), in_f, out_f, False, False, info["quant_type"], info)
    return Step(module, "exact-fold", rows=vector, adapted=True)


def test_a_sampled_check_catches_a_wrong_row():
    out_f, in_f = 1024, 128
    tensors = stored_4bit(torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(4)), "nf4", False)
    vector = 1 + 0.1 * torch.randn(out_f, generator=torch.Generator().manual_seed(5))
    vector[700] = -0.5
    step = _step(tensors, vector, in_f, out_f)
    opts = MergeOptions(check_sample=32)
    good = transform_module(step, tensors, opts)
    rel, _, rows = check_module(step, tensors, good, opts, 6.0)
    assert rel < 1e-6 and 32 <= rows < out_f
    # A merge that lost the sign of row 700 (the kind of bug a fold can have): the sample holds that row.
    bad = dict(good)
    absmax = good[f"{PATH}.weight.absmax"].clone().reshape(out_f, -1)
    absmax[700] = absmax[700].abs()
    bad[f"{PATH}.weight.absmax"] = absmax.reshape(-1)
    assert check_module(step, tensors, bad, opts, 6.0)[0] > 1e-3
    # A merge that forgot the scale everywhere is caught by any sample; every row with check_sample=0.
    untouched = {k: v for k, v in tensors.items()}
    assert check_module(step, tensors, untouched, opts, 6.0)[0] > 1e-2
    assert check_module(step, tensors, good, MergeOptions(check_sample=0), 6.0)[2] == out_f


@pytest.mark.parametrize("storage", ["int8", "nf4", "nf4-dq"])
def test_sampling_changes_the_check_never_the_output(storage, tmp_path):
    base = MODELS / f"llama-{storage}"
    sampled = ia.merge(base, ADAPTERS / "llama", tmp_path / "sampled", check_sample=1)
    full = ia.merge(base, ADAPTERS / "llama", tmp_path / "full", check_sample=0)
    assert {k: v for k, v in digest(tmp_path / "sampled").items() if k != "merge_report.json"} == \
        {k: v for k, v in digest(tmp_path / "full").items() if k != "merge_report.json"}
    out = {m.module: m.rows_checked for m in full.modules}
    rows = {m.module: m.rows_checked for m in sampled.modules}
    assert all(r is not None for r in rows.values()) and sampled.passed
    assert any(rows[m] < out[m] for m in rows), sampled.table()  # some modules were checked on a sample
    assert all(m.rel_error < 1e-5 for m in sampled.modules)
    reader = CheckpointReader(tmp_path / "sampled")
    assert "model.layers.0.mlp.up_proj.weight" in reader


def test_cli_check_sample_option(tmp_path):
    from click.testing import CliRunner

    from ia3convert.cli import main

    result = CliRunner().invoke(main, ["merge", str(MODELS / "llama-int8"), str(ADAPTERS / "llama"),
                                       str(tmp_path / "m"), "--check-sample", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert all(m["rows_checked"] for m in report["modules"])
    bad = CliRunner().invoke(main, ["merge", str(MODELS / "llama-int8"), str(ADAPTERS / "llama"),
                                    str(tmp_path / "n"), "--check-sample", "-1"])
    assert bad.exit_code == 2 and not (tmp_path / "n").exists()


def test_absmax_of_nested_layers_is_what_bitsandbytes_dequantizes_with():
    tensors = stored_4bit(torch.randn(64, 128), "nf4", True)
    stats = {k[len(PATH) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(f"{PATH}.weight.")}
    packed = four_bit.Packed4bit(tensors[f"{PATH}.weight"], stats)
    plain = four_bit.denest(packed)
    assert torch.equal(bnb_dequantized(tensors),
                       bnb_dequantized({f"{PATH}.weight": plain.codes,
                                        **{f"{PATH}.weight.{k}": v for k, v in plain.stats.items()}}))
