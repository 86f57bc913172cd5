"""Fast CPU kernels for bitsandbytes' formats, bit-identical to bitsandbytes' own CPU kernels.

bitsandbytes 0.50 has no native CPU kernel for ``quantize_4bit`` or ``int8_vectorwise_quant``: they run plain
torch over the whole matrix (every temporary a fresh, page-faulting allocation), and ``torch.bucketize`` (a
scalar binary search per element) takes most of the 4-bit time. Here the same numbers are computed in
cache-sized chunks with reused buffers, two chunks at a time (torch kernels release the GIL, and the table
look-ups are single-threaded in torch), and the bucket search is replaced by two table look-ups that give
exactly the same bucket for every float:

* a monotone "cell" index ``trunc(K + K * y)`` (``K`` a power of two, so ``K * y`` is exact and the only
  rounding, in the addition, is monotone) splits [-1, 1] into ``2K`` cells. The tables are built by putting
  the bucket boundaries through the very same function, so each boundary sits in the cell of the values
  equal to it;
* ``K`` is chosen so that no cell holds two boundaries. For ``y`` in cell ``c``, a boundary in a lower cell
  is ``< y`` and one in a higher cell is ``> y`` (monotonicity), and a single comparison with the cell's own
  boundary (if any) settles the rest: ``bucket = below[c] + (y > boundary[c])``. That is
  ``torch.bucketize(y, boundaries, right=False)``, the number of boundaries strictly below ``y``, ties,
  signed zeros and denormals included.

Statistics (absmax, reciprocal, scaling) use the same float32 operations in the same order as bitsandbytes,
so they are the same bits. Blocks whose absmax is not finite (inf or NaN in the input) go through
``torch.bucketize`` as in bitsandbytes. Pure functions: tensors in, tensors out.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeVar

import torch

#: Elements per chunk: large enough that torch's per-call overhead (a few microseconds, paid under the GIL)
#: is small beside the work, small enough that a chunk's buffers stay in cache.
CHUNK = 1 << 19

#: Chunks in flight at once. torch parallelises elementwise kernels itself, but not ``index_select``;
#: two lanes keep both cores of a small machine busy through the look-ups.
LANES = 2

#: The clamp bitsandbytes puts on an absmax before taking its reciprocal (a Python float, as there).
ABSMAX_FLOOR = 1e-38

Task = TypeVar("Task")


@dataclass(frozen=True)
class _Tables:
    """Look-up tables for one 16-value code book."""

    cells: float  # K: y in [-1, 1] falls in cells 0 .. 2K
    offset: torch.Tensor  # K as a 0-dim float32 tensor (the addend of the cell index)
    bounds: torch.Tensor  # float32 [15]: midpoints of the sorted code book, bucketize's boundaries
    below: torch.Tensor  # int32 [2K + 2]: number of boundaries in cells lower than c
    boundary: torch.Tensor  # float32 [2K + 2]: the boundary in cell c, +inf where there is none
    pair: torch.Tensor  # uint8 [16 * 257]: packed byte for two buckets read as one native-endian int16


def _cell(y: torch.Tensor, cells: float, offset: torch.Tensor, scratch: torch.Tensor,
          out: torch.Tensor) -> torch.Tensor:
    """``trunc(K + K * y)`` (``K = cells = offset``) into ``out`` (int32) through ``scratch`` (float32).

    Monotone in ``y``: ``K * y`` is exact and the one rounding (of the sum, fused or not) is monotone."""
    torch.add(offset, y, alpha=cells, out=scratch)
    return out.copy_(scratch)


@lru_cache(maxsize=8)
def _tables(code_bytes: bytes) -> _Tables:
    code = torch.frombuffer(bytearray(code_bytes), dtype=torch.float32)
    order = torch.argsort(code, stable=True)  # FP4 has +0 twice (codes 0 and 8): the lower index first
    ordered = code[order]
    bounds = (ordered[:-1] + ordered[1:]) / 2
    if not bool(((bounds > -1) & (bounds < 1)).all()):
        raise ValueError("code book boundaries must lie inside (-1, 1)")
    # A cell is 1/K wide (plus a rounding): K = 2^ceil(log2(2 / smallest gap)) keeps boundaries in distinct
    # cells. FP4's boundaries around zero are 0.0026 apart, so K is 1024 there; NF4 needs 32.
    gap = float((bounds[1:] - bounds[:-1]).min())
    cells = float(2 ** max(4, math.ceil(math.log2(2.0 / gap))))
    if cells > 2**16:
        raise ValueError("code book boundaries too close for the cell tables")
    offset = torch.tensor(cells)
    index = _cell(bounds, cells, offset, torch.empty_like(bounds), torch.empty(15, dtype=torch.int32))
    if bool((index[1:] == index[:-1]).any()):
        raise ValueError("two code book boundaries share a cell")
    size = int(2 * cells) + 2
    below = torch.zeros(size, dtype=torch.int32)
    boundary = torch.full((size,), math.inf)
    for position, (cell, value) in enumerate(zip(index.tolist(), bounds.tolist(), strict=True)):
        below[cell + 1 :] = position + 1
        boundary[cell] = value
    nibble = order.to(torch.uint8)
    first, second = (g.reshape(-1) for g in torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"))
    low_byte, high_byte = (first, second) if sys.byteorder == "little" else (second, first)
    pair = torch.zeros(16 * 257, dtype=torch.uint8)
    pair[low_byte + 256 * high_byte] = (nibble[first] << 4) | nibble[second]
    return _Tables(cells, offset, bounds, below, boundary, pair)


def _tables_for(code: torch.Tensor) -> _Tables:
    return _tables(code.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def _run(tasks: Sequence[Task], work: Callable[[dict, Task], None]) -> None:
    """``work(buffers, task)`` for every task, over ``LANES`` threads, each with its own buffer dict."""
    lanes = min(LANES, len(tasks))
    if lanes == 0:
        return

    def lane(first: int) -> None:
        buffers: dict[str, torch.Tensor] = {}
        for task in tasks[first::lanes]:
            work(buffers, task)

    if lanes == 1:
        lane(0)
        return
    with ThreadPoolExecutor(lanes) as pool:
        for future in [pool.submit(lane, first) for first in range(lanes)]:
            future.result()


def _buffer(buffers: dict, name: str, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A lane's reusable buffer of at least ``size`` elements, first ``size`` returned."""
    buffer = buffers.get(name)
    if buffer is None or buffer.numel() < size:
        buffer = buffers[name] = torch.empty(size, dtype=dtype)
    return buffer[:size]


