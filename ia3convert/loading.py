"""Loading a base model directory with transformers, as the user would, with errors a person can act on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError


def load_model(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a checkpoint directory on the CPU with the class its config names (quantized ones as saved).

    ``dtype`` sets the dtype of the non-quantized parts; by default they keep the saved dtype.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise CheckpointError(f"{path}: {what}", hint="give a model directory saved by transformers")
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / 'config.json'}: cannot be read ({exc})",
                              hint="fix or re-save the model config") from None
    method = (getattr(config, "quantization_config", None) or {}).get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise CheckpointError(f"{path}: quantized with {method}, not bitsandbytes",
                              hint="ia3convert handles float, int8 (LLM.int8) and 4-bit (NF4/FP4) checkpoints")
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    if cls is None:
        cls = transformers.AutoModel
    transformers.logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, device_map="cpu", dtype=dtype)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({first})",
                              hint="check that the checkpoint is complete and bitsandbytes is installed") from None
