"""bitsandbytes 4-bit storage (NF4 / FP4, with or without nested "double" quantization of the absmax).

On disk, for a layer's ``weight``: the packed codes ``weight`` (uint8 ``[out*in/2, 1]``, two codes a byte,
row-major), ``weight.absmax`` (float32 per block of ``blocksize`` flattened elements, or uint8 codes when
nested), ``weight.quant_map`` (the 16-value code book), with nesting ``weight.nested_absmax`` and
``weight.nested_quant_map``, and ``weight.quant_state.bitsandbytes__<type>`` (JSON bytes of
``quant_type, blocksize, dtype, shape`` [+ ``nested_blocksize, nested_dtype, nested_offset``]).

Everything is produced through bitsandbytes' own ``QuantState`` so that the bytes match what
bitsandbytes and transformers write; the codes themselves come from ``fast`` (bit-identical, faster).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..imports import bnb_functional
from . import fast

STATE_PREFIX = "quant_state.bitsandbytes__"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Packed4bit:
    """One 4-bit weight: packed codes plus its statistics, keyed as after ``<module>.weight.`` on disk."""

    codes: torch.Tensor
    stats: dict[str, torch.Tensor]

    @property
    def info(self) -> dict[str, Any]:
        """The JSON part of the quant state (quant_type, blocksize, dtype, shape, nested_* ...)."""
        key = next(k for k in self.stats if k.startswith(STATE_PREFIX))
        return json.loads(bytes(self.stats[key].tolist()).decode("utf-8"))

    @property
    def nested(self) -> bool:
        return "nested_absmax" in self.stats

    @property
    def shape(self) -> tuple[int, int]:
        out_features, in_features = self.info["shape"]
        return int(out_features), int(in_features)

    @property
    def blocksize(self) -> int:
        return int(self.info["blocksize"])

    def quant_state(self):
        """bitsandbytes' QuantState for these statistics (from a copy: ``from_dict`` mutates its input)."""
        return bnb_functional().QuantState.from_dict(dict(self.stats), device=self.codes.device)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Checkpoint tensors under ``<prefix>`` (``<module>.weight``)."""
        return {prefix: self.codes, **{f"{prefix}.{k}": v for k, v in self.stats.items()}}


def _from_state(codes: torch.Tensor, state) -> Packed4bit:
    return Packed4bit(codes=codes, stats=state.as_dict(packed=True))


def decode(packed: Packed4bit) -> torch.Tensor:
    """The float32 weight ``[out, in]``: bitsandbytes' dequantization computed in float32 (code * absmax,
    without the rounding to the stored dtype that would add error to a float32 output)."""
    F = bnb_functional()

    state = packed.quant_state()
    state.dtype = torch.float32
    return F.dequantize_4bit(packed.codes, state)


def encode(weight: torch.Tensor, quant_type: str, blocksize: int = 64, nested: bool = False,
           dtype: torch.dtype = torch.float16) -> Packed4bit:
    """Quantize as transformers does when it loads a model in 4-bit: the weight in ``dtype``, then
    bitsandbytes' ``quantize_4bit`` with uint8 storage. On CPU the codes and absmax come from
    ``fast.quantize_4bit`` (the same bytes, several times faster: bitsandbytes has no CPU kernel for this);
    the nesting of the absmax and the quant state are bitsandbytes' own."""
    F = bnb_functional()

    if blocksize not in BLOCKSIZES:
        raise ValueError(f"invalid blocksize {blocksize}: bitsandbytes takes {BLOCKSIZES}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    source = weight.detach().to(dtype)
    if source.device.type != "cpu":  # bitsandbytes' native kernels
        codes, state = F.quantize_4bit(source.contiguous(), blocksize=blocksize, compress_statistics=nested,
                                       quant_type=quant_type, quant_storage=torch.uint8)
        return _from_state(codes, state)
    return encode_rows(lambda start, stop: source[start:stop], tuple(source.shape), quant_type, blocksize, nested,
                       dtype, chunk_rows=max(1, source.shape[0]))


def encode_rows(rows: Callable[[int, int], torch.Tensor], shape: tuple[int, ...], quant_type: str, blocksize: int,
                nested: bool, dtype: torch.dtype, chunk_rows: int) -> Packed4bit:
    """``encode`` on the CPU of the 2-D weight whose rows ``start:stop`` ``rows`` returns, ``chunk_rows`` rows at
    a time: the same bytes in the memory of one chunk, since 4-bit blocks are independent and never straddle
    two chunks (``chunk_rows * in_features`` must be a multiple of ``blocksize``, but for the last chunk)."""
    F = bnb_functional()
    out_features, in_features = shape
    if (chunk_rows * in_features) % blocksize and chunk_rows < out_features:
        raise ValueError(f"chunks of {chunk_rows} rows of {in_features} split blocks of {blocksize}")
    elements = out_features * in_features
    code = F.get_4bit_type(quant_type, device="cpu")
    codes = torch.empty((elements + 1) // 2, 1, dtype=torch.uint8)
    block_absmax = torch.empty(-(-elements // blocksize))
    for start in range(0, out_features, chunk_rows):
        part_codes, part_absmax = fast.quantize_4bit(rows(start, min(start + chunk_rows, out_features)).to(dtype),
                                                     code, blocksize)
        first = start * in_features
        codes[first // 2 : first // 2 + part_codes.shape[0]] = part_codes
        block_absmax[first // blocksize : first // blocksize + part_absmax.numel()] = part_absmax
    common = {"shape": torch.Size(shape), "dtype": dtype, "blocksize": blocksize, "code": code,
              "quant_type": quant_type}
    if nested:
        offset = block_absmax.mean()
        nested_absmax, state2 = F.quantize_blockwise(block_absmax - offset, blocksize=256)
        state = F.QuantState(absmax=nested_absmax, offset=offset, state2=state2, **common)
    else:
        state = F.QuantState(absmax=block_absmax, **common)
    return _from_state(codes, state)


def absmax(packed: Packed4bit) -> torch.Tensor:
    """The float32 per-block absmax, de-nested if needed (as bitsandbytes computes it when dequantizing)."""
    F = bnb_functional()

    state = packed.quant_state()
    if not state.nested:
        return state.absmax.float()
    return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def denest(packed: Packed4bit) -> Packed4bit:
    """The same weight with a plain float32 absmax (exact: the values bitsandbytes dequantizes with)."""
    if not packed.nested:
        return packed
    state = packed.quant_state()
    state.absmax = absmax(packed)
    state.nested, state.state2, state.offset = False, None, None
    return _from_state(packed.codes, state)


def renest(packed: Packed4bit) -> Packed4bit:
    """Nest a float32 absmax again, as bitsandbytes' ``quantize_4bit`` does (mean offset, 8-bit blocks of 256).
    Not exact: the absmax is itself quantized."""
    F = bnb_functional()

    if packed.nested:
        return packed
    state = packed.quant_state()
    offset = state.absmax.mean()
    state.absmax, state.state2 = F.quantize_blockwise(state.absmax - offset, blocksize=256)
    state.offset, state.nested = offset, True
    return _from_state(packed.codes, state)


def can_fold_rows(packed: Packed4bit) -> bool:
    """Row scaling is exact through the absmax when no block straddles two rows."""
    _, in_features = packed.shape
    return in_features % packed.blocksize == 0


def fold_rows(packed: Packed4bit, vector: torch.Tensor) -> Packed4bit:
    """Exactly scale output rows: each block's absmax times its row's factor (codes unchanged).

    Needs ``can_fold_rows``; a nested absmax is de-nested first (call ``renest`` to nest it again).
    Negative and zero factors are exact too: the sign rides on the absmax, never on the asymmetric code book.
    """
    if not can_fold_rows(packed):
        raise ValueError("blocks straddle rows: requantize instead")
    _, in_features = packed.shape
    plain = denest(packed)
    state = plain.quant_state()
    per_block = vector.to(plain.codes.device, torch.float32).reshape(-1).repeat_interleave(
        in_features // packed.blocksize)
    state.absmax = state.absmax.float() * per_block
    return _from_state(plain.codes, state)
