"""Merge-accuracy checks: each merged module against the IA3-wrapped layer over the ORIGINAL tensors.

Ground truth is the forward of ``layers``' wrappers (PEFT's math) around a bitsandbytes or float layer built
from the base's stored tensors; the candidate is a plain layer built from the merged tensors. Both are built
the same way (eval mode, float32 compute) and run on the same seeded probe inputs.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

# Default --max-error (relative Frobenius error of the layer output) per transform kind and storage.
# Exact folds only reorder float32 rounding; re-quantization costs about a fresh quantization (int8 ~1%,
# nf4 ~10%, fp4 ~13% of the weight), to which int8 layers add their activation rounding.
DEFAULT_LIMITS: dict[str, float] = {
    "exact-fold": 1e-5,
    # A fold path into an int8 consumer: that layer casts its input to fp16 and quantizes it per row to 8 bits,
    # so a 1-ulp difference upstream (the producer's scale applied through SCB instead of after the output)
    # can move a value, or a row's maximum, by one int8 step: measured up to 4.6e-4 on a 512-channel sample
    # of TinyLlama-shape layers, against 3e-2 for requantizing the consumer.
    "fold-int8": 1e-3,
    "fold-renest": 1e-2,
    "multiply": 1e-2,
    "dequantize": 3e-2,
    "requantize:int8": 5e-2,
    "requantize:nf4": 0.2,
    "requantize:fp4": 0.25,
}


def default_limit(transform: str, storage: str) -> float:
    """The default --max-error for a module merged by ``transform`` into ``storage``."""
    if transform in ("requantize", "quantize"):
        base = "int8" if storage == "int8" else ("fp4" if storage.startswith("fp4") else "nf4")
        return DEFAULT_LIMITS[f"requantize:{base}"]
    return DEFAULT_LIMITS[transform]


@dataclass
class ModuleReport:
    """How one adapted module was merged and how close the result is to the IA3 forward."""

    module: str
    storage: str
    scales: str
    transform: str
    reason: str
    out_storage: str
    rel_error: float | None = None
    max_abs_error: float | None = None
    limit: float | None = None
    rows_checked: int | None = None  # output rows (or, for a fold, channels) the check compared

    @property
    def ok(self) -> bool:
        return self.rel_error is None or self.limit is None or self.rel_error <= self.limit


@dataclass
class MergeReport:
    """What a merge did: per module, the transform and its measured error; overall, whether all passed."""

    base: str
    adapter: str
    adapter_name: str
    out: str
    options: dict[str, Any]
    modules: list[ModuleReport] = field(default_factory=list)
    checked: bool = True
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)
    fingerprint: str | None = None  # of the inputs and options, when a batch records it for resuming

    @property
    def passed(self) -> bool:
        return all(m.ok for m in self.modules)

    @property
    def failures(self) -> list[ModuleReport]:
        return [m for m in self.modules if not m.ok]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        data["summary"] = self.summary()
        return data

    def summary(self) -> dict[str, Any]:
        """Counts and worst errors per transform kind."""
        kinds: dict[str, dict[str, Any]] = {}
        for m in self.modules:
            entry = kinds.setdefault(m.transform, {"modules": 0, "max_rel_error": None})
            entry["modules"] += 1
            if m.rel_error is not None:
                entry["max_rel_error"] = max(entry["max_rel_error"] or 0.0, m.rel_error)
        return kinds

    def table(self) -> str:
        """A compact, aligned text table (one line per module, with the reason for its transform)."""
        if not self.modules:
            return "no module merged"
        width = max(len(m.module) for m in self.modules)
        lines = [f"{'module':<{width}}  {'storage':<8} {'scales':<6} {'transform':<11} {'rel error':>10} "
                 f"{'max abs':>10} {'limit':>8} {'rows':>6}  why"]
        for m in self.modules:
            rel = "-" if m.rel_error is None else f"{m.rel_error:.2e}"
            mx = "-" if m.max_abs_error is None else f"{m.max_abs_error:.2e}"
            lim = "-" if m.limit is None else f"{m.limit:.0e}"
            rows = "-" if m.rows_checked is None else str(m.rows_checked)
            flag = "FAIL " if not m.ok else ""
            lines.append(f"{m.module:<{width}}  {m.storage:<8} {m.scales:<6} {m.transform:<11} {rel:>10} "
                         f"{mx:>10} {lim:>8} {rows:>6}  {flag}{m.reason}")
        return "\n".join(lines)


def build_layer(kind: str, tensors: dict[str, torch.Tensor], prefix: str, in_features: int, out_features: int,
                transposed: bool = False, threshold: float = 6.0) -> nn.Module:
    """A layer computing what transformers' loaded layer computes for these stored tensors (eval mode).

    ``kind`` is ``float``, ``int8`` or ``4bit``; ``tensors`` are checkpoint tensors keyed as on disk;
    ``transposed`` marks a float Conv1D weight stored as [in, out].
    """
    bias = tensors.get(f"{prefix}.bias")
    weight = tensors[f"{prefix}.weight"]
    # Built on the meta device: no time spent on random initial weights that are replaced at once.
    if kind == "float":
        with torch.device("meta"):
            layer = nn.Linear(in_features, out_features, bias=bias is not None)
        layer.weight = nn.Parameter((weight.t() if transposed else weight).float().contiguous(), requires_grad=False)
    elif kind == "int8":
        from .imports import bitsandbytes

        bnb = bitsandbytes()

        with torch.device("meta"):
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                        threshold=threshold)
        codes, scb = weight.clone(), tensors[f"{prefix}.SCB"].clone()
        layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    else:
        from .imports import bitsandbytes

        bnb = bitsandbytes()

        stats = {k[len(prefix) + len(".weight."):]: v for k, v in tensors.items()
                 if k.startswith(f"{prefix}.weight.")}
        with torch.device("meta"):
            layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=stats, requires_grad=False,
                                                           device=weight.device, module=layer)
    if bias is not None:
        layer.bias = nn.Parameter(bias.float(), requires_grad=False)
    return layer.eval()


class _RowScaled(nn.Module):
    """An input-scaled IA3 layer whose output is also scaled: a producer that carries a folded scale."""

    def __init__(self, inner: nn.Module, rows: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.rows = inner, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return (y * self.rows.to(y.device)).to(y.dtype)


def ia3_truth(layer: nn.Module, kind: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    """The ground truth: ``layer`` (built from the original tensors) in the IA3 wrapper for its kind, scaling its
    output by ``rows`` and/or its input by ``cols`` exactly as PEFT's forward does."""
    from .layers import Linear, Linear4bit, Linear8bitLt

    wrapper = {"float": Linear, "int8": Linear8bitLt, "4bit": Linear4bit}[kind]
    side = cols if cols is not None else rows
    if side is None:
        return layer
    truth = wrapper(layer, "truth", is_feedforward=cols is not None)
    with torch.no_grad():
        truth.ia3_l["truth"].copy_(side.float().reshape(truth.vector_shape))
    if cols is not None and rows is not None:
        return _RowScaled(truth, rows.float())
    return truth


