"""--device: cpu, cuda, auto. Where CUDA is present, a merge on the GPU (bitsandbytes' CUDA kernels for
decoding, encoding and the check) writes the same bytes as on the CPU; where it is not, asking for it is a
clear error and auto falls back to the CPU."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, MODELS
from test_merge import digest

import ia3convert as ia
from ia3convert.cli import main

HAS_CUDA = torch.cuda.is_available()


def weights(folder) -> dict[str, str]:
    """Every output file but the report (which records the options, device included)."""
    return {k: v for k, v in digest(folder).items() if k != "merge_report.json"}


# Exact folds, requantization (4-bit and int8, straddling blocks in OPT's fc2) and --quantize from float.
CASES = [
    ("llama-nf4", "llama", {}),
    ("llama-nf4-dq", "llama", {"requantize": True}),
    ("llama-int8", "llama", {"requantize": True}),
    ("opt-fp4", "opt", {"fold": False}),
    ("gpt2-int8", "gpt2", {}),
    ("llama-fp16", "llama", {"quantize": "nf4", "double_quant": True}),
    ("gpt2-fp16", "gpt2", {"quantize": "int8"}),
    ("bert-fp16", "bert", {"quantize": "fp4"}),
]


@pytest.mark.parametrize("base, arch, options", CASES)
def test_auto_device_writes_the_bytes_of_the_cpu(base, arch, options, tmp_path):
    """On a GPU machine auto is CUDA, so this compares the GPU's bytes with the CPU's; elsewhere both are the
    CPU and it checks that auto resolves there."""
    on_cpu = ia.merge(MODELS / base, ADAPTERS / arch, tmp_path / "cpu", device="cpu", **options)
    auto = ia.merge(MODELS / base, ADAPTERS / arch, tmp_path / "auto", device="auto", **options)
    assert on_cpu.passed and auto.passed
    assert weights(tmp_path / "cpu") == weights(tmp_path / "auto")
    assert [m.transform for m in on_cpu.modules] == [m.transform for m in auto.modules]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("base, arch, options", CASES)
def test_cuda_writes_the_bytes_of_the_cpu(base, arch, options, tmp_path):
    ia.merge(MODELS / base, ADAPTERS / arch, tmp_path / "cpu", device="cpu", **options)
    report = ia.merge(MODELS / base, ADAPTERS / arch, tmp_path / "cuda", device="cuda", check_sample=0, **options)
    assert report.passed, report.table()
    assert weights(tmp_path / "cpu") == weights(tmp_path / "cuda")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["merge", str(MODELS / "llama-nf4"), str(ADAPTERS / "llama"),
                                       str(tmp_path / "m"), "--device", "cuda"])
    assert result.exit_code == 6
    assert "--device cuda: no such CUDA device here" in result.output and "--device cpu" in result.output
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["tpu", "nonsense:x"])
def test_unknown_devices_are_refused(device, tmp_path):
    result = CliRunner().invoke(main, ["merge", str(MODELS / "llama-nf4"), str(ADAPTERS / "llama"),
                                       str(tmp_path / "m"), "--device", device])
    assert result.exit_code == 6 and f"--device {device!r}" in result.output
    assert list(tmp_path.iterdir()) == []
