"""The IA3 adapter configuration: PEFT's ``adapter_config.json`` fields, and which modules they select.

Matching follows PEFT exactly, so that an adapter trained with PEFT selects the same modules here:
- a string is a regular expression that must match the whole module path;
- a list selects a path equal to an entry or ending in ``.<entry>``;
- ``"all-linear"`` selects every Linear/Conv1D but the output embedding (expanded against a live model);
- ``exclude_modules`` is applied first.
PEFT decides "feed-forward" (input-scaled) for a list with a bare ``endswith`` (no dot boundary); we keep
that so that configs mean what PEFT made them mean. Without ``target_modules`` PEFT's per-architecture
defaults apply (``DEFAULT_TARGETS``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdapterError

ALL_LINEAR = "all-linear"

ModuleSpec = list[str] | str | None

# PEFT's defaults for IA3 when target_modules / feedforward_modules are null: model_type -> (targets, feed-forward).
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gemma": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gemma3_text": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen2": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "qwen3": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
}

# Fields PEFT writes for an IA3 adapter, in its spelling. Others are kept in ``IA3Config.extra`` and ignored.
_KNOWN_FIELDS = (
    "peft_type", "target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out",
    "modules_to_save", "init_ia3_weights", "task_type", "base_model_name_or_path", "revision",
    "inference_mode", "peft_version", "auto_mapping",
)


def _check_spec(name: str, value: Any, where: str) -> ModuleSpec:
    """Accept a module spec as PEFT stores it: null, a regex string, or a list of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise AdapterError(
                    f"{where}: {name} is not a valid regular expression ({exc})",
                    hint="fix the pattern or give a list of module names",
                ) from None
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    raise AdapterError(
        f"{where}: {name} must be null, a string or a list of strings, not {type(value).__name__}",
        hint="fix adapter_config.json",
    )


@dataclass
class IA3Config:
    """An IA3 adapter configuration with PEFT's field names and meanings.

    ``target_modules``/``feedforward_modules``/``exclude_modules`` are each ``None``, a regex string or a
    list of names. Lists are kept sorted: PEFT stores them as sets, so their order carries no meaning.
    """

    target_modules: ModuleSpec = None
    feedforward_modules: ModuleSpec = None
    exclude_modules: ModuleSpec = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_version: str | None = None
    auto_mapping: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = "IA3 config"
        self.target_modules = _check_spec("target_modules", self.target_modules, where)
        self.feedforward_modules = _check_spec("feedforward_modules", self.feedforward_modules, where)
        self.exclude_modules = _check_spec("exclude_modules", self.exclude_modules, where)
        if isinstance(self.target_modules, list) and isinstance(self.feedforward_modules, list):
            # PEFT demands a literal subset, yet saves "all-linear" expanded to full paths beside short
            # feed-forward names; an entry that some target ends with selects real targets, so it is fine.
            stray = sorted(f for f in self.feedforward_modules if not any(t.endswith(f) for t in self.target_modules))
            if stray:
                raise AdapterError(
                    f"{where}: feedforward_modules {stray} are not among target_modules",
                    hint="every feed-forward module must also be a target; add it to target_modules",
                )

    # ----------------------------------------------------------------------------------------- files
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "adapter_config.json") -> IA3Config:
        """Build a config from a parsed ``adapter_config.json``; refuse any other PEFT method by name."""
        if not isinstance(data, dict):
            raise AdapterError(f"{where}: expected a JSON object, found {type(data).__name__}",
                               hint="the file must hold PEFT's adapter config")
        peft_type = data.get("peft_type")
        if peft_type != "IA3":
            found = f"a {peft_type} adapter" if isinstance(peft_type, str) else "no peft_type"
            raise AdapterError(f"{where}: {found}, not IA3",
                               hint="ia3convert handles (IA)^3 adapters only (peft_type \"IA3\")")
        kwargs: dict[str, Any] = {}
        for key in _KNOWN_FIELDS:
            if key != "peft_type" and key in data:
                kwargs[key] = data[key]
        for key in ("fan_in_fan_out", "init_ia3_weights", "inference_mode"):
            if key in kwargs and not isinstance(kwargs[key], bool):
                raise AdapterError(f"{where}: {key} must be true or false, not {kwargs[key]!r}",
                                   hint="fix adapter_config.json")
        mts = kwargs.get("modules_to_save")
        if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
            raise AdapterError(f"{where}: modules_to_save must be null or a list of names",
                               hint="fix adapter_config.json")
        extra = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
        try:
            return cls(**kwargs, extra=extra)
        except AdapterError as exc:
            raise AdapterError(exc.message.replace("IA3 config", where, 1), hint=exc.hint) from None

    @classmethod
    def from_file(cls, path: str | Path) -> IA3Config:
        """Read ``adapter_config.json``."""
        return cls.from_dict(read_config_json(path), where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes (known fields only, lists sorted)."""
        data: dict[str, Any] = {"peft_type": "IA3"}
        for key in _KNOWN_FIELDS[1:]:
            value = getattr(self, key)
            if key == "peft_version" and value is None:
                continue
            data[key] = sorted(value) if isinstance(value, list) else value
        return data

    def to_json(self) -> str:
        """Serialise as PEFT does: sorted keys, two-space indent."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # -------------------------------------------------------------------------------------- matching
    def with_defaults(self, model_type: str | None) -> IA3Config:
        """Fill null target/feed-forward modules from PEFT's per-architecture table, as PEFT does."""
        targets, feedforward = self.target_modules, self.feedforward_modules
        if targets is None or feedforward is None:
            if model_type not in DEFAULT_TARGETS:
                missing = "target_modules" if targets is None else "feedforward_modules"
                raise AdapterError(
                    f"IA3 config: {missing} is null and there is no default for model type {model_type!r}",
                    hint=f"set {missing} explicitly",
                )
            default_targets, default_ff = DEFAULT_TARGETS[model_type]
            targets = default_targets if targets is None else targets
            feedforward = default_ff if feedforward is None else feedforward
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data.update(target_modules=targets, feedforward_modules=feedforward)
        return IA3Config(**data)

    def is_excluded(self, path: str) -> bool:
        """True when ``exclude_modules`` removes this module path."""
        return _matches(self.exclude_modules, path) if self.exclude_modules else False

    def is_target(self, path: str) -> bool:
        """True when this module path is targeted (exclusions applied). ``all-linear`` needs a model: see wrap."""
        if self.target_modules is None or self.target_modules == ALL_LINEAR:
            raise ValueError("resolve defaults / all-linear against the model first")
        return not self.is_excluded(path) and _matches(self.target_modules, path)

    def is_feedforward(self, path: str) -> bool:
        """True when this module's input (not output) is scaled, by PEFT's rule."""
        spec = self.feedforward_modules
        if spec is None:
            return False
        if isinstance(spec, str):
            return re.fullmatch(spec, path) is not None
        return any(path.endswith(entry) for entry in spec)


def read_config_json(path: str | Path) -> Any:
    """The parsed JSON of an ``adapter_config.json``, or ``AdapterError`` naming the file when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AdapterError(f"{path}: not found", hint="an adapter directory holds adapter_config.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise AdapterError(f"{path}: cannot be read ({reason})", hint="check the file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})",
                           hint="fix or re-save the adapter config") from None


def _matches(spec: ModuleSpec, path: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == entry or path.endswith("." + entry) for entry in spec)