def probes(path: str, in_features: int, tokens: int, scale: float, seed: int,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded normal inputs for one module (the seed mixes in the module path, so modules differ); drawn on
    the CPU, so that they are the same whatever ``device`` the check runs on."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(path.encode()))
    return (torch.randn(tokens, in_features, generator=generator) * scale).to(device)


class _DropCastNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast" not in record.getMessage()


@contextmanager
def _int8_cast_notes_dropped() -> Iterator[None]:
    """bitsandbytes logs a warning for every int8 forward of a float32 input; the check feeds float32 probes on
    purpose (the layers cast them as in any float32 model), so the note is dropped while it runs."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    note = _DropCastNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


def compare(truth: Callable[[torch.Tensor], torch.Tensor], candidate: Callable[[torch.Tensor], torch.Tensor],
            x: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max absolute error) of candidate(x) against truth(x)."""
    with torch.no_grad(), _int8_cast_notes_dropped():
        expected = truth(x).double()
        got = candidate(x).double()
    diff = got - expected
    norm = expected.norm().item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    if not torch.isfinite(got).all():
        return float("inf"), float("inf")
    rel = diff.norm().item() / norm if norm > 0 else max_abs
    return rel, max_abs


def _mix_heads(values: torch.Tensor, heads: tuple[int, int, int], seed: int) -> torch.Tensor:
    """Attention's use of V, per query head: seeded row-stochastic token mixing of that head's KV-head slice."""
    num_heads, kv_heads, head_dim = heads
    tokens = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    group = num_heads // kv_heads
    outputs = []
    for head in range(num_heads):
        kv = head // group
        probs = torch.softmax(torch.randn(tokens, tokens, generator=generator), dim=-1).to(values.device,
                                                                                         values.dtype)
        outputs.append(probs @ values[:, kv * head_dim:(kv + 1) * head_dim])
    return torch.cat(outputs, dim=-1)


# transformers' activations that are exactly these torch functions (tested against ``ACT2FN``): no need to
# import transformers for them.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "swish": nn.functional.silu,
    "relu": nn.functional.relu,
    "gelu": nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' activation function of that name (``ACT2FN``)."""
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def fold_path(fold, layers: dict[str, nn.Module], x: torch.Tensor, seed: int,
              gate_out: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's input path for a fold: producer (and gate), the activation or product or attention mixing
    in between, then the consumer. ``gate_out`` is the gate's output when already computed (it does not change)."""
    produced = layers["producer"](x)
    if fold.kind == "attention":
        middle = _mix_heads(produced[:, fold.index], fold.heads, seed)
    elif fold.kind == "activation":
        middle = activation(fold.activation)(produced)
    else:
        act = activation(fold.activation or "silu")
        if fold.part == "second-half":
            gate, up = produced.chunk(2, dim=-1)
        else:
            gate, up = (layers["gate"](x) if gate_out is None else gate_out), produced
        middle = act(gate) * up
    return layers["consumer"](middle)


def check_fold(fold, truth: dict[str, nn.Module], merged: dict[str, nn.Module], in_features: int,
               opts) -> tuple[float, float]:
    """(relative, max-abs) error of the merged path against the IA3-wrapped original path on the same probes."""
    x = probes(fold.consumer, in_features, opts.probe_tokens, opts.probe_scale, opts.seed, opts.torch_device)
    gate_out = None
    if "gate" in truth and "gate" in merged and truth["gate"] is merged["gate"]:
        with torch.no_grad(), _int8_cast_notes_dropped():
            gate_out = truth["gate"](x)
    return compare(lambda v: fold_path(fold, truth, v, opts.seed, gate_out),
                   lambda v: fold_path(fold, merged, v, opts.seed, gate_out), x)
