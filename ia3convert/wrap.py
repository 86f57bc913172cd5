"""Put IA3 wrappers into a live transformers model, switch adapters, and take the wrappers out again.

A model keeps its adapters' configs in ``model.ia3_configs`` (name -> ``IA3Config``) and the active names in
``model.ia3_active``. Every wrapped module is an ``IA3Layer`` (see ``layers``) whose wrapper class follows
from the layer's type, so an int8 or 4-bit layer gets the quantized wrapper whatever flags the model has.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .adapter import DEFAULT_ADAPTER, Adapter, check_adapter_name, read_adapter
from .config import ALL_LINEAR, IA3Config
from .errors import AdapterError, TargetError
from .layers import IA3Layer, _is_conv1d, layer_features, wrapper_class_for


def ia3_layers(model: nn.Module) -> dict[str, IA3Layer]:
    """Every IA3-wrapped module of the model, by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Layer)}


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to the model, in the order they were added."""
    return list(getattr(model, "ia3_configs", {}))


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Module paths a config can target: wrappers count as their base layer; nothing inside them does."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, IA3Layer):
            inside.append(name)
        yield name, module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, IA3Layer)) or _is_conv1d(module)


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def target_modules(model: nn.Module, config: IA3Config) -> dict[str, bool]:
    """Module paths the config selects in this model, each mapped to "scales its input" (feed-forward).

    Applies PEFT's defaults for the model type, expands ``all-linear`` (every Linear/Conv1D but the output
    embedding), and raises ``TargetError`` when nothing matches or a match is not a Linear.
    """
    resolved = config.with_defaults(_model_type(model))
    candidates = dict(_candidate_modules(model))
    if resolved.target_modules == ALL_LINEAR:
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        selected = [p for p, m in candidates.items()
                    if _is_linear(m) and m is not output and not resolved.is_excluded(p)]
    else:
        selected = [p for p in candidates if resolved.is_target(p)]
    if not selected:
        sample = ", ".join(p for p, m in list(candidates.items()) if _is_linear(m))[:300]
        raise TargetError(
            f"target_modules {resolved.target_modules!r} match no module of this "
            f"{type(model).__name__}",
            hint=f"name modules that exist, e.g. {sample or 'none'}",
        )
    for path in selected:
        if not _is_linear(candidates[path]):
            raise TargetError(f"module {path} matches target_modules but is a {type(candidates[path]).__name__}",
                              hint="IA3 wraps Linear/Conv1D layers only; narrow target_modules")
    return {path: resolved.is_feedforward(path) for path in selected}


def _check_attach(model: nn.Module, plan: dict[str, bool], adapter_name: str) -> None:
    """Refuse, before anything changes, an adapter that cannot sit on these modules (name taken, sides differ)."""
    check_adapter_name(adapter_name)
    if adapter_name in adapter_names(model):
        raise TargetError(f"the model already has an adapter named {adapter_name!r}",
                          hint="choose another adapter name, or delete_adapter() first")
    sides = {True: "input", False: "output"}
    for path, is_feedforward in plan.items():
        module = model.get_submodule(path)
        if isinstance(module, IA3Layer) and module.is_feedforward != is_feedforward:
            raise TargetError(
                f"module {path} scales its {sides[module.is_feedforward]} for adapter(s) "
                f"{list(module.ia3_l)}, but adapter {adapter_name!r} scales its {sides[is_feedforward]}",
                hint="adapters that share a module must scale the same side of it",
            )


def _attach(model: nn.Module, path: str, is_feedforward: bool, adapter_name: str, init: bool) -> IA3Layer:
    module = model.get_submodule(path)
    if isinstance(module, IA3Layer):
        module.update_layer(adapter_name, init)
        return module
    wrapper = wrapper_class_for(module)(module, adapter_name, is_feedforward, init_ia3_weights=init)
    _replace(model, path, wrapper)
    return wrapper


def _register(model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    configs = getattr(model, "ia3_configs", None)
    if configs is None:
        configs = {}
        model.ia3_configs = configs
        model.ia3_active = [adapter_name]
        # Freeze everything; only IA3 vectors will train (as PEFT does).
        for param in model.parameters():
            param.requires_grad = False
        # transformers' Trainer refuses a quantized model unless it is told that adapters are attached.
        if getattr(model, "hf_quantizer", None) is not None:
            model._hf_peft_config_loaded = True
    configs[adapter_name] = config


def wrap_model(model: nn.Module, config: IA3Config, adapter_name: str = DEFAULT_ADAPTER) -> list[str]:
    """Wrap the modules ``config`` targets with IA3 layers and add the adapter ``adapter_name``.

    On a model that already has adapters this adds another one (not active until ``set_adapter``), as PEFT's
    ``add_adapter`` does. Returns the wrapped module paths.
    """
    targets = target_modules(model, config)
    _check_attach(model, targets, adapter_name)
    _register(model, config, adapter_name)
    for path, is_ff in targets.items():
        _attach(model, path, is_ff, adapter_name, config.init_ia3_weights)
    set_adapter(model, model.ia3_active)
    return sorted(targets)


add_adapter = wrap_model


def load_adapter(model: nn.Module, adapter: Adapter | str | Path, adapter_name: str | None = None,
                 *, select: str | None = None, is_trainable: bool = False) -> list[str]:
    """Attach a saved adapter (a directory, or an ``Adapter``) to the model and load its vectors.

    ``select`` picks an adapter of a multi-adapter directory; ``adapter_name`` is the name it gets in the
    model (by default its own name). The modules wrapped are exactly those the file has vectors for, each
    scaling the side its vector's shape says. As with PEFT, a loaded adapter is frozen unless
    ``is_trainable``. Returns the wrapped module paths.
    """
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter, select)
    name = adapter_name or adapter.name
    config = replace(adapter.config, inference_mode=not is_trainable)
    modules = dict(_candidate_modules(model))
    plan = {path: adapter.is_feedforward(path) for path in sorted(adapter.vectors)}
    for path, is_feedforward in plan.items():
        module = modules.get(path)
        if module is None:
            raise TargetError(f"adapter module {path} does not exist in this {type(model).__name__}",
                              hint="load the adapter onto the base model it was trained for")
        if not _is_linear(module):
            raise TargetError(f"adapter module {path} is a {type(module).__name__}, not a Linear",
                              hint="load the adapter onto the base model it was trained for")
        in_features, out_features = layer_features(module.get_base_layer() if isinstance(module, IA3Layer)
                                                   else module)
        expected = (1, in_features) if is_feedforward else (out_features, 1)
        if tuple(adapter.vectors[path].shape) != expected:
            raise TargetError(
                f"adapter module {path}: vector shape {tuple(adapter.vectors[path].shape)} does not fit the "
                f"layer (expected {expected})",
                hint="load the adapter onto the base model it was trained for",
            )
    _check_attach(model, plan, name)
    _register(model, config, name)
    for path, vector in sorted(adapter.vectors.items()):
        layer = _attach(model, path, plan[path], name, init=True)
        with torch.no_grad():
            layer.ia3_l[name].copy_(vector)
    set_adapter(model, model.ia3_active)
    return sorted(adapter.vectors)


def set_adapter(model: nn.Module, active: str | list[str]) -> None:
    """Activate these adapters (their vectors multiply where they share a module); only they train."""
    names = [active] if isinstance(active, str) else list(active)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterError(f"no adapter named {unknown[0]!r} on this model (found: {', '.join(known) or 'none'})",
                           hint="pick one of the names found")
    model.ia3_active = names
    for layer in ia3_layers(model).values():
        layer.set_adapter(names)
        for name, param in layer.ia3_l.items():
            param.requires_grad = name in names and not model.ia3_configs[name].inference_mode


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside this block; adapters come back afterwards."""
    layers = ia3_layers(model).values()
    previous = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.disable_adapters = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.disable_adapters = state


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every IA3 layer of the model on or off (off = the base model's output)."""
    for layer in ia3_layers(model).values():
        layer.disable_adapters = not enabled


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove one adapter; modules left without any adapter are unwrapped."""
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"no adapter named {adapter_name!r} on this model", hint="pick one of adapter_names()")
    for path, layer in ia3_layers(model).items():
        if adapter_name in layer.ia3_l:
            layer.delete_adapter(adapter_name)
            if not layer.ia3_l:
                _replace(model, path, layer.get_base_layer())
    del model.ia3_configs[adapter_name]
    remaining = [n for n in model.ia3_active if n != adapter_name] or adapter_names(model)[:1]
    if remaining:
        set_adapter(model, remaining)
    else:
        _forget(model)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, module)


def _forget(model: nn.Module) -> None:
    for attr in ("ia3_configs", "ia3_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


def unwrap_model(model: nn.Module) -> nn.Module:
    """Take every IA3 wrapper out, putting the original layers back (weights untouched). Returns the model."""
    for path, layer in ia3_layers(model).items():
        _replace(model, path, layer.get_base_layer())
    _forget(model)
    return model


def get_adapter(model: nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> Adapter:
    """The adapter's current vectors (detached copies on the CPU) and config, ready to save."""
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"no adapter named {adapter_name!r} on this model", hint="pick one of adapter_names()")
    vectors = {path: layer.ia3_l[adapter_name].detach().to("cpu", copy=True)
               for path, layer in ia3_layers(model).items() if adapter_name in layer.ia3_l}
    config = model.ia3_configs[adapter_name]
    return Adapter(config=config, vectors=vectors, name=adapter_name)


def save_adapters(model: nn.Module, out_dir: str | Path, names: list[str] | None = None) -> list[Path]:
    """Save adapters as PEFT does: ``default`` at the root of ``out_dir``, any other name in a sub-folder."""
    out_dir = Path(out_dir)
    written = []
    for name in names or adapter_names(model):
        adapter = get_adapter(model, name)
        written.append(adapter.save(out_dir if name == DEFAULT_ADAPTER else out_dir / name))
    return written
