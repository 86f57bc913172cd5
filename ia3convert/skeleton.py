"""A model's module structure without its weights: built on the meta device from config.json.

The checkpoint alone cannot say whether a 2-D tensor is a Linear, a GPT-2 Conv1D (stored transposed) or an
embedding, nor which Linears transformers would quantize. The skeleton answers both at no memory cost, and
the choice of modules to quantize is made by transformers' own functions, so it is the one it makes on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .layers import _is_conv1d

# Model types whose fold rules need only what config.json always holds for them (model_type, heads, KV heads,
# activation names): a quantized base of these types merges without importing transformers (see ``lean``).
LEAN_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"})


class RawConfig:
    """config.json's values as attributes (None where absent): what the folds read of a ``LEAN_TYPES`` model,
    without importing transformers (seconds and ~100 MB) to build its config class."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._values.get(name)


def lean_config(config: dict[str, Any]) -> RawConfig | None:
    """A ``RawConfig`` when this quantized model's structure can be read without transformers, else None."""
    if not config.get("quantization_config") or config.get("model_type") not in LEAN_TYPES \
            or not isinstance(config.get("num_attention_heads"), int):
        return None
    return RawConfig(config)


def quantized_modules(tensor_keys: Iterable[str]) -> dict[str, bool]:
    """The bitsandbytes-quantized Linear modules of a checkpoint, known from their stored statistics (``SCB``
    for int8, a quant state for 4-bit), in the form of ``linear_modules`` (none is a float Conv1D)."""
    found = {}
    for key in tensor_keys:
        if key.endswith(".SCB"):
            found[key[: -len(".SCB")]] = False
        elif ".weight.quant_state.bitsandbytes__" in key:
            found[key.split(".weight.quant_state.")[0]] = False
    return found


def build_skeleton(path: str | Path) -> nn.Module:
    """The model class named in ``path``/config.json, instantiated on the meta device (no weights)."""
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{Path(path) / 'config.json'}: not a config transformers understands ({exc})",
                              hint="check model_type and the transformers version") from None
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    try:
        with torch.device("meta"):
            if cls is not None:
                return cls(config)
            return transformers.AutoModel.from_config(config)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot build the model structure from config.json ({exc})",
                              hint="check the config and the transformers version") from None


def linear_modules(skeleton: nn.Module) -> dict[str, bool]:
    """Every Linear or Conv1D module path, mapped to True for a Conv1D (weight stored as [in, out])."""
    found = {}
    for name, module in skeleton.named_modules():
        if _is_conv1d(module):
            found[name] = True
        elif isinstance(module, nn.Linear):
            found[name] = False
    return found


def modules_to_quantize(skeleton: nn.Module, quantization_config) -> set[str]:
    """The module paths transformers turns into bitsandbytes layers when it loads this model quantized."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    skip = HfQuantizer.get_modules_to_not_convert(
        skeleton, quantization_config.llm_int8_skip_modules, getattr(skeleton, "_keep_in_fp32_modules", None))
    converted = replace_with_bnb_linear(skeleton, modules_to_not_convert=skip,
                                        quantization_config=quantization_config, pre_quantized=True)
    return {name for name, m in converted.named_modules() if type(m).__module__.startswith("bitsandbytes")}
