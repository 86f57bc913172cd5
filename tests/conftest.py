"""Shared helpers: fixture paths, loading models as users do, and comparing outputs."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
MODELS = FIXTURES / "models"
ADAPTERS = FIXTURES / "adapters"
ARCHS = ("llama", "opt", "gpt2", "bert")
STORAGES = ("fp16", "int8", "nf4", "fp4", "nf4-dq")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers():
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


def load(arch: str, storage: str, dtype: torch.dtype | None = None):
    """The fixture model as a user loads it (quantized ones keep their saved quantization)."""
    from ia3convert import load_model

    return load_model(MODELS / f"{arch}-{storage}", dtype=dtype).eval()


def upcast(model, dtype: torch.dtype = torch.float32):
    """Float parameters to ``dtype`` (quantized ones untouched). float32 is the setting in which PEFT's bnb
    wrappers work at all, and the one in which we compare with PEFT bit for bit. (transformers keeps the
    saved dtype of a pre-quantized checkpoint's float parts whatever ``dtype`` is asked at load time.)"""
    for param in model.parameters():
        if param.is_floating_point() and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)
    return model


def sample_ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, 260, (2, n), generator=generator)


def output(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rel_err(candidate: torch.Tensor, truth: torch.Tensor) -> float:
    return ((candidate.double() - truth.double()).abs().max() / truth.double().abs().max()).item()
