"""Check an IA3 adapter, alone or against a base checkpoint, and say what is wrong and how to fix it.

(Named ``validation`` so that the package attribute ``ia3convert.validate`` stays the function.)

Alone, the adapter's config must be an IA3 config with well-formed fields, and its tensors IA3 vectors of
PEFT's keys, shapes and a floating dtype, agreeing with the config and finite; suspicious values (all ones,
zeros, negatives, extreme magnitudes) and unknown config keys are warnings. Against a base, every adapted
module must be a Linear/Conv1D of the base whose feature count matches its vector, stored in a way we can
merge, and the config's targets should select exactly the modules that have vectors. The base is judged
from config.json and safetensors headers only: no tensor data is read, so a 70B checkpoint takes seconds.

``validate`` raises the usual ``AdapterError``/``CheckpointError``/``HubError`` only when an input cannot be
read at all (the CLI exits 2 then); everything else becomes a ``Finding`` of the report.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import CONFIG_NAME, Adapter, _adapter_dir, _module_path, _read_tensors, vector_problem
from .checkpoint import CheckpointReader
from .config import ALL_LINEAR, IA3Config, read_config_json
from .errors import AdapterError, CheckpointError
from .layers import layer_features

SEVERITIES = ("error", "warning", "info")
LARGE_SCALE = 100.0  # |scale| beyond this is far from anything IA3 training produces
SMALL_SCALE = 1e-3  # a non-zero |scale| below this nearly switches a feature off
_STATE_MARK = ".weight.quant_state.bitsandbytes__"
_TEXT_FIELDS = ("task_type", "base_model_name_or_path", "revision", "peft_version")


@dataclass(frozen=True)
class Finding:
    """One thing found: ``severity`` (error, warning, info), ``where`` (module path, tensor key, config field or
    file), what is wrong, and what to do about it."""

    severity: str
    where: str
    message: str
    fix: str = ""

    def line(self) -> str:
        """``<severity>: <where>: <message> (<fix>)``, the CLI's line for this finding."""
        text = f"{self.severity}: {self.where}: {self.message}"
        return f"{text} ({self.fix})" if self.fix else text


