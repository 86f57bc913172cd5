"""Codec benchmark: bitsandbytes' CPU quantizers against ia3convert's fast codecs, side by side, in one process.

For one random matrix (4096 x 11008, a 7B MLP projection, in float16 as transformers quantizes it) it times
``bitsandbytes.functional.quantize_4bit`` (nf4, fp4, nf4 nested) and ``int8_vectorwise_quant`` against
``ia3convert.codecs.four_bit.encode`` and ``int8.encode``, alternating the two in every repetition so that
a busy machine slows both alike, checks that the outputs are the same bytes, and prints a table of median
wall times and ratios (bitsandbytes / ia3convert).

    python bench/bench_codecs.py
    python bench/bench_codecs.py --rows 2048 --cols 5632 --repeat 9
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ia3convert.codecs import four_bit, int8


def bnb_4bit(weight: torch.Tensor, quant_type: str, nested: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    import bitsandbytes.functional as F

    codes, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=nested, quant_type=quant_type)
    return codes, state.as_dict(packed=True)


def ours_4bit(weight: torch.Tensor, quant_type: str, nested: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    packed = four_bit.encode(weight, quant_type, 64, nested, dtype=weight.dtype)
    return packed.codes, packed.stats


def bnb_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as F

    codes, stats, _ = F.int8_vectorwise_quant(weight)
    return codes, stats


def same_4bit(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def same_int8(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def timed(run: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=11008)
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions of each contender (median shown)")
    args = parser.parse_args()

    weight = (torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0)) * 0.02).half()
    cases: list[tuple[str, Callable[[], object], Callable[[], object], Callable[[tuple, tuple], bool]]] = [
        ("nf4", lambda: bnb_4bit(weight, "nf4", False), lambda: ours_4bit(weight, "nf4", False), same_4bit),
        ("fp4", lambda: bnb_4bit(weight, "fp4", False), lambda: ours_4bit(weight, "fp4", False), same_4bit),
        ("nf4 nested", lambda: bnb_4bit(weight, "nf4", True), lambda: ours_4bit(weight, "nf4", True), same_4bit),
        ("int8", lambda: bnb_int8(weight), lambda: int8.encode(weight), same_int8),
    ]
    print(f"{args.rows} x {args.cols} float16, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'codec':<12} {'bitsandbytes s':>15} {'ia3convert s':>13} {'speed-up':>9}  bytes")
    for name, reference, ours, same in cases:
        reference(), ours()  # warm-up: lazy tables, allocator, code paths
        times: dict[str, list[float]] = {"reference": [], "ours": []}
        identical = True
        for _ in range(args.repeat):
            reference_time, reference_out = timed(reference)
            ours_time, ours_out = timed(ours)
            times["reference"].append(reference_time)
            times["ours"].append(ours_time)
            identical = identical and same(reference_out, ours_out)
        slow, quick = statistics.median(times["reference"]), statistics.median(times["ours"])
        verdict = "identical" if identical else "DIFFER"
        print(f"{name:<12} {slow:>15.3f} {quick:>13.3f} {slow / quick:>8.1f}x  {verdict}")


if __name__ == "__main__":
    main()
