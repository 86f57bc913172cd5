"""Re-encoded weights are processed in row chunks (decode, scale, encode a chunk at a time): the bytes must be
those of the whole-weight path, for every storage, Conv1D orientation and block layout."""

from __future__ import annotations

import pytest
from conftest import ADAPTERS, MODELS
from test_merge import digest

import ia3convert as ia
import ia3convert.merging as merging

CASES = [
    ("llama-int8", "llama", {"requantize": True}),
    ("llama-nf4", "llama", {"requantize": True}),
    ("llama-fp4", "llama", {"fold": False}),
    ("llama-nf4-dq", "llama", {"requantize": True}),
    ("opt-nf4", "opt", {"fold": False}),  # fc2's 96 inputs straddle 4-bit blocks: transformed whole
    ("gpt2-int8", "gpt2", {}),
    ("llama-fp16", "llama", {"quantize": "nf4", "double_quant": True}),
    ("opt-fp16", "opt", {"quantize": "fp4"}),
    ("gpt2-fp16", "gpt2", {"quantize": "nf4"}),  # Conv1D stored [in, out]
    ("gpt2-fp16", "gpt2", {"quantize": "int8"}),
]


@pytest.mark.parametrize("base, arch, options", CASES)
def test_chunked_transform_writes_the_bytes_of_the_whole_one(base, arch, options, tmp_path, monkeypatch):
    whole = ia.merge(MODELS / base, ADAPTERS / arch, tmp_path / "whole", **options)
    calls = []
    original = merging._transform_in_chunks

    def counting(step, tensors, opts, chunk_rows):
        calls.append((step.module.path, chunk_rows))
        return original(step, tensors, opts, chunk_rows)

    monkeypatch.setattr(merging, "CHUNK_ELEMENTS", 700)  # a few rows per chunk for the fixtures' layers
    monkeypatch.setattr(merging, "_transform_in_chunks", counting)
    chunked = ia.merge(MODELS / base, ADAPTERS / arch, tmp_path / "chunked", **options)
    straddling = base == "opt-nf4"
    assert bool(calls) != straddling, calls
    assert all(rows < 64 for _, rows in calls)
    assert {k: v for k, v in digest(tmp_path / "whole").items() if k != "merge_report.json"} == \
        {k: v for k, v in digest(tmp_path / "chunked").items() if k != "merge_report.json"}
    assert [(m.module, m.transform, m.rel_error) for m in whole.modules] == \
        [(m.module, m.transform, m.rel_error) for m in chunked.modules]
