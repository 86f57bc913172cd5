"""IA3 wrappers around Linear layers: plain ``nn.Linear``/GPT-2 ``Conv1D`` and bitsandbytes' int8 and 4-bit.

The math is PEFT's: a feed-forward module scales its input, ``y = base(x * l)``; any other module scales its
output, ``y = base(x) * l``; several active adapters multiply their vectors (in activation order). What we
do differently from PEFT:
- the wrapper is chosen from the layer's type (``wrapper_class_for``), never from flags on the model;
- with autocast off, the output has the input's dtype (PEFT's bitsandbytes wrappers leak float32 for
  fp16/bf16 inputs, which breaks half-precision models at the next layer);
- half-precision inputs are scaled and fed to the bitsandbytes layer in float32, as PEFT does.

The forward here is the ground truth that every later accuracy check (merge, fold) compares against.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .errors import TargetError


def _bnb_types() -> tuple[type, type] | None:
    """bitsandbytes' (Linear8bitLt, Linear4bit), or None when bitsandbytes was never imported.

    A model can only hold bitsandbytes layers once bitsandbytes is imported, so this never imports it
    (its import costs seconds).
    """
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    return bnb.nn.Linear8bitLt, bnb.nn.Linear4bit


def _is_conv1d(module: nn.Module) -> bool:
    """True for transformers' GPT-2 style ``Conv1D`` (weight stored as ``[in, out]``)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, bitsandbytes Linear or Conv1D."""
    if _is_conv1d(base_layer):
        in_features, out_features = base_layer.weight.shape
        return int(in_features), int(out_features)
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    raise TargetError(f"{type(base_layer).__name__} is not a Linear or Conv1D layer",
                      hint="IA3 applies to Linear, Conv1D and bitsandbytes Linear layers only")


class IA3Layer(nn.Module):
    """Common state of every IA3 wrapper: the frozen base layer, one vector per adapter, which are active.

    ``ia3_l[name]`` has PEFT's shape: ``(1, in_features)`` for a feed-forward (input-scaled) module,
    ``(out_features, 1)`` otherwise.
    """

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        self.in_features, self.out_features = layer_features(base_layer)
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        for param in base_layer.parameters():
            param.requires_grad = False

    def get_base_layer(self) -> nn.Module:
        """The wrapped layer."""
        return self.base_layer

    @property
    def vector_shape(self) -> tuple[int, int]:
        """Shape of this module's IA3 vectors, as PEFT stores them."""
        return (1, self.in_features) if self.is_feedforward else (self.out_features, 1)

    def update_layer(self, adapter_name: str, init_ia3_weights: bool = True) -> None:
        """Add a vector for ``adapter_name``: ones (no change) by default, else random normal values."""
        weight = torch.ones(self.vector_shape) if init_ia3_weights else torch.randn(self.vector_shape)
        self.ia3_l[adapter_name] = nn.Parameter(weight.to(self._device()))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def _device(self) -> torch.device:
        for tensor in self.base_layer.parameters():
            return tensor.device
        return torch.device("cpu")

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters the active ones (their product scales the layer)."""
        self.active_adapters = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop one adapter's vector."""
        del self.ia3_l[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def scaling(self) -> torch.Tensor | None:
        """Product of the active vectors, flattened; None when adapters are off or none is active here."""
        if self.disable_adapters:
            return None
        result = None
        for name in self.active_adapters:
            if name in self.ia3_l:
                vector = self.ia3_l[name].flatten()
                result = vector if result is None else result * vector
        return result

    def extra_repr(self) -> str:
        side = "input" if self.is_feedforward else "output"
        return f"scales={side}, adapters={list(self.ia3_l.keys())}, active={self.active_adapters}"


class Linear(IA3Layer):
    """IA3 around ``nn.Linear`` or GPT-2 ``Conv1D`` (for which rows and columns of the weight swap)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool,
                 init_ia3_weights: bool = True, **kwargs: Any) -> None:
        super().__init__(base_layer, is_feedforward)
        self.fan_in_fan_out = _is_conv1d(base_layer)
        self.update_layer(adapter_name, init_ia3_weights)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scaling = self.scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            scaled = (x.to(scaling.dtype) * scaling).to(x.dtype)
            return self.base_layer(scaled, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        return (result * scaling).to(result.dtype)


class _QuantizedLinear(IA3Layer):
    """Shared forward of the bitsandbytes wrappers: float32 compute for half inputs, input dtype out."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, is_feedforward: bool,
                 init_ia3_weights: bool = True, **kwargs: Any) -> None:
        super().__init__(base_layer, is_feedforward)
        self.update_layer(adapter_name, init_ia3_weights)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scaling = self.scaling()
        if scaling is None:
            return self.base_layer(x, *args, **kwargs)
        input_dtype = x.dtype
        convert = not torch.is_autocast_enabled() and input_dtype != torch.float32
        if convert:
            x = x.float()
        if self.is_feedforward:
            result = self.base_layer(x * scaling, *args, **kwargs)
        else:
            result = self.base_layer(x, *args, **kwargs) * scaling
        return result.to(input_dtype) if convert else result


class Linear8bitLt(_QuantizedLinear):
    """IA3 around ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8)."""


class Linear4bit(_QuantizedLinear):
    """IA3 around ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4, nested or not)."""


def wrapper_class_for(module: nn.Module) -> type[IA3Layer]:
    """The IA3 wrapper for a layer, chosen by its type (never by model flags)."""
    bnb = _bnb_types()
    if bnb is not None:
        int8_type, four_bit_type = bnb
        if isinstance(module, int8_type):
            return Linear8bitLt
        if isinstance(module, four_bit_type):
            return Linear4bit
    if isinstance(module, nn.Linear) or _is_conv1d(module):
        return Linear
    raise TargetError(f"{type(module).__name__} is not a Linear or Conv1D layer",
                      hint="IA3 applies to Linear, Conv1D and bitsandbytes Linear layers only")


def storage_of(module: nn.Module) -> str:
    """A short name for how a (wrapped) layer stores its weight: float16, int8, nf4, fp4, ..."""
    base = module.get_base_layer() if isinstance(module, IA3Layer) else module
    bnb = _bnb_types()
    if bnb is not None and isinstance(base, bnb[0]):
        return "int8"
    if bnb is not None and isinstance(base, bnb[1]):
        quant_type = getattr(base.weight, "quant_type", "4bit")
        state = getattr(base.weight, "quant_state", None)
        nested = bool(getattr(state, "nested", False))
        return f"{quant_type}+dq" if nested else quant_type
    return str(base.weight.dtype).removeprefix("torch.")
