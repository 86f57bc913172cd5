"""The lazy reader and the streaming writer, checked with safetensors' own loader."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from conftest import ADAPTERS, MODELS
from safetensors.torch import load_file
from test_merge import digest

import ia3convert as ia
from ia3convert import checkpoint
from ia3convert.checkpoint import CheckpointReader, PlannedTensor, StreamingWriter, parse_size
from ia3convert.errors import CheckpointError, OutputError


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(33, 17, generator=g),
        "h": torch.randn(100, generator=g).half(),
        "b": torch.randn(9, generator=g).bfloat16(),
        "i": torch.randint(-127, 127, (5, 3), dtype=torch.int8, generator=g),
        "scalar": torch.tensor(3, dtype=torch.uint8),
        "state": torch.tensor(list(b'{"quant_type": "nf4"}'), dtype=torch.uint8),
    }


@pytest.mark.parametrize("max_shard", [10**9, 200])
def test_writer_output_loads_in_safetensors(tmp_path, max_shard):
    tensors = sample_tensors()
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape), max_bytes=64 if k == "state" else None)
            for k, v in tensors.items()]
    writer = StreamingWriter(tmp_path, plan, max_shard)
    for key in reversed(list(tensors)):  # any order
        writer.write(key, tensors[key])
    files = writer.close()
    loaded = {}
    for name in files:
        loaded.update(load_file(tmp_path / name))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
    if max_shard < 1000:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == sorted(files) and len(files) > 1


def test_writer_refuses_unplanned_or_missing(tmp_path):
    writer = StreamingWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,))], 10**9)
    with pytest.raises(ValueError, match="planned"):
        writer.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def test_reader_reads_what_safetensors_reads():
    reader = CheckpointReader(MODELS / "llama-nf4")
    reference = load_file(MODELS / "llama-nf4" / "model.safetensors")
    assert set(reader.tensors) == set(reference)
    assert all(torch.equal(reader.get(k), reference[k]) for k in reference)
    assert [p.name for p in reader.other_files()] == ["generation_config.json", "tokenizer.json",
                                                      "tokenizer_config.json"]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:4], "too short"),
    (lambda b: struct.pack("<Q", 10**12) + b[8:], "header length"),
    (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
    (lambda b: b[: len(b) // 2], "offsets outside the file"),
])
def test_damaged_files_are_named(tmp_path, damage, message):
    folder = tmp_path / "base"
    shutil.copytree(MODELS / "llama-int8", folder)
    target = folder / "model.safetensors"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        CheckpointReader(folder)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("40KB") == 40_000
    with pytest.raises(OutputError):
        parse_size("lots")


@pytest.mark.parametrize("storage", ["nf4", "int8", "fp16"])
def test_mapped_reads_are_the_stored_tensors(storage, monkeypatch):
    """Large tensors are memory-mapped (the fixtures' are all small: every tensor is mapped here)."""
    expected = load_file(MODELS / f"llama-{storage}" / "model.safetensors")
    monkeypatch.setattr(checkpoint, "MAP_MIN", 1)
    reader = CheckpointReader(MODELS / f"llama-{storage}")
    for key, tensor in expected.items():
        got = reader.get(key)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), key
    assert reader.bytes_read == sum(t.numel() * t.element_size() for t in expected.values())


def test_a_file_cut_short_after_opening_is_named(tmp_path, monkeypatch):
    shutil.copytree(MODELS / "llama-fp16", tmp_path / "m")
    reader = CheckpointReader(tmp_path / "m")
    last = max(reader.tensors.values(), key=lambda info: info.end)
    with open(last.file, "r+b") as f:
        f.truncate(last.start + 1)
    monkeypatch.setattr(checkpoint, "MAP_MIN", 1)
    with pytest.raises(CheckpointError, match=f"cannot map {last.key}"):
        reader.get(last.key)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_merges_through_maps_and_either_copy_path_write_the_same_bytes(kernel_copy, tmp_path, monkeypatch):
    """Untouched tensors are copied in the kernel where the file systems allow, else through a buffer."""
    ia.merge(MODELS / "llama-nf4", ADAPTERS / "llama", tmp_path / "plain")
    monkeypatch.setattr(checkpoint, "MAP_MIN", 1)
    monkeypatch.setattr(checkpoint, "_KERNEL_COPY", [kernel_copy])
    ia.merge(MODELS / "llama-nf4", ADAPTERS / "llama", tmp_path / "other")
    assert {k: v for k, v in digest(tmp_path / "plain").items() if k != "merge_report.json"} == \
        {k: v for k, v in digest(tmp_path / "other").items() if k != "merge_report.json"}