@dataclass
class ValidationReport:
    """Everything ``validate`` found about one adapter (and its fit to a base). ``ok``: no errors."""

    adapter: str
    adapter_name: str
    base: str | None = None
    modules: int = 0
    findings: list[Finding] = field(default_factory=list)
    base_bytes_read: int = 0  # tensor bytes read from the base: 0, validation reads headers only

    def add(self, severity: str, where: str, message: str, fix: str = "") -> None:
        """Record a finding."""
        assert severity in SEVERITIES
        self.findings.append(Finding(severity, where, message, fix))

    def _of(self, severity: str) -> list[Finding]:
        return [f for f in self.findings if f.severity == severity]

    @property
    def errors(self) -> list[Finding]:
        """Findings that make the adapter unusable as it is (merge or load would fail or be wrong)."""
        return self._of("error")

    @property
    def warnings(self) -> list[Finding]:
        """Findings that are legal but suspicious."""
        return self._of("warning")

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    @property
    def exit_code(self) -> int:
        """0 when ok, 1 when errors were found (the CLI's exit code; 2 is for inputs that cannot be read)."""
        return 0 if self.ok else 1

    def lines(self) -> list[str]:
        """One line per finding, errors first, then warnings, then notes."""
        ordered = sorted(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        return [f.line() for f in ordered]

    def summary(self) -> str:
        """One closing line: what was checked and how many findings of each kind."""
        against = f" against {self.base}" if self.base else ""
        verdict = "ok" if self.ok else "NOT usable"
        return (f"adapter {self.adapter} ({self.adapter_name!r}, {self.modules} modules){against}: {verdict}, "
                f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's ``--json``)."""
        return {"adapter": self.adapter, "adapter_name": self.adapter_name, "base": self.base,
                "modules": self.modules, "base_bytes_read": self.base_bytes_read, "ok": self.ok,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings]}


def validate(adapter: str | Path, base: str | Path | None = None,
             adapter_name: str | None = None) -> ValidationReport:
    """Check the adapter at ``adapter`` (directory or Hub repo id; ``adapter_name`` picks one of several),
    and, with ``base`` (directory or Hub repo id), that it fits that checkpoint.

    Returns a ``ValidationReport`` listing every problem with a fix. Raises ``AdapterError``,
    ``CheckpointError`` or ``HubError`` only when the adapter or the base cannot be read at all.
    """
    from .sources import resolve_adapter, resolve_base

    folder, name = _adapter_dir(resolve_adapter(adapter), adapter_name)
    report = ValidationReport(adapter=str(adapter), adapter_name=name, base=None if base is None else str(base))
    config = _check_config(read_config_json(folder / CONFIG_NAME), report)
    tensors, source = _read_tensors(folder)
    vectors = _check_tensors(tensors, name, source, config, report)
    report.modules = len(vectors)
    _check_values(vectors, report)
    if config is not None:
        _check_listed_targets(config, vectors, report)
    if base is not None:
        _check_base(resolve_base(base), Path(base).exists(), str(base), config, vectors, report)
    return report


# ------------------------------------------------------------------------------------------------ alone
def _check_config(data: Any, report: ValidationReport) -> IA3Config | None:
    """Findings about adapter_config.json; the config when it can be used for the other checks."""
    if not isinstance(data, dict):
        report.add("error", CONFIG_NAME, f"holds a JSON {type(data).__name__}, not an object",
                   "the file must hold PEFT's adapter config; save the adapter again")
        return None
    known = {"peft_type", *(f.name for f in fields(IA3Config) if f.name != "extra")}
    for key in sorted(set(data) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        fix = f"did you mean {close[0]!r}?" if close else "PEFT ignores it; remove it"
        report.add("warning", f"{CONFIG_NAME}: {key}", "unknown config key, ignored", fix)
    for key in _TEXT_FIELDS:
        if data.get(key) is not None and not isinstance(data[key], str):
            report.add("error", f"{CONFIG_NAME}: {key}", f"must be a string or null, not {data[key]!r}",
                       "fix adapter_config.json")
    if data.get("auto_mapping") is not None and not isinstance(data["auto_mapping"], dict):
        report.add("error", f"{CONFIG_NAME}: auto_mapping", "must be an object or null", "fix adapter_config.json")
    try:
        config = IA3Config.from_dict(data, where=CONFIG_NAME)
    except AdapterError as exc:
        report.add("error", CONFIG_NAME, exc.message.removeprefix(f"{CONFIG_NAME}: "), exc.hint or "")
        return None
    if config.modules_to_save:
        report.add("error", f"{CONFIG_NAME}: modules_to_save", f"{config.modules_to_save} carries whole layers",
                   "ia3convert handles adapters made of IA3 vectors only; PEFT itself can still load it")
    if config.target_modules is None:
        report.add("info", f"{CONFIG_NAME}: target_modules",
                   "null: PEFT's defaults for the base's model type apply", "give --base to check them")
    return config


def _check_tensors(tensors: dict[str, torch.Tensor], name: str, source: Path, config: IA3Config | None,
                   report: ValidationReport) -> dict[str, torch.Tensor]:
    """Findings about each stored tensor; the well-formed vectors by module path."""
    rules = config if config is not None else IA3Config()  # without a usable config: dtype and shape only
    vectors: dict[str, torch.Tensor] = {}
    for key, tensor in sorted(tensors.items()):
        try:
            module = _module_path(key, name, source)
        except AdapterError:
            report.add("error", key, "is not an IA3 vector (PEFT ignores it, ia3convert refuses it)",
                       "'ia3convert resave' writes the adapter without it")
            continue
        problem = vector_problem(rules, module, tensor)
        if problem is not None:
            report.add("error", key, *problem)
        elif module in vectors:
            report.add("error", key, f"a second vector for module {module}", "keep one tensor per module")
        else:
            vectors[module] = tensor
    if not tensors:
        report.add("error", source.name, "holds no tensors", "the adapter weights are missing; save them again")
    return vectors


def _check_values(vectors: dict[str, torch.Tensor], report: ValidationReport) -> None:
    """Non-finite scales are errors; untrained, zero, negative and extreme scales are warnings."""
    untrained = []
    for module, tensor in sorted(vectors.items()):
        values = tensor.detach().double().flatten()
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            report.add("error", module, f"{bad} of {values.numel()} scales are NaN or infinite",
                       "the adapter is broken (training diverged?); retrain it or use an earlier checkpoint")
            continue
        if bool((values == 1).all()):
            untrained.append(module)
            continue
        zeros, negatives = int((values == 0).sum()), int((values < 0).sum())
        if zeros or negatives:
            parts = ([f"{zeros} zero (feature switched off)"] if zeros else []) + \
                ([f"{negatives} negative (feature flips sign, min {values.min().item():.3g})"] if negatives else [])
            report.add("warning", module, f"of {values.numel()} scales, {' and '.join(parts)}",
                       "fine if training put them there; otherwise check the training run")
        magnitude = values.abs()
        large = magnitude.max().item()
        small = magnitude[magnitude > 0].min().item() if bool((magnitude > 0).any()) else None
        if large > LARGE_SCALE or (small is not None and small < SMALL_SCALE):
            extreme = f"{large:.3g}" if large > LARGE_SCALE else f"{small:.3g}"
            report.add("warning", module, f"extreme scale magnitude {extreme} (IA3 scales are usually near 1)",
                       "check the training run; large scales can overflow float16 weights when merged")
    if untrained and len(untrained) == len(vectors):
        report.add("warning", "adapter", "every scale is exactly 1: the adapter is untrained and changes nothing",
                   "save the adapter after training")
    else:
        for module in untrained:
            report.add("warning", module, "every scale is exactly 1: this module is unchanged (untrained?)",
                       "check that the module was trained")


def _check_listed_targets(config: IA3Config, vectors: dict[str, torch.Tensor], report: ValidationReport) -> None:
    """A target_modules list entry that no vector belongs to: PEFT would leave those modules at their init."""
    if not isinstance(config.target_modules, list):
        return
    for entry in config.target_modules:
        if not any(path == entry or path.endswith("." + entry) for path in vectors):
            report.add("warning", f"{CONFIG_NAME}: target_modules", f"entry {entry!r} has no vector in the weights",
                       "remove it from target_modules, or check that the weights belong to this config")


# --------------------------------------------------------------------------------------------- vs base
@dataclass(frozen=True)
class _Stored:
    storage: str  # float16, bfloat16, float32, int8, nf4, fp4 (+dq), or "unsupported ..."
    in_features: int
    out_features: int
    problem: str = ""


def _stored_modules(reader: CheckpointReader, linear: dict[str, bool],
                    modules: dict[str, nn.Module]) -> dict[str, _Stored]:
    """How the checkpoint stores each Linear/Conv1D of the skeleton, from tensor names, dtypes and shapes only."""
    quant_types = {}
    for key in reader.tensors:
        if _STATE_MARK in key:
            path, quant_type = key.rsplit(_STATE_MARK, 1)
            quant_types[path] = quant_type
    found = {}
    for path, conv1d in linear.items():
        weight = reader.tensors.get(f"{path}.weight")
        if weight is None:
            continue
        in_f, out_f = layer_features(modules[path])
        expected: tuple[int, ...] = (in_f, out_f) if conv1d else (out_f, in_f)
        if path in quant_types:
            nested = f"{path}.weight.nested_absmax" in reader
            storage = f"{quant_types[path]}+dq" if nested else quant_types[path]
            expected = ((in_f * out_f + 1) // 2, 1)
        elif weight.dtype == "I8" and f"{path}.SCB" in reader:
            storage, expected = "int8", (out_f, in_f)
        elif weight.torch_dtype.is_floating_point:
            storage = str(weight.torch_dtype).removeprefix("torch.")
        else:
            found[path] = _Stored(f"unsupported {weight.dtype}", in_f, out_f,
                                  f"weight stored as {weight.dtype} {list(weight.shape)} without bitsandbytes "
                                  "statistics")
            continue
        problem = "" if tuple(weight.shape) == expected else \
            f"weight stored with shape {list(weight.shape)}, but config.json implies {list(expected)}"
        found[path] = _Stored(storage, in_f, out_f, problem)
    return found


def _check_base(base_dir: Path, local: bool, base_spec: str, config: IA3Config | None,
                vectors: dict[str, torch.Tensor], report: ValidationReport) -> None:
    """Findings about the adapter's fit to the base checkpoint (headers and config only)."""
    from .merging import check_base_storage
    from .skeleton import build_skeleton, linear_modules

    reader = CheckpointReader(base_dir)
    try:
        check_base_storage(reader)
    except CheckpointError as exc:
        report.add("error", str(base_dir), exc.message.removeprefix(f"{base_dir}: "), exc.hint or "")
    skeleton = build_skeleton(base_dir)
    modules = dict(skeleton.named_modules())
    linear = linear_modules(skeleton)
    stored = _stored_modules(reader, linear, modules)
    rules = config if config is not None else IA3Config()
    adapter = Adapter(config=rules, vectors=vectors)
    kind = type(skeleton).__name__
    storages: dict[str, int] = {}
    for path, vector in sorted(vectors.items()):
        fix = "validate against the base model the adapter was trained for"
        if path not in modules:
            close = difflib.get_close_matches(path, list(linear), n=1)
            hint = f"; the closest Linear is {close[0]}" if close else ""
            report.add("error", path, f"no such module in the base ({kind}){hint}", fix)
            continue
        if path not in linear:
            report.add("error", path, f"is a {type(modules[path]).__name__} in the base, not a Linear or Conv1D",
                       "IA3 scales Linear/Conv1D layers only; " + fix)
            continue
        module = stored.get(path)
        if module is None:
            report.add("error", path, "has no weight of its own in the base checkpoint (tied to another tensor)",
                       "IA3 on a tied layer cannot be merged; drop this module from the adapter")
            continue
        if module.problem:
            report.add("error", path, f"the base checkpoint is inconsistent: {module.problem}",
                       "download or save the base model again")
        elif module.storage.startswith("unsupported"):
            report.add("error", path, f"the base stores it in a way ia3convert cannot merge ({module.storage})",
                       "use a float, int8 (LLM.int8) or 4-bit (NF4/FP4) checkpoint of this model")
        storages[module.storage] = storages.get(module.storage, 0) + 1
        side = "input" if adapter.is_feedforward(path) else "output"
        size = module.in_features if side == "input" else module.out_features
        if vector.numel() != size:
            report.add("error", path, f"{vector.numel()} scales for the {side} side, but the base layer has "
                       f"{size} {side} features", fix)
    if config is not None:
        _check_selection(config, skeleton, modules, linear, vectors, report)
    _check_names(config, skeleton, local, base_spec, report)
    listing = ", ".join(f"{n} {s}" for s, n in sorted(storages.items()))
    report.add("info", str(base_dir), f"{kind}; the adapted modules are stored as: {listing or 'none found'}")
    report.base_bytes_read = reader.bytes_read


def _check_selection(config: IA3Config, skeleton: nn.Module, modules: dict[str, nn.Module],
                     linear: dict[str, bool], vectors: dict[str, torch.Tensor], report: ValidationReport) -> None:
    """The modules PEFT would wrap in this base (defaults and all-linear resolved) against the stored vectors."""
    model_type = getattr(getattr(skeleton, "config", None), "model_type", None)
    try:
        resolved = config.with_defaults(model_type)
    except AdapterError as exc:
        report.add("error", CONFIG_NAME, exc.message, exc.hint or "")
        return
    if resolved.target_modules == ALL_LINEAR:
        output = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
        selected = [p for p in linear if modules[p] is not output and not resolved.is_excluded(p)]
    else:
        selected = [p for p in modules if p and resolved.is_target(p)]
    if not selected:
        report.add("error", f"{CONFIG_NAME}: target_modules", f"{resolved.target_modules!r} selects no module of "
                   f"the base", "name modules that exist in the base")
    init = "ones: no change" if config.init_ia3_weights else "random values: init_ia3_weights is false"
    for path in selected:
        if path not in linear and path not in vectors:  # with a vector, it was named above already
            report.add("error", path, f"target_modules selects it, but it is a {type(modules[path]).__name__}",
                       "narrow target_modules to Linear/Conv1D layers")
        elif path not in vectors:
            report.add("warning" if config.init_ia3_weights else "error", path,
                       f"targeted by the config but has no vector: PEFT would leave it at its initial value ({init})",
                       "check that the weights belong to this config")
    implicit = config.target_modules in (None, ALL_LINEAR)
    for path, vector in sorted(vectors.items()):
        if implicit and path in modules and path not in selected:
            report.add("error", path, "has a vector, but the config's targets do not select it (PEFT would ignore "
                       "it)", "list the module in target_modules")
        if config.feedforward_modules is None and path in selected and tuple(vector.shape) != (1, 1) \
                and resolved.is_feedforward(path) != (vector.shape[0] == 1):
            report.add("error", path, f"vector shape {tuple(vector.shape)} disagrees with PEFT's default "
                       f"feed-forward modules {resolved.feedforward_modules}", "set feedforward_modules explicitly")


def _check_names(config: IA3Config | None, skeleton: nn.Module, local: bool, base_spec: str,
                 report: ValidationReport) -> None:
    """The base the config names (model class, Hub id) against the base given, where both are known."""
    if config is None:
        return
    mapped = (config.auto_mapping or {}).get("base_model_class")
    kind = type(skeleton).__name__
    if isinstance(mapped, str) and mapped != kind:
        report.add("warning", f"{CONFIG_NAME}: auto_mapping", f"the adapter was made on a {mapped}, the base "
                   f"is a {kind}", "module paths differ between model classes; use the class it was trained on")
    named = config.base_model_name_or_path
    if not local and named and named != base_spec:
        report.add("warning", f"{CONFIG_NAME}: base_model_name_or_path", f"the adapter was trained on {named}, "
                   f"not on {base_spec}", "use the base it was trained on (or a quantized copy of it)")
