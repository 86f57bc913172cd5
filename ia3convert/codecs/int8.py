"""LLM.int8 row-wise storage: int8 codes ``CB`` [out, in] and float32 row absmax ``SCB`` [out].

``W ~= CB * SCB / 127``; the dequantization uses bitsandbytes' constant 7.874015718698502e-3 (not ``/127``)
so that it is bit-identical to bitsandbytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..imports import bnb_functional
from . import fast

INV_127 = 7.874015718698502e-3


def decode(codes: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """The float32 weight the codes stand for."""
    return codes.float() * scb.float()[:, None] * INV_127


def encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize as bitsandbytes does when transformers loads a model in 8-bit (weight cast to fp16 first):
    the bytes of bitsandbytes' ``int8_vectorwise_quant``, on CPU computed by ``fast.quantize_int8_rows``.

    All-zero rows (where bitsandbytes would compute 0 * 127 / 0) get zero codes and a zero scale.
    """
    half = weight.detach().to(torch.float16)
    if half.device.type == "cpu":
        return fast.quantize_int8_rows(half)
    F = bnb_functional()  # bitsandbytes' native kernels

    codes, scb, _ = F.int8_vectorwise_quant(half.contiguous())
    zero = scb == 0
    if zero.any():
        codes[zero] = 0
    return codes, scb.float()


def encode_rows(rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int], chunk_rows: int,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode`` on the CPU of the weight whose rows ``start:stop`` ``rows`` returns, ``chunk_rows`` rows at a
    time: the same bytes (the quantization is row by row) in the memory of one chunk."""
    out_features, in_features = shape
    codes = torch.empty(out_features, in_features, dtype=torch.int8)
    scb = torch.empty(out_features)
    for start in range(0, out_features, chunk_rows):
        stop = min(start + chunk_rows, out_features)
        codes[start:stop], scb[start:stop] = fast.quantize_int8_rows(rows(start, stop).to(torch.float16))
    return codes, scb


def fold_rows(codes: torch.Tensor, scb: torch.Tensor, vector: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly scale output rows by ``vector``: ``SCB *= |l|`` and negate the codes of rows where ``l < 0``.

    Codes lie in [-127, 127], so negation never overflows. No requantization happens.
    """
    factor = vector.to(scb.device, torch.float32).reshape(-1)
    new_scb = scb.float() * factor.abs()
    negative = factor < 0
    new_codes = torch.where(negative[:, None], -codes, codes) if negative.any() else codes
    return new_codes, new_scb