def _chunks(count: int, per_item: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges over ``count`` items of ``per_item`` elements, about ``CHUNK`` elements each."""
    step = max(1, CHUNK // max(1, per_item))
    return [(start, min(start + step, count)) for start in range(0, count, step)]


def _bucketize(buffers: dict, y: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """Bucket (0..15, int32) of each finite ``y``: ``bucketize(y, bounds)`` without the search."""
    n = y.numel()
    scratch = _buffer(buffers, "scratch", n)
    cell = _cell(y, tables.cells, tables.offset, scratch, _buffer(buffers, "cell", n, torch.int32))
    buckets = torch.index_select(tables.below, 0, cell, out=_buffer(buffers, "buckets", n, torch.int32))
    torch.index_select(tables.boundary, 0, cell, out=scratch)
    above = torch.gt(y, scratch, out=cell)
    return buckets.add_(above)


def _pack(buffers: dict, buckets: torch.Tensor, tables: _Tables, out: torch.Tensor) -> None:
    """Two buckets a byte into ``out``: first element in the high nibble, buckets mapped to code indices."""
    n = buckets.numel()
    small = _buffer(buffers, "small", n, torch.uint8).copy_(buckets)
    pairs = _buffer(buffers, "pairs", n // 2, torch.int32).copy_(small.view(torch.int16))
    torch.index_select(tables.pair, 0, pairs, out=out)


def _encode_blocks(buffers: dict, blocks: torch.Tensor, tables: _Tables, absmax: torch.Tensor,
                   packed: torch.Tensor) -> None:
    """Whole blocks ``[m, blocksize]`` of any float dtype: absmax into ``absmax`` [m], codes into ``packed``."""
    n = blocks.numel()
    values = _buffer(buffers, "values", n).view(blocks.shape)
    if blocks.dtype == torch.float32:
        torch.abs(blocks, out=values)
    else:
        values.copy_(blocks).abs_()  # exact: every float16 / bfloat16 is a float32
    torch.amax(values, dim=-1, out=absmax)
    scale = 1.0 / absmax.clamp(min=ABSMAX_FLOOR)
    torch.mul(blocks, scale.view(-1, 1), out=values)
    flat = values.view(-1)
    if bool(torch.isfinite(absmax).all()):
        # No clamp to [-1, 1] needed: every boundary lies inside, so clamping cannot move a bucket.
        buckets = _bucketize(buffers, flat, tables)
    else:
        buckets = torch.bucketize(flat.clamp_(-1, 1), tables.bounds, out_int32=True)
    _pack(buffers, buckets, tables, packed)


def _encode_tail(tail: torch.Tensor, tables: _Tables, absmax: torch.Tensor, packed: torch.Tensor) -> None:
    """The short last block, as bitsandbytes treats it: its absmax is stored clamped, the values are divided
    by it (not multiplied by its reciprocal), and an odd element count pads one zero."""
    values = tail.float()
    top = values.abs().max().clamp(min=ABSMAX_FLOOR)
    absmax.copy_(top)
    scaled = torch.clamp(values / top, -1, 1)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    buckets = torch.bucketize(scaled, tables.bounds, out_int32=True)
    _pack({}, buckets, tables, packed)


def quantize_4bit(weight: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 4-bit codes (uint8 ``[ceil(n / 2), 1]``) and float32 absmax (one per block of ``blocksize``
    flattened elements, the last one possibly short) of ``weight`` for the 16-value ``code`` book: the
    output of bitsandbytes' CPU ``quantize_4bit`` kernel with uint8 storage, bit for bit."""
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"4-bit quantization takes float16, bfloat16 or float32, got {weight.dtype}")
    tables = _tables_for(code)
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    whole, rest = divmod(n, blocksize)
    absmax = torch.empty(whole + (1 if rest else 0))
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    blocks = flat[: whole * blocksize].view(whole, blocksize)
    half = blocksize // 2

    def work(buffers: dict, task: tuple[int, int]) -> None:
        start, stop = task
        _encode_blocks(buffers, blocks[start:stop], tables, absmax[start:stop], packed[start * half : stop * half])

    _run(_chunks(whole, blocksize), work)
    if rest:
        _encode_tail(flat[whole * blocksize :], tables, absmax[whole:], packed[whole * half :])
    return packed.unsqueeze(1), absmax


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 row quantization of a 2-D float tensor: int8 codes ``round(w * (127 / rowabsmax))`` and the
    float32 row absmax, bit for bit as bitsandbytes' CPU ``int8_vectorwise_quant`` (threshold 0) computes
    them. Rows whose absmax is zero get zero codes (bitsandbytes would compute 0 * inf there)."""
    if weight.dim() != 2:
        raise ValueError(f"int8 row quantization takes a 2-D tensor, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    weight = weight.detach().contiguous()
    codes = torch.empty(rows, cols, dtype=torch.int8)
    stats = torch.empty(rows)

    def work(buffers: dict, task: tuple[int, int]) -> None:
        start, stop = task
        part = weight[start:stop]
        magnitude = _buffer(buffers, "magnitude", part.numel(), part.dtype).view(part.shape)
        torch.abs(part, out=magnitude)
        row_stats = stats[start:stop]
        row_stats.copy_(torch.amax(magnitude, dim=1))
        scale = 127.0 / row_stats.unsqueeze(-1)
        values = _buffer(buffers, "values", part.numel()).view(part.shape)
        torch.mul(part, scale, out=values)
        codes[start:stop].copy_(values.round_())
        zero = row_stats == 0
        if bool(zero.any()):
            codes[start:stop][zero] = 0

    _run(_chunks(rows, cols), work)
    return codes, stats
