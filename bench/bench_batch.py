"""Batch benchmark: N adapters into one base, one batch pass against N separate `ia3convert merge` runs.

Builds a synthetic quantized Llama base locally (random weights; by default 1024 hidden, 8 layers, nf4) and N
adapters with PEFT's default llama targets, then measures, each in its own process, wall time and peak RSS of
`ia3convert batch` (one pass over the base for all N) and of N separate `ia3convert merge` runs (summed wall
time, largest peak RSS), for N = 1, 4, 16. Prints the ratios. Nothing is asserted.

    python bench/bench_batch.py [--counts 1 4 16] [--hidden 1024] [--layers 8] [--storage nf4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench_merge import PY, Shape, build_inputs, make_adapter, run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description="ia3convert batch vs separate merges")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--storage", choices=["int8", "nf4", "fp4", "nf4-dq"], default="nf4")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse built inputs here (default: a temp dir)")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ia3convert-bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        shape = Shape(args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
        fbase, qbase, _ = build_inputs(work, shape, args.storage)
        adapters = []
        for number in range(max(args.counts)):
            folder = work / f"adapter-{number}"
            if not (folder / "adapter_config.json").exists():
                make_adapter(fbase, folder, seed=number + 1)
            adapters.append(folder)
        cli = [PY, "-m", "ia3convert.cli"]
        print(f"base: llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
              f"{args.storage}; adapters: k, v, down")
        print(f"{'N':>3} {'batch s':>8} {'separate s':>11} {'speed-up':>9} {'batch MiB':>10} {'separate MiB':>13}")
        for count in args.counts:
            outs = work / "outs"
            shutil.rmtree(outs, ignore_errors=True)
            manifest = work / "manifest.json"
            manifest.write_text(json.dumps([{"base": str(qbase), "adapter": str(a), "out": str(outs / f"b{i}")}
                                            for i, a in enumerate(adapters[:count])]))
            batch_wall, batch_rss = run_measured([*cli, "batch", str(manifest), "--quiet", "--no-resume"])
            separate_wall, separate_rss = 0.0, 0.0
            for i, adapter in enumerate(adapters[:count]):
                wall, rss = run_measured([*cli, "merge", str(qbase), str(adapter), str(outs / f"s{i}"), "--quiet"])
                separate_wall += wall
                separate_rss = max(separate_rss, rss)
            print(f"{count:>3} {batch_wall:>8.1f} {separate_wall:>11.1f} {separate_wall / batch_wall:>8.2f}x "
                  f"{batch_rss:>10.0f} {separate_rss:>13.0f}")
            sys.stdout.flush()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
