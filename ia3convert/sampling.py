"""Sampled merge checks: the same layers, cut to a sample of output rows (and input columns), stored exactly.

A full check decodes every merged weight twice (ground truth and candidate), which costs several times what
copying the checkpoint does. A sampled check runs the same layer forwards (bitsandbytes' own, with the IA3
wrapper as ground truth) on a sub-layer: the weight's rows ``R`` (and, where a fold path needs it, the
consumer's columns ``R``) in the very same storage, codes and statistics copied, not re-quantized:

- float: ``W[R][:, C]``; int8: ``CB[R][:, C]`` and ``SCB[R]``;
- 4-bit: the blocks of rows ``R`` (and of the column chunks ``C``, whole blocks only) with their absmax; a
  nested absmax is de-nested first with bitsandbytes' own function (the values it dequantizes with).

The sub-layer's dequantized weight is bit for bit the full layer's dequantized weight sliced (tested against
bitsandbytes' ``dequantize_4bit`` of the whole layer). Rows are drawn at random (seeded per module) and
always include the rows whose scale is smallest, largest, zero or negative, where a wrong sign or a dropped
row would hide.
"""

from __future__ import annotations

import json
import zlib

import torch

from .codecs import four_bit

STATE_PREFIX = "quant_state.bitsandbytes__"
SPECIAL_LIMIT = 16  # at most this many zero or negative scales are added to a sample


def special_indices(vector: torch.Tensor | None) -> torch.Tensor:
    """Indices of a scale vector worth checking always: smallest, largest, zero and negative entries."""
    if vector is None or not vector.numel():
        return torch.empty(0, dtype=torch.long)
    flat = vector.reshape(-1)
    picks = [flat.argmin().reshape(1), flat.argmax().reshape(1),
             (flat == 0).nonzero().reshape(-1)[:SPECIAL_LIMIT], (flat < 0).nonzero().reshape(-1)[:SPECIAL_LIMIT]]
    return torch.cat(picks).unique()


def sample(n: int, size: int, key: str, seed: int, chunk: int = 1,
           special: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sorted indices of about ``size`` of ``n`` rows, drawn in aligned chunks of ``chunk`` (4-bit blocks), with
    the chunks of ``special`` always in; None means every row (``size`` <= 0, or the sample would be most of
    them)."""
    if size <= 0 or n % chunk or size * 2 >= n:
        return None
    chunks = n // chunk
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()) + 1)
    picked = torch.randperm(chunks, generator=generator)[: max(1, size // chunk)]
    if special is not None and special.numel():
        picked = torch.cat([picked, special // chunk])
    picked = picked.unique()
    if picked.numel() * 2 >= chunks:
        return None
    return (picked[:, None] * chunk + torch.arange(chunk)).reshape(-1)


def _cut(tensor: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    """``tensor[rows][:, cols]`` (None: all), copying only what is kept (a mapped tensor is read only there)."""
    if rows is not None:
        tensor = tensor.index_select(0, rows.to(tensor.device))
    if cols is not None:
        tensor = tensor.index_select(1, cols.to(tensor.device))
    return tensor.contiguous()


def quant_info(tensors: dict[str, torch.Tensor], prefix: str) -> dict:
    """The JSON part of a 4-bit layer's quant state (quant_type, blocksize, dtype, shape...), from its tensors."""
    key = next(k for k in tensors if k.startswith(f"{prefix}.weight.{STATE_PREFIX}"))
    return json.loads(bytes(tensors[key].tolist()).decode("utf-8"))


def restrict(kind: str, tensors: dict[str, torch.Tensor], prefix: str, in_features: int, out_features: int,
             transposed: bool, rows: torch.Tensor | None, cols: torch.Tensor | None,
             ) -> tuple[dict[str, torch.Tensor], int, int]:
    """The stored tensors of the sub-layer ``W[rows][:, cols]`` (None: all), and its (in, out) features.

    ``transposed`` marks a float Conv1D weight stored as [in, out]; 4-bit columns must be whole blocks (see
    ``merging._row_chunk``)."""
    if rows is None and cols is None:
        return tensors, in_features, out_features
    n_out = out_features if rows is None else rows.numel()
    n_in = in_features if cols is None else cols.numel()
    out: dict[str, torch.Tensor] = {}
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None:
        out[f"{prefix}.bias"] = bias if rows is None else bias[rows.to(bias.device)]
    weight = tensors[f"{prefix}.weight"]
    if kind == "float":
        out[f"{prefix}.weight"] = _cut(weight, cols, rows) if transposed else _cut(weight, rows, cols)
        return out, n_in, n_out
    if kind == "int8":
        out[f"{prefix}.weight"] = _cut(weight, rows, cols)
        out[f"{prefix}.SCB"] = _cut(tensors[f"{prefix}.SCB"].reshape(-1, 1), rows, None).reshape(-1)
        return out, n_in, n_out
    info = quant_info(tensors, prefix)
    blocksize = int(info["blocksize"])
    if in_features % blocksize or n_in % blocksize:
        raise ValueError(f"{prefix}: 4-bit rows of {in_features} cannot be cut in blocks of {blocksize}")
    stats = {k[len(prefix) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(f"{prefix}.weight.")}
    absmax = four_bit.absmax(four_bit.Packed4bit(weight, stats))
    per_row = in_features // blocksize
    blocks = None
    if cols is not None:
        blocks = cols.reshape(-1, blocksize)[:, 0] // blocksize
        if not torch.equal(cols, (blocks[:, None] * blocksize + torch.arange(blocksize)).reshape(-1)):
            raise ValueError(f"{prefix}: 4-bit columns must be whole blocks of {blocksize}")
    codes = _cut(weight.reshape(out_features, per_row, blocksize // 2), rows, blocks)
    sub_absmax = _cut(absmax.reshape(out_features, per_row), rows, blocks)
    state = {k: v for k, v in info.items() if not k.startswith("nested_")}
    state["shape"] = [n_out, n_in]
    out[f"{prefix}.weight"] = codes.reshape(-1, 1).contiguous()
    out[f"{prefix}.weight.absmax"] = sub_absmax.reshape(-1).contiguous()
    out[f"{prefix}.weight.quant_map"] = stats["quant_map"]
    state_bytes = json.dumps(state).encode("utf-8")
    out[f"{prefix}.weight.{STATE_PREFIX}{info['quant_type']}"] = torch.tensor(list(state_bytes), dtype=torch.uint8)
    return out, n_in, n_out
