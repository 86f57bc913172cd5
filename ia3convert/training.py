"""Getting a quantized model ready for IA3 training: the k-bit preparation people use before fine-tuning."""

from __future__ import annotations

import torch
from torch import nn


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = False) -> nn.Module:
    """Freeze the base model, keep its float parts (norms, embeddings, heads) in float32, and let gradients
    reach the inputs so that adapters deep in a frozen model still get them.

    Quantized weights (int8 codes, packed 4-bit) are left as they are. Returns the same model.
    """
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
