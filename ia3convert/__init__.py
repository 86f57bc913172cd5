"""ia3convert: (IA)^3 adapters on bitsandbytes-quantized models: wrap, load, save and merge.

The public API is importable from the package root. Names are resolved on first use so that
``import ia3convert`` (and ``ia3convert --help``) does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "IA3Config": "config",
    "DEFAULT_TARGETS": "config",
    "Adapter": "adapter",
    "read_adapter": "adapter",
    "list_adapters": "adapter",
    "IA3Layer": "layers",
    "Linear": "layers",
    "Linear8bitLt": "layers",
    "Linear4bit": "layers",
    "wrap_model": "wrap",
    "add_adapter": "wrap",
    "load_adapter": "wrap",
    "set_adapter": "wrap",
    "adapter_names": "wrap",
    "adapters_disabled": "wrap",
    "set_adapters_enabled": "wrap",
    "delete_adapter": "wrap",
    "unwrap_model": "wrap",
    "get_adapter": "wrap",
    "save_adapters": "wrap",
    "ia3_layers": "wrap",
    "target_modules": "wrap",
    "prepare_model_for_kbit_training": "training",
    "load_model": "loading",
    "merge": "merging",
    "Job": "batch",
    "JobResult": "batch",
    "BatchReport": "batch",
    "run_batch": "batch",
    "load_manifest": "batch",
    "MergeReport": "verify",
    "ModuleReport": "verify",
    "push": "hub",
    "PushResult": "hub",
    "validate": "validation",
    "ValidationReport": "validation",
    "Finding": "validation",
    "resave": "resaving",
    "ResaveResult": "resaving",
    "MergeCheckError": "errors",
    "HubError": "errors",
    "IA3ConvertError": "errors",
    "AdapterError": "errors",
    "CheckpointError": "errors",
    "TargetError": "errors",
    "OutputError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ia3convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
