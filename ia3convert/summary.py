"""What wrapping a model with an adapter does: the modules it touches and how much the output moves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .adapter import read_adapter
from .layers import storage_of
from .loading import load_model
from .wrap import adapters_disabled, ia3_layers, load_adapter


def _encode(base: Path, prompt: str) -> torch.Tensor:
    """Token ids for the prompt from the base's tokenizer; the prompt's bytes when the base ships none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(base)(prompt, return_tensors="pt")["input_ids"]
    except (OSError, ValueError):
        return torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long)


def wrap_summary(base: str | Path, adapter: str | Path, adapter_name: str | None = None,
                 prompt: str = "Hello") -> dict[str, Any]:
    """Load ``base``, attach ``adapter`` and report each wrapped module and the output change on ``prompt``."""
    loaded = read_adapter(adapter, adapter_name)
    model = load_model(base)
    load_adapter(model, loaded)
    rows = []
    for path, layer in sorted(ia3_layers(model).items()):
        vector = layer.ia3_l[loaded.name].detach().float()
        rows.append({
            "module": path, "wrapper": type(layer).__name__, "storage": storage_of(layer),
            "scales": "input" if layer.is_feedforward else "output", "size": vector.numel(),
            "min": vector.min().item(), "mean": vector.mean().item(), "max": vector.max().item(),
        })
    ids = _encode(Path(base), prompt)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab:
        ids = ids.clamp(max=vocab - 1)

    def run() -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=ids)
        return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()

    adapted = run()
    with adapters_disabled(model):
        plain = run()
    change = (adapted - plain).abs().max().item()
    return {
        "model": type(model).__name__, "adapter": loaded.name, "modules": rows,
        "max_abs_change": change, "relative_change": change / max(plain.abs().max().item(), 1e-30),
    }
