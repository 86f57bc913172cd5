"""Merge an IA3 adapter into a checkpoint, streaming tensor by tensor: plan, transform, check, write.

(Named ``merging`` so that the package attribute ``ia3convert.merge`` stays the function: importing a
submodule named ``merge`` would replace it with the module.)

For every adapted module the plan picks the most exact transform the storage allows:
- ``exact-fold``: output-side scaling folded into the quantization statistics (int8 ``SCB`` and code signs,
  4-bit ``absmax``); codes stay bit for bit, nothing is re-quantized;
- ``fold-renest``: the same for a nested 4-bit layer whose absmax is nested again (``renest``; ~1e-3);
- ``requantize``: dequantize, scale, quantize again with the layer's own parameters (input-side scaling,
  4-bit blocks straddling rows, or when asked);
- ``multiply``: a float weight scaled in float32 and cast back;
- ``dequantize`` / ``quantize``: the output is written in another storage (``dtype`` / ``quantize`` options).
Each merged module is then checked against the IA3-wrapped layer over the original tensors (``verify``), on
a sample of its rows by default (``sampling``). A pass copies every untouched tensor first (queued on the
writer's I/O thread, inside the kernel), then reads, merges, checks and writes one module at a time. The
output is written into a temporary sibling of OUT and renamed into place only when complete and checked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, read_adapter
from .checkpoint import (
    CheckpointReader,
    PlannedTensor,
    StreamingWriter,
    copy_file,
    fsync_dir,
    parse_size,
    writing,
)
from .codecs import floating, four_bit, int8
from .errors import AdapterError, CheckpointError, IA3ConvertError, MergeCheckError, OutputError, TargetError
from .folds import Fold, find_fold, fold_partners
from .memory import trim
from .sampling import quant_info, restrict, sample, special_indices
from .skeleton import build_skeleton, lean_config, linear_modules, modules_to_quantize, quantized_modules
from .verify import (
    DEFAULT_LIMITS,
    MergeReport,
    ModuleReport,
    build_layer,
    check_fold,
    compare,
    default_limit,
    ia3_truth,
    probes,
)

FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_TYPES = ("int8", "nf4", "fp4")
STATE_MAX_BYTES = 512  # room planned for a 4-bit quant-state JSON (they are ~100-200 bytes)
REPORT_NAME = "merge_report.json"


@dataclass
class MergeOptions:
    """Everything that shapes a merge besides its inputs and output (see ``merge`` for meanings)."""

    adapter_name: str | None = None
    quantize: str | None = None
    double_quant: bool = False
    dtype: str | None = None
    renest: bool = False
    requantize: bool = False
    check: bool = True
    max_error: float | None = None
    probe_tokens: int = 32
    probe_scale: float = 1.0
    check_sample: int = 512
    device: str = "cpu"
    fold: bool = True
    seed: int = 0
    max_shard_size: str | int = "5GB"
    force: bool = False

    def validate(self) -> None:
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise OutputError(f"--quantize {self.quantize!r} is not one of {', '.join(QUANT_TYPES)}",
                              hint="pick int8, nf4 or fp4")
        if self.dtype is not None and self.dtype not in FLOAT_DTYPES:
            raise OutputError(f"--dtype {self.dtype!r} is not one of {', '.join(FLOAT_DTYPES)}",
                              hint="pick float16, bfloat16 or float32")
        if self.quantize and self.dtype:
            raise OutputError("--quantize and --dtype exclude each other",
                              hint="--quantize writes a quantized model, --dtype a float one")
        if self.double_quant and self.quantize not in ("nf4", "fp4"):
            raise OutputError("--double-quant needs --quantize nf4 or fp4", hint="add --quantize nf4")
        if self.probe_tokens < 1:
            raise OutputError("--probe-tokens must be at least 1", hint="the default is 32")
        if self.check_sample < 0:
            raise OutputError("--check-sample must be 0 (every row) or more", hint="the default is 512")
        resolve_device(self.device)

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """Where decoding, scaling, encoding and the check run: ``cpu``, ``cuda[:N]`` (bitsandbytes' CUDA kernels),
    or ``auto`` (CUDA when this machine has it, else the CPU). A device that is not here is refused."""
    wanted = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    try:
        device = torch.device(wanted)
    except (RuntimeError, TypeError):
        raise OutputError(f"--device {name!r} is not a device", hint="pick cpu, cuda or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise OutputError(f"--device {name!r}: only cpu and cuda are supported", hint="pick cpu, cuda or auto")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise OutputError(f"--device {name}: no such CUDA device here",
                          hint="use --device cpu, or auto to take a GPU only when there is one")
    return device


@dataclass
class Module:
    """A Linear/Conv1D of the base checkpoint and how it is stored."""

    path: str
    kind: str  # "float", "int8" or "4bit"
    keys: list[str]
    in_features: int
    out_features: int
    transposed: bool  # a float Conv1D weight, stored [in, out]
    conv1d: bool
    storage: str
    info: dict[str, Any] | None = None

    @property
    def has_bias(self) -> bool:
        return f"{self.path}.bias" in self.keys


@dataclass
class Step:
    """What happens to one module."""

    module: Module
    transform: str  # exact-fold | fold-renest | requantize | multiply | dequantize | quantize | folded | copy
    reason: str = ""
    rows: torch.Tensor | None = None  # output-side factors (the module's own, times any folded in)
    cols: torch.Tensor | None = None  # input-side factors
    adapted: bool = False  # the adapter names this module
    folded_from: str | None = None  # the consumer whose input scale this module's rows carry
    out_kind: str = "same"  # same | float | int8 | 4bit
    outputs: list[PlannedTensor] = field(default_factory=list)

    @property
    def scaled(self) -> bool:
        return self.rows is not None or self.cols is not None


def keys_by_module(keys: Iterable[str], paths: Container[str]) -> dict[str, list[str]]:
    """Checkpoint keys grouped by the module path they belong to (``P.weight``, ``P.SCB``,
    ``P.weight.quant_state.bitsandbytes__nf4``, ...): one pass over the keys."""
    by_module: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        for cut in (1, 2, 3, 4):
            prefix = ".".join(parts[:-cut])
            if prefix in paths:
                by_module.setdefault(prefix, []).append(key)
                break
    return by_module


def find_modules(reader: CheckpointReader, linear: dict[str, bool]) -> dict[str, Module]:
    """Every Linear/Conv1D of the skeleton that the checkpoint stores, with its storage read from the tensors."""
    by_module = keys_by_module(reader.tensors, linear)
    modules = {}
    for path, keys in by_module.items():
        weight = reader.tensors.get(f"{path}.weight")
        if weight is None:
            continue
        conv1d = linear[path]
        state_keys = [k for k in keys if k.startswith(f"{path}.weight.quant_state.bitsandbytes__")]
        if weight.dtype == "I8" and f"{path}.SCB" in reader:
            out_f, in_f = weight.shape
            modules[path] = Module(path, "int8", keys, in_f, out_f, False, conv1d, "int8")
        elif state_keys:
            try:
                info = json.loads(reader.raw(state_keys[0]).decode("utf-8"))
                out_f, in_f = (int(d) for d in info["shape"])
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{reader.path}: tensor {state_keys[0]} is not a bitsandbytes quant state",
                                      hint="the checkpoint is damaged") from None
            storage = f"{info['quant_type']}+dq" if "nested_blocksize" in info else info["quant_type"]
            modules[path] = Module(path, "4bit", keys, in_f, out_f, False, conv1d, storage, info)
        elif weight.torch_dtype.is_floating_point and len(weight.shape) == 2:
            rows, cols = weight.shape
            in_f, out_f = (rows, cols) if conv1d else (cols, rows)
            modules[path] = Module(path, "float", keys, in_f, out_f, conv1d, conv1d,
                                   str(weight.torch_dtype).removeprefix("torch."))
    return modules


def check_base_storage(reader: CheckpointReader) -> None:
    """Refuse quantization methods we cannot read (GPTQ, AWQ, ...), naming them."""
    qc = reader.quantization_config
    if qc and qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise CheckpointError(f"{reader.path}: quantized with {qc.get('quant_method')}, not bitsandbytes",
                              hint="ia3convert merges into float, int8 (LLM.int8) and 4-bit (NF4/FP4) checkpoints")


def check_adapter_fits(adapter: Adapter, modules: dict[str, Module], where: Path) -> None:
    """Every adapted module exists in the base as a Linear whose size matches the vector's side."""
    for path, vector in sorted(adapter.vectors.items()):
        module = modules.get(path)
        if module is None:
            raise TargetError(f"adapter module {path} is not a Linear layer of the base {where}",
                              hint="merge the adapter into the base model it was trained for")
        n = module.in_features if adapter.is_feedforward(path) else module.out_features
        if vector.numel() != n:
            side = "input" if adapter.is_feedforward(path) else "output"
            raise TargetError(f"adapter module {path}: {vector.numel()} scales for the {side} side, but the base "
                              f"layer has {n} {side} features", hint="merge into the base model it was trained for")
        if not torch.isfinite(vector).all():
            raise AdapterError(f"{adapter.source}: module {path} has NaN or infinite scales",
                               hint="the adapter is broken; retrain it or fix its values")


def plan_step(step: Step, opts: MergeOptions, quantize_set: set[str], reader: CheckpointReader) -> Step:
    """Choose the transform for one module (its factors already set on ``step``) and plan its output tensors."""
    module = step.module
    if step.transform == "folded":
        pass  # the input scale went to the producer's rows: this module is copied unchanged
    elif opts.dtype:
        step.out_kind = "float"
        if module.kind != "float":
            step.transform, step.reason = "dequantize", f"dequantized to {opts.dtype}"
        elif step.scaled:
            step.transform, step.reason = "multiply", f"float weight, written as {opts.dtype}"
    elif opts.quantize:
        if module.path in quantize_set:
            step.out_kind = "int8" if opts.quantize == "int8" else "4bit"
            step.transform = "quantize"
            step.reason = f"merged in float, quantized to {opts.quantize}" if step.scaled else ""
        elif step.scaled:
            step.transform, step.reason = "multiply", "kept float (transformers does not quantize it)"
    elif step.scaled:
        step.transform, step.reason = keep_storage_transform(module, step.cols is not None, opts)
    if step.folded_from:
        step.reason = f"{step.reason}; rows carry the input scale of {step.folded_from}".lstrip("; ")
    step.outputs = _plan_outputs(step, opts, reader)
    return step


def keep_storage_transform(module: Module, input_scaled: bool, opts: MergeOptions) -> tuple[str, str]:
    """The transform that keeps a module's storage: exact fold where the statistics allow, else requantize."""
    if module.kind == "float":
        return "multiply", "float weight"
    if opts.requantize:
        return "requantize", "requantization asked for (--requantize)"
    if input_scaled:
        return "requantize", "input side: columns cannot be folded into row statistics"
    if module.kind == "int8":
        return "exact-fold", "SCB scaled, code signs flipped"
    assert module.info is not None
    if module.in_features % int(module.info["blocksize"]):
        return "requantize", f"4-bit blocks of {module.info['blocksize']} straddle rows of {module.in_features}"
    if "nested_blocksize" in module.info:
        if opts.renest:
            return "fold-renest", "absmax scaled, then nested again (--renest)"
        return "exact-fold", "absmax scaled and stored de-nested as float32"
    return "exact-fold", "absmax scaled"


def _stored(reader: CheckpointReader, key: str) -> PlannedTensor:
    info = reader.tensors[key]
    return PlannedTensor(key, info.torch_dtype, info.shape)


def _plan_outputs(step: Step, opts: MergeOptions, reader: CheckpointReader) -> list[PlannedTensor]:
    """The output tensors of a module, with dtypes and shapes, before any of them is computed."""
    m, p = step.module, step.module.path
    bias = [f"{p}.bias"] if m.has_bias else []
    if step.out_kind == "float":
        dtype = FLOAT_DTYPES[opts.dtype]
        shape = (m.in_features, m.out_features) if m.conv1d else (m.out_features, m.in_features)
        return [PlannedTensor(f"{p}.weight", dtype, shape)] + [PlannedTensor(k, dtype, (m.out_features,))
                                                                for k in bias]
    if step.transform in ("copy", "folded"):
        return [_stored(reader, k) for k in m.keys]
    if step.transform == "multiply":
        return [_stored(reader, k) for k in [f"{p}.weight", *bias]]
    out_kind = m.kind if step.out_kind == "same" else step.out_kind
    bias_plan = [_stored(reader, k) for k in bias]
    if out_kind == "int8":
        plans = [PlannedTensor(f"{p}.weight", torch.int8, (m.out_features, m.in_features)),
                 PlannedTensor(f"{p}.SCB", torch.float32, (m.out_features,))]
        if step.transform == "quantize" or f"{p}.weight_format" in m.keys:
            plans.append(PlannedTensor(f"{p}.weight_format", torch.uint8, ()))
        return plans + bias_plan
    if step.transform == "quantize":
        quant_type, blocksize, nested = opts.quantize, 64, opts.double_quant
    else:
        assert m.info is not None
        quant_type, blocksize = m.info["quant_type"], int(m.info["blocksize"])
        nested = "nested_blocksize" in m.info and step.transform != "exact-fold"
    elements = m.in_features * m.out_features
    blocks = -(-elements // blocksize)
    plans = [PlannedTensor(f"{p}.weight", torch.uint8, ((elements + 1) // 2, 1)),
             PlannedTensor(f"{p}.weight.quant_map", torch.float32, (16,)),
             PlannedTensor(f"{p}.weight.quant_state.bitsandbytes__{quant_type}", torch.uint8, (0,),
                           max_bytes=STATE_MAX_BYTES)]
    if nested:
        plans += [PlannedTensor(f"{p}.weight.absmax", torch.uint8, (blocks,)),
                  PlannedTensor(f"{p}.weight.nested_absmax", torch.float32, (-(-blocks // 256),)),
                  PlannedTensor(f"{p}.weight.nested_quant_map", torch.float32, (256,))]
    else:
        plans.append(PlannedTensor(f"{p}.weight.absmax", torch.float32, (blocks,)))
    return plans + bias_plan


def _scale_both(weight: torch.Tensor, step: Step, transposed: bool = False, span: slice = slice(None)) -> torch.Tensor:
    """``weight`` ([out, in], or [in, out] when ``transposed``) with the step's row and column factors; ``span``:
    the rows of the module that ``weight`` holds (a chunk)."""
    where = step.module.path
    if step.rows is not None:
        weight = floating.scale(weight, step.rows[span], rows=not transposed, where=where)
    if step.cols is not None:
        weight = floating.scale(weight, step.cols, rows=transposed, where=where)
    return weight


def _scaled_bias(bias: torch.Tensor, step: Step) -> torch.Tensor:
    if step.rows is None:
        return bias
    return floating.scale(bias.reshape(-1, 1), step.rows, rows=True, where=f"{step.module.path}.bias").reshape(-1)


def _decode(module: Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The module's weight in float32, [out, in] (Conv1D transposed to Linear orientation)."""
    p = module.path
    weight = tensors[f"{p}.weight"]
    if module.kind == "int8":
        return int8.decode(weight, tensors[f"{p}.SCB"])
    if module.kind == "4bit":
        return four_bit.decode(_packed(module, tensors))
    return (weight.t() if module.transposed else weight).float()


def _packed(module: Module, tensors: dict[str, torch.Tensor]) -> four_bit.Packed4bit:
    prefix = f"{module.path}.weight."
    stats = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return four_bit.Packed4bit(tensors[f"{module.path}.weight"], stats)


def transform_module(step: Step, tensors: dict[str, torch.Tensor], opts: MergeOptions,
                     weight: Callable[[], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The module's output tensors (keys as planned) from its stored ``tensors``. Pure: no file access.

    ``weight`` returns the decoded float32 weight ([out, in]); a batch passes one that decodes once and serves
    every adapter merged into the same base. Without it, a large weight that is re-encoded is processed in row
    chunks (``_transform_in_chunks``).
    """
    m, p = step.module, step.module.path
    chunk_rows = None if weight is not None else _chunk_rows(step, tensors, opts)
    if weight is None:
        def weight() -> torch.Tensor:
            return _decode(m, tensors)
    if chunk_rows is not None:
        return _transform_in_chunks(step, tensors, opts, chunk_rows)
    out: dict[str, torch.Tensor] = {}
    bias = tensors.get(f"{p}.bias")
    if step.out_kind == "float":
        scaled = _scale_both(weight(), step)
        dtype = FLOAT_DTYPES[opts.dtype]
        out[f"{p}.weight"] = _cast(scaled.t() if m.conv1d else scaled, dtype, f"{p}.weight")
        if bias is not None:
            out[f"{p}.bias"] = _cast(_scaled_bias(bias.float(), step), dtype, f"{p}.bias")
        return out
    if bias is not None:
        out[f"{p}.bias"] = _scaled_bias(bias, step)
    if step.transform == "multiply":
        out[f"{p}.weight"] = _scale_both(tensors[f"{p}.weight"], step, transposed=m.transposed)
        return out
    if step.transform == "quantize":
        stored = tensors[f"{p}.weight"]
        merged_weight = _scale_both((stored.t() if m.transposed else stored).contiguous(), step)
        if opts.quantize == "int8":
            codes, scb = int8.encode(merged_weight)
            out.update({f"{p}.weight": codes, f"{p}.SCB": scb,
                        f"{p}.weight_format": torch.tensor(0, dtype=torch.uint8)})
        else:
            packed = four_bit.encode(merged_weight, opts.quantize, 64, opts.double_quant, dtype=stored.dtype)
            out.update(packed.tensors(f"{p}.weight"))
        return out
    if m.kind == "int8":
        codes, scb = tensors[f"{p}.weight"], tensors[f"{p}.SCB"]
        if step.transform == "exact-fold":
            codes, scb = int8.fold_rows(codes, scb, step.rows)
        else:
            codes, scb = int8.encode(_scale_both(weight(), step))
        out.update({f"{p}.weight": codes, f"{p}.SCB": scb})
        if f"{p}.weight_format" in tensors:
            out[f"{p}.weight_format"] = tensors[f"{p}.weight_format"]
        return out
    packed = _packed(m, tensors)
    if step.transform in ("exact-fold", "fold-renest"):
        merged = four_bit.fold_rows(packed, step.rows)
        if step.transform == "fold-renest":
            merged = four_bit.renest(merged)
    else:
        info = packed.info
        merged = four_bit.encode(_scale_both(weight(), step), info["quant_type"], int(info["blocksize"]),
                                 packed.nested, dtype=getattr(torch, info["dtype"]))
    out.update(merged.tensors(f"{p}.weight"))
    return out


CHUNK_ELEMENTS = 1 << 23  # a re-encoded weight is decoded, scaled and encoded this many elements at a time


def _chunk_rows(step: Step, tensors: dict[str, torch.Tensor], opts: MergeOptions) -> int | None:
    """Rows per chunk when this step re-encodes a weight larger than ``CHUNK_ELEMENTS`` on the CPU (whole
    4-bit blocks per chunk), or None to transform it whole."""
    m = step.module
    elements = m.in_features * m.out_features
    requantize = step.transform == "requantize" and step.out_kind == "same"
    if not (step.transform == "quantize" or requantize) or elements <= CHUNK_ELEMENTS \
            or tensors[f"{m.path}.weight"].device.type != "cpu":
        return None
    out_kind = m.kind if step.out_kind == "same" else step.out_kind
    blocksize = 64 if step.transform == "quantize" else int(m.info["blocksize"]) if m.info else 1
    if m.kind == "4bit" and m.in_features % blocksize:
        return None  # rows cannot be cut out of blocks straddling them: decoded whole
    rows = max(1, CHUNK_ELEMENTS // m.in_features)
    if out_kind == "4bit":
        unit = blocksize // math.gcd(m.in_features, blocksize)
        rows = max(unit, rows - rows % unit)
    return rows


def _transform_in_chunks(step: Step, tensors: dict[str, torch.Tensor], opts: MergeOptions,
                         chunk_rows: int) -> dict[str, torch.Tensor]:
    """``transform_module`` for a re-encoded weight, ``chunk_rows`` rows at a time: decode (or read), scale and
    encode each chunk; the same bytes as whole (both encoders work row by row or block by block), in the
    memory of the output plus one chunk instead of several float copies of the whole weight."""
    m, p = step.module, step.module.path
    shape = (m.out_features, m.in_features)
    stored = tensors[f"{p}.weight"]

    def rows(start: int, stop: int) -> torch.Tensor:
        if m.kind == "float":
            part = (stored[:, start:stop].t() if m.transposed else stored[start:stop]).contiguous()
        elif m.kind == "int8":
            part = int8.decode(stored[start:stop], tensors[f"{p}.SCB"][start:stop])
        else:
            cut, _, _ = restrict("4bit", tensors, p, m.in_features, m.out_features, False,
                                 torch.arange(start, stop), None)
            part = four_bit.decode(_packed(m, cut))
        return _scale_both(part, step, span=slice(start, stop))

    out: dict[str, torch.Tensor] = {}
    bias = tensors.get(f"{p}.bias")
    if bias is not None:
        out[f"{p}.bias"] = _scaled_bias(bias, step)
    int8_out = opts.quantize == "int8" if step.transform == "quantize" else m.kind == "int8"
    if int8_out:
        codes, scb = int8.encode_rows(rows, shape, chunk_rows)
        out.update({f"{p}.weight": codes, f"{p}.SCB": scb})
        if step.transform == "quantize" or f"{p}.weight_format" in tensors:
            out[f"{p}.weight_format"] = tensors.get(f"{p}.weight_format", torch.tensor(0, dtype=torch.uint8))
        return out
    if step.transform == "quantize":
        quant_type, blocksize, nested, dtype = opts.quantize, 64, opts.double_quant, stored.dtype
    else:
        original = _packed(m, tensors)
        info = original.info
        quant_type, blocksize, nested = info["quant_type"], int(info["blocksize"]), original.nested
        dtype = getattr(torch, info["dtype"])
    packed = four_bit.encode_rows(rows, shape, quant_type, blocksize, nested, dtype, chunk_rows)
    out.update(packed.tensors(f"{p}.weight"))
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    result = tensor.to(dtype).contiguous()
    if not torch.isfinite(result).all() and torch.isfinite(tensor).all():
        raise TargetError(f"{where}: merged values overflow {str(dtype).removeprefix('torch.')}",
                          hint="write a wider --dtype such as float32")
    return result


def check_module(step: Step, tensors: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                 opts: MergeOptions, threshold: float) -> tuple[float, float, int]:
    """Relative and max-abs error of the merged layer against the IA3-wrapped original on probe inputs, and the
    number of output rows compared (``opts.check_sample`` rows, see ``sampling``, or all of them)."""
    m, p = step.module, step.module.path
    out_kind = m.kind if step.out_kind == "same" else step.out_kind
    rows = None
    if _row_chunk(m, m.kind) and _row_chunk(m, out_kind, outputs):
        rows = sample(m.out_features, opts.check_sample, p, opts.seed, special=special_indices(step.rows))
    cut, n_in, n_out = restrict(m.kind, tensors, p, m.in_features, m.out_features, m.transposed, rows, None)
    original = build_layer(m.kind, cut, p, n_in, n_out, m.transposed, threshold)
    factors = step.rows if rows is None or step.rows is None else step.rows[rows]
    truth = ia3_truth(original, m.kind, factors, step.cols)
    # A float output keeps Conv1D's [in, out] orientation (transformers loads it into a Conv1D again).
    transposed = out_kind == "float" and m.conv1d
    cut, n_in, n_out = restrict(out_kind, outputs, p, m.in_features, m.out_features, transposed, rows, None)
    candidate = build_layer(out_kind, cut, p, n_in, n_out, transposed, threshold)
    x = probes(p, m.in_features, opts.probe_tokens, opts.probe_scale, opts.seed, opts.torch_device)
    return (*compare(truth, candidate, x), n_out)


def _row_chunk(module: Module, kind: str, tensors: dict[str, torch.Tensor] | None = None) -> int | None:
    """The column chunk a row sample of ``module`` stored as ``kind`` needs (1, or the 4-bit blocksize), or None
    when its rows cannot be cut exactly (4-bit blocks straddling rows). ``tensors``: the stored form, when it
    is not the base's (a --quantize output)."""
    if kind != "4bit":
        return 1
    if tensors is not None:
        blocksize = int(quant_info(tensors, module.path)["blocksize"])
    else:
        assert module.info is not None
        blocksize = int(module.info["blocksize"])
    return blocksize if module.in_features % blocksize == 0 else None


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def prepare_output(out: Path, inputs: list[Path], force: bool) -> Path:
    """Check OUT against the inputs and make an empty temporary sibling to build it in."""
    try:
        resolved = out.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symbolic link loop (Python < 3.13)
        raise OutputError(f"{out}: is a symbolic link loop", hint="remove the link or choose another path") from None
    for source in inputs:
        src = source.resolve()
        if resolved == src:
            raise OutputError(f"{out}: is the input {source} itself", hint="write the output somewhere else")
        if _inside(resolved, src):
            raise OutputError(f"{out}: is inside the input {source}", hint="write the output somewhere else")
        if _inside(src, resolved):
            raise OutputError(f"{out}: contains the input {source}", hint="write the output somewhere else")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"{out}: already exists", hint="choose a new directory or pass --force to replace it")
        if not out.is_dir():
            raise OutputError(f"{out}: exists and is not a directory", hint="remove it or choose another path")
    parent = resolved.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{out}: its parent {parent} is a file, not a directory",
                          hint="choose an output path inside a writable directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{resolved.name}.", suffix=".ia3convert-tmp", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # a normal directory once published, not mkdtemp's private 0700
        return tmp
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output here ({exc.strerror or exc})",
                          hint="choose a writable location") from None


def publish(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to OUT (replacing an old OUT only now, when all is done)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.ia3convert-old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _output_config(reader: CheckpointReader, opts: MergeOptions) -> bytes | None:
    """New config.json bytes, or None to copy the base's unchanged."""
    if opts.dtype:
        config = dict(reader.config)
        config.pop("quantization_config", None)
        config["dtype"] = opts.dtype
        config.pop("torch_dtype", None)
    elif opts.quantize:
        config = dict(reader.config)
        config["quantization_config"] = _bnb_config(opts).to_dict()
    else:
        return None
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _bnb_config(opts: MergeOptions):
    from transformers import BitsAndBytesConfig

    if opts.quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=opts.quantize,
                              bnb_4bit_use_double_quant=opts.double_quant)


@dataclass
class Base:
    """A base checkpoint opened once (reader, its Linear modules and their storage, the model config): shared by
    every merge of one pass."""

    path: Path
    reader: CheckpointReader
    modules: dict[str, Module]
    config: Any
    skeleton: bool = True  # modules and config come from transformers' model class (else: see ``open``)

    @classmethod
    def open(cls, path: Path) -> Base:
        """Headers, config and Linear modules of the base. A quantized base of a ``LEAN_TYPES`` model is read
        without transformers: its quantized modules are known from their statistics and its config from
        config.json; ``complete`` adds transformers' view when a merge needs more (a float module, a Conv1D's
        orientation, --quantize / --dtype)."""
        reader = CheckpointReader(path)
        check_base_storage(reader)
        raw = lean_config(reader.config)
        if raw is not None:
            return cls(path, reader, find_modules(reader, quantized_modules(reader.tensors)), raw, skeleton=False)
        skeleton = build_skeleton(path)
        return cls(path, reader, find_modules(reader, linear_modules(skeleton)), skeleton.config)

    def complete(self) -> None:
        """Every Linear/Conv1D of the model, and its transformers config, from the skeleton (in place: merges
        planned before see the same modules)."""
        if self.skeleton:
            return
        skeleton = build_skeleton(self.path)
        self.modules.clear()
        self.modules.update(find_modules(self.reader, linear_modules(skeleton)))
        self.config, self.skeleton = skeleton.config, True

    def needs_skeleton(self, adapter: Adapter, opts: MergeOptions) -> bool:
        """True when this merge involves a module the lean view cannot judge: a stored weight that is not
        quantized (float Linear, Conv1D or not a Linear at all), or a float output."""
        if opts.dtype or opts.quantize:
            return True
        model_type = getattr(self.config, "model_type", None)
        paths = [*adapter.vectors, *(p for c in adapter.vectors if adapter.is_feedforward(c)
                                     for p in fold_partners(model_type, c))]
        return any(p not in self.modules and f"{p}.weight" in self.reader for p in paths)

    def quantize_set(self, opts: MergeOptions) -> set[str]:
        """The modules transformers would quantize with ``opts.quantize`` (a fresh skeleton: the look-up
        replaces its layers)."""
        return modules_to_quantize(build_skeleton(self.path), _bnb_config(opts)) if opts.quantize else set()


class ModuleData:
    """One module's stored tensors, read once, and its float32 weight, decoded at most once, for every merge of
    a pass."""

    def __init__(self, module: Module, reader: CheckpointReader, device: torch.device | None = None) -> None:
        self.module = module
        self.tensors = {k: reader.get(k).to(device or "cpu") for k in module.keys}
        self._weight: torch.Tensor | None = None

    def weight(self) -> torch.Tensor:
        if self._weight is None:
            self._weight = _decode(self.module, self.tensors)
        return self._weight


class Merger:
    """One adapter into one base: the plan (from headers and the model skeleton), then its share of a pass."""

    def __init__(self, base: Base, adapter: Adapter, opts: MergeOptions) -> None:
        self.base, self.adapter, self.opts = base, adapter, opts
        self.reader = base.reader
        if opts.quantize and self.reader.quantization_config:
            raise OutputError(f"--quantize {opts.quantize}: the base {base.path} is already quantized",
                              hint="merge it as it is (no --quantize), or write floats with --dtype")
        if base.needs_skeleton(adapter, opts):
            base.complete()
        self.modules = base.modules
        check_adapter_fits(adapter, self.modules, base.path)
        quantize_set = base.quantize_set(opts)
        qc = self.reader.quantization_config or {}
        self.threshold = float(qc.get("llm_int8_threshold", 6.0))
        self.config = base.config
        steps = {path: Step(module, "copy") for path, module in self.modules.items()}
        for path, vector in adapter.vectors.items():
            flat = vector.detach().float().reshape(-1)
            steps[path].adapted = True
            if adapter.is_feedforward(path):
                steps[path].cols = flat
            else:
                steps[path].rows = flat
        # The adapter's own factors: the ground truth of every check, whatever the folds move around.
        self.truth_factors = {p: (st.rows, st.cols) for p, st in steps.items() if st.adapted}
        self.folds, no_fold = self._plan_folds(steps)
        self.steps: dict[str, Step] = {}
        self.entries: dict[str, ModuleReport] = {}
        for path, step in steps.items():
            plan_step(step, opts, quantize_set, self.reader)
            if path in no_fold:
                step.reason = f"{step.reason}; not folded: {no_fold[path]}"
            if step.transform not in ("copy", "folded") or step.out_kind == "float":
                self.steps[path] = step
            if step.adapted or step.folded_from:
                self.entries[path] = ModuleReport(
                    module=path, storage=step.module.storage, scales=self._scales(step), transform=step.transform,
                    reason=step.reason, out_storage=self._out_storage(step))
        self.owner = {k: path for path, step in self.steps.items() for k in step.module.keys}
        self.plan = self._plan()
        self.writer: StreamingWriter | None = None

    @staticmethod
    def _scales(step: Step) -> str:
        if not step.adapted:
            return "-"
        return "input" if step.cols is not None or step.transform == "folded" else "output"
    def _plan_folds(self, steps: dict[str, Step]) -> tuple[dict[str, Fold], dict[str, str]]:
        """Move input-side scales of quantized modules onto their producers' rows where that is exact."""
        opts = self.opts
        if not opts.fold or opts.dtype or opts.quantize or opts.requantize:
            return {}, {}
        model_type = getattr(self.config, "model_type", None)
        out_features = {p: m.out_features for p, m in self.modules.items()}
        folds, notes = {}, {}
        for path, step in steps.items():
            if step.cols is None or step.module.kind == "float":
                continue
            fold = find_fold(model_type, self.config, path, step.cols, out_features)
            if isinstance(fold, str):
                if fold:
                    notes[path] = fold
                continue
            producer = steps[fold.producer]
            pm = producer.module
            rows_exact = pm.kind != "4bit" or pm.in_features % int(pm.info["blocksize"]) == 0
            if producer.cols is None and not rows_exact:
                notes[path] = f"producer {fold.producer} could not take it exactly (its 4-bit blocks straddle rows)"
                continue
            rows = producer.rows.clone() if producer.rows is not None else torch.ones(pm.out_features)
            rows[fold.index] *= fold.vector
            producer.rows, producer.folded_from = rows, path
            step.cols, step.transform = None, "folded"
            step.reason = f"input scale folded into rows of {fold.producer} ({fold.kind})"
            folds[path] = fold
        return folds, notes

    def _plan(self) -> list[PlannedTensor]:
        plan, seen = [], set()
        for key in self.reader.tensors:
            owner = self.owner.get(key)
            if owner is None:
                info = self.reader.tensors[key]
                dtype = info.torch_dtype
                if self.opts.dtype and dtype.is_floating_point:
                    dtype = FLOAT_DTYPES[self.opts.dtype]
                plan.append(PlannedTensor(key, dtype, info.shape))
            elif owner not in seen:
                seen.add(owner)
                plan.extend(self.steps[owner].outputs)
        return plan

    def start(self, tmp: Path) -> None:
        """Open this merge's output files in ``tmp``."""
        self.writer = StreamingWriter(tmp, self.plan, parse_size(self.opts.max_shard_size))

    def needs_own_copy(self, key: str) -> bool:
        """True when an untouched tensor is not copied byte for byte (it is cast to --dtype)."""
        info = self.reader.tensors[key]
        return bool(self.opts.dtype) and info.torch_dtype.is_floating_point \
            and info.torch_dtype != FLOAT_DTYPES[self.opts.dtype]

    def finish(self, tmp: Path, report: MergeReport) -> None:
        """Close the files, check the folded paths over the written output, fill the report."""
        assert self.writer is not None
        report.files = self.writer.close()
        if self.opts.check and self.folds:
            merged = CheckpointReader(tmp)
            merged_keys = keys_by_module(merged.tensors, self.modules)
            base_keys = {p: m.keys for p, m in self.modules.items()}
            for consumer, fold in self.folds.items():
                entry = self.entries[consumer]
                producer = self.entries[fold.producer]
                cut = self._fold_sample(fold)
                truth_layers = self._layers(self.reader, base_keys, fold, cut, truth=True)
                merged_layers = self._layers(merged, merged_keys, fold, cut, truth=False)
                if fold.gate is not None and fold.gate not in self.steps:  # an untouched gate: run it once
                    merged_layers["gate"] = truth_layers["gate"]
                errors = check_fold(fold, truth_layers, merged_layers, self.modules[fold.producer].in_features,
                                    self.opts)
                limit = self._limit(producer.transform, producer.out_storage)
                if self.opts.max_error is None and self.modules[consumer].kind == "int8":
                    limit = max(limit, DEFAULT_LIMITS["fold-int8"])
                channels = cut["consumer"][1]
                for item in (entry, producer):
                    item.rel_error, item.max_abs_error = errors
                    item.limit = limit if item.limit is None else min(item.limit, limit)
                    item.rows_checked = self.modules[consumer].in_features if channels is None else channels.numel()
                trim()
        report.modules = [self.entries[p] for p in sorted(self.entries)]

    def _fold_sample(self, fold: Fold) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per role of a fold path, the (rows, columns) its check keeps: a sample of the channels between
        producer and consumer (the producer's rows, the gate's rows, the consumer's columns), or everything.
        Attention folds, and layers whose 4-bit blocks straddle rows, are checked whole."""
        whole: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {"consumer": (None, None)}
        if fold.kind not in ("gated", "activation"):
            return whole
        consumer = self.modules[fold.consumer]
        chunk = _row_chunk(consumer, consumer.kind)
        cutting = [self.modules[p] for p in (fold.producer, fold.gate) if p is not None]
        if chunk is None or any(_row_chunk(m, m.kind) is None for m in cutting):
            return whole
        n = consumer.in_features
        special = torch.cat([special_indices(self.truth_factors[fold.consumer][1]),
                             special_indices(fold.vector)])
        channels = sample(n, self.opts.check_sample, fold.consumer, self.opts.seed, chunk=chunk, special=special)
        if channels is None:
            return whole
        start = int(fold.index[0])  # the producer rows feeding the consumer start here (a fused gate_up: n)
        rows = torch.cat([channels, channels + start]) if fold.part == "second-half" else channels
        return {"consumer": (None, channels), "producer": (rows, None), "gate": (channels, None)}

    def _layers(self, reader: CheckpointReader, keys_of: dict[str, list[str]], fold: Fold,
                cut: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]], truth: bool,
                ) -> dict[str, torch.nn.Module]:
        """The fold's modules (consumer, producer, gate) as layers over ``reader``'s tensors (``keys_of``: each
        module's keys in that reader), restricted to the rows and columns in ``cut``; with ``truth``, wrapped
        with the adapter's own IA3 factors (the unmerged computation)."""
        layers = {}
        for role, path in (("consumer", fold.consumer), ("producer", fold.producer), ("gate", fold.gate)):
            if path is None:
                continue
            module = self.modules[path]
            kind = module.kind  # folds happen only when the output keeps the base's storage
            rows, cols = cut.get(role, (None, None))
            device = self.opts.torch_device
            tensors, n_in, n_out = restrict(kind, {k: reader.get(k).to(device) for k in keys_of[path]}, path,
                                            module.in_features, module.out_features, module.transposed, rows, cols)
            layer = build_layer(kind, tensors, path, n_in, n_out, module.transposed, self.threshold)
            if truth:
                own_rows, own_cols = self.truth_factors.get(path, (None, None))
                layer = ia3_truth(layer, kind, _pick(own_rows, rows), _pick(own_cols, cols))
            layers[role] = layer
        return layers

    def _limit(self, transform: str, storage: str) -> float:
        return self.opts.max_error if self.opts.max_error is not None else default_limit(transform, storage)

    def copy(self, key: str, tensor: torch.Tensor) -> None:
        """Write an untouched tensor already read (cast when --dtype asks for it)."""
        assert self.writer is not None
        if self.needs_own_copy(key):
            tensor = _cast(tensor, FLOAT_DTYPES[self.opts.dtype], key)
        self.writer.write(key, tensor)

    def merge_module(self, data: ModuleData, shared: bool = False) -> None:
        """Transform, check and write one module of this merge from the pass's ``data``; ``shared``: other
        merges of the pass transform it too (its decoded weight is then kept for all of them, whole)."""
        assert self.writer is not None
        step = self.steps[data.module.path]
        outputs = transform_module(step, data.tensors, self.opts, data.weight if shared else None)
        entry = self.entries.get(data.module.path)
        # A producer carrying a fold is checked with its consumer, end to end (see finish).
        if entry is not None and self.opts.check and not step.folded_from:
            entry.rel_error, entry.max_abs_error, entry.rows_checked = check_module(
                step, data.tensors, outputs, self.opts, self.threshold)
            entry.limit = self._limit(step.transform, entry.out_storage)
        for planned in step.outputs:
            self.writer.write(planned.key, outputs[planned.key])

    def _out_storage(self, step: Step) -> str:
        if step.transform == "folded":
            return step.module.storage
        if step.out_kind == "float":
            return self.opts.dtype or "float"
        if step.transform == "quantize":
            suffix = "+dq" if self.opts.double_quant else ""
            return "int8" if self.opts.quantize == "int8" else f"{self.opts.quantize}{suffix}"
        if step.transform == "exact-fold" and step.module.storage.endswith("+dq"):
            return step.module.storage.removesuffix("+dq")
        return step.module.storage


def _pick(vector: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor | None:
    return vector if vector is None or index is None else vector[index]


def _label(spec: str | Path) -> str:
    """How an input or output is named in merge_report.json (which may travel to the Hub): a Hub id or a relative
    path as given, an absolute path as ``.../<last component>`` (no machine paths in published files, and never
    mistaken for a Hub id)."""
    return f".../{Path(spec).name}" if Path(spec).is_absolute() else str(spec)


@dataclass
class MergeJob:
    """One adapter to merge in a pass over its base: the loaded adapter, where it goes, how, and its labels."""

    adapter: Adapter
    out: Path
    opts: MergeOptions
    base_label: str
    adapter_label: str
    fingerprint: str | None = None


@dataclass
class _Live:
    index: int
    job: MergeJob
    merger: Merger
    tmp: Path
    report: MergeReport


def run_pass(base: Base, jobs: list[MergeJob], progress: Callable[[int, int], None] | None = None,
             ) -> list[MergeReport | IA3ConvertError]:
    """Merge every job's adapter into ``base`` in ONE read of it: each stored tensor is read once, each module
    decoded at most once, and every output written from that pass. Returns, per job, its report or the error
    that stopped it (a job's failure is its own: the others go on). Interrupts and internal errors remove every
    unfinished output and propagate."""
    started = time.perf_counter()
    results: list[MergeReport | IA3ConvertError | None] = [None] * len(jobs)
    live: list[_Live] = []

    def fail(entry: _Live, exc: IA3ConvertError) -> None:
        if entry.merger.writer is not None:
            entry.merger.writer.abort()
        shutil.rmtree(entry.tmp, ignore_errors=True)
        live.remove(entry)
        results[entry.index] = exc

    try:
        for index, job in enumerate(jobs):
            try:
                merger = Merger(base, job.adapter, job.opts)
                sources = [base.path] + ([job.adapter.source] if job.adapter.source is not None else [])
                tmp = prepare_output(job.out, sources, job.opts.force)
            except IA3ConvertError as exc:
                results[index] = exc
                continue
            report = MergeReport(base=job.base_label, adapter=job.adapter_label, adapter_name=job.adapter.name,
                                 out=_label(job.out), checked=job.opts.check, fingerprint=job.fingerprint,
                                 options={k: v for k, v in vars(job.opts).items() if k != "force"})
            entry = _Live(index, job, merger, tmp, report)
            live.append(entry)
            try:
                _write_config_and_extras(base, job.opts, tmp)
                merger.start(tmp)
            except IA3ConvertError as exc:
                fail(entry, exc)
        reader = base.reader
        total = len(reader.tensors)
        module_of = {k: path for path, m in base.modules.items() for k in m.keys}
        touched = {module_of[k] for e in live for k in e.merger.owner}
        done = 0
        # First every tensor outside the transformed modules: the copies queue on the I/O thread and proceed
        # (in the kernel, GIL-free) while the modules below are decoded, merged and checked.
        for key in reader.tensors:
            if module_of.get(key) not in touched:
                _copy_everywhere(reader, key, live, fail)
                done += 1
                if progress is not None:
                    progress(done, total)
        # Then each transformed module: read once, merged, checked and written whole for every merge, then
        # dropped: memory holds one module at a time.
        for path in sorted(touched, key=lambda p: reader.tensors[base.modules[p].keys[0]].start):
            owners = [e for e in live if e.merger.owner.get(base.modules[path].keys[0])]
            if owners:
                data = ModuleData(base.modules[path], reader, owners[0].job.opts.torch_device)
                for entry in list(live):
                    try:
                        if entry in owners:
                            entry.merger.merge_module(data, shared=len(owners) > 1)
                        else:  # the merges that keep this module as it is take it from the same read
                            for k in data.module.keys:
                                entry.merger.copy(k, data.tensors[k])
                    except IA3ConvertError as exc:
                        fail(entry, exc)
                del data
                trim()
            else:  # the merges that transform it have failed
                for k in base.modules[path].keys:
                    _copy_everywhere(reader, k, live, fail)
            done += len(base.modules[path].keys)
            if progress is not None:
                progress(done, total)
        for entry in list(live):
            try:
                entry.merger.finish(entry.tmp, entry.report)
                if not entry.report.passed:
                    raise MergeCheckError(entry.report)
                entry.report.seconds = round(time.perf_counter() - started, 3)
                with writing(entry.tmp / REPORT_NAME):
                    (entry.tmp / REPORT_NAME).write_text(json.dumps(entry.report.to_dict(), indent=2) + "\n")
                publish(entry.tmp, entry.job.out)
                results[entry.index] = entry.report
                live.remove(entry)
            except IA3ConvertError as exc:
                fail(entry, exc)
    except BaseException:
        for entry in live:
            if entry.merger.writer is not None:
                entry.merger.writer.abort()
            shutil.rmtree(entry.tmp, ignore_errors=True)
        raise
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _copy_everywhere(reader: CheckpointReader, key: str, live: list[_Live],
                     fail: Callable[[_Live, IA3ConvertError], None]) -> None:
    """An untouched tensor into every live merge's output: bytes copied from one read, or cast (--dtype)."""
    copiers = []
    for entry in list(live):
        try:
            if entry.merger.needs_own_copy(key):
                entry.merger.copy(key, reader.get(key))
            else:
                copiers.append(entry)
        except IA3ConvertError as exc:
            fail(entry, exc)
    if copiers:
        try:
            reader.copy_to([e.merger.writer for e in copiers], key)
        except IA3ConvertError as exc:
            for entry in copiers:
                fail(entry, exc)


def _write_config_and_extras(base: Base, opts: MergeOptions, tmp: Path) -> None:
    """config.json (the base's, or rewritten for --quantize/--dtype) and the base's other files (tokenizer...)."""
    config = _output_config(base.reader, opts)
    if config is None:
        copy_file(base.path / "config.json", tmp / "config.json")
    else:
        with writing(tmp / "config.json"):
            (tmp / "config.json").write_bytes(config)
    for extra in base.reader.other_files():
        copy_file(extra, tmp / extra.name)


def merge(base: str | Path, adapter: str | Path | Adapter, out: str | Path, *, adapter_name: str | None = None,
          quantize: str | None = None, double_quant: bool = False, dtype: str | None = None, renest: bool = False,
          requantize: bool = False, check: bool = True, max_error: float | None = None, probe_tokens: int = 32,
          probe_scale: float = 1.0, check_sample: int = 512, device: str = "cpu", seed: int = 0, fold: bool = True,
          max_shard_size: str | int = "5GB",
          force: bool = False, progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Merge an IA3 adapter into a base checkpoint and write a self-contained model to ``out``.

    ``base`` and ``adapter`` are local directories or Hub repo ids. By default the output keeps the base's
    storage (int8, nf4/fp4, float); ``quantize`` ("int8", "nf4", "fp4", with ``double_quant``) quantizes a
    float base on the way out, exactly as transformers would on load; ``dtype`` ("float16", "bfloat16",
    "float32") writes a dequantized float model instead. ``renest`` keeps nested 4-bit layers nested after an
    exact fold (small error); ``requantize`` forces dequantize-scale-requantize everywhere. ``fold`` (on by
    default) moves an input-side scale onto the rows of the layer producing that input where that is exact
    (gated MLPs, attention V, ReLU MLPs with non-negative scales; see ``folds``), so that it folds into the
    statistics instead of being requantized.

    Every merged module is checked against the IA3-wrapped original layer on ``probe_tokens`` seeded inputs,
    over ``check_sample`` of its output rows (fold paths: channels; drawn at random, plus the rows whose scales
    are extreme, zero or negative; 0 = every row); an error above ``max_error`` (default: per transform kind)
    raises ``MergeCheckError`` and writes nothing. ``device`` ("cpu", "cuda[:N]", "auto") is where modules are
    decoded, scaled, encoded and checked (on CUDA with bitsandbytes' own kernels).
    The output is built in a temporary sibling of ``out`` and renamed into place only when complete; an
    existing ``out`` is replaced only with ``force``. Returns the report (also saved as merge_report.json).
    Several adapters into one base: ``ia3convert.batch.run_batch`` reads the base once for all of them.
    """
    from .sources import resolve_adapter, resolve_base

    opts = MergeOptions(adapter_name=adapter_name, quantize=quantize, double_quant=double_quant, dtype=dtype,
                        renest=renest, requantize=requantize, check=check, max_error=max_error,
                        probe_tokens=probe_tokens, probe_scale=probe_scale, check_sample=check_sample, device=device,
                        seed=seed,
                        fold=fold,
                        max_shard_size=max_shard_size, force=force)
    opts.validate()
    parse_size(max_shard_size)
    base_dir = resolve_base(base)
    loaded = adapter if isinstance(adapter, Adapter) else read_adapter(resolve_adapter(adapter), adapter_name)
    adapter_spec = loaded.source if isinstance(adapter, Adapter) else adapter
    job = MergeJob(loaded, Path(out), opts, _label(base), _label(adapter_spec or ""))
    (result,) = run_pass(Base.open(base_dir), [job], progress)
    if isinstance(result, IA3ConvertError):
        raise result
    return result
