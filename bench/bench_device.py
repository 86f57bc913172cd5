"""GPU benchmark: ``ia3convert merge --device cuda`` against ``--device cpu`` on the same inputs, in one run.

Needs a machine with CUDA; fits in a few minutes. Builds a synthetic Llama (TinyLlama-1.1B layer shape,
``--layers`` layers) quantized to each storage, with a PEFT-default adapter, then times, each in its own
process: the default merge (exact folds, sampled check), ``--requantize`` (every merged module decoded,
scaled and encoded again: the compute-heavy case) and ``--check-sample 0`` (every row checked), on the CPU
and on the GPU, and says whether the two devices wrote the same bytes.

    python bench/bench_device.py [--layers 8] [--storages int8 nf4 nf4-dq] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_merge import PY, SHAPES, STORAGES, Shape, build_inputs, run_measured

MODES = {"default": [], "--requantize": ["--requantize"], "--check-sample 0": ["--check-sample", "0"]}


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description="ia3convert merge on the GPU vs the CPU")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--storages", nargs="+", choices=STORAGES, default=["int8", "nf4", "nf4-dq"])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    # Asked in a child: this process stays without torch, so the processes it forks measure their own RSS.
    probe = subprocess.run([PY, "-c", "import torch; print(torch.cuda.get_device_name(0))"], capture_output=True,
                           text=True)
    if probe.returncode:
        raise SystemExit("no CUDA device here: this benchmark compares --device cuda with --device cpu")
    shape = Shape(**{**vars(SHAPES["tinyllama"]), "layers": args.layers})
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ia3convert-bench-device-"))
    print(f"GPU: {probe.stdout.strip()}; model: TinyLlama layer shape, {args.layers} layers")
    print(f"{'storage':<8} {'mode':<18} {'cpu s':>7} {'cuda s':>7} {'speed-up':>9} {'cpu MiB':>8} {'cuda MiB':>9} "
          f"{'same bytes':>11}")
    try:
        for storage in args.storages:
            _, qbase, adapter = build_inputs(work / "inputs", shape, storage)
            for mode, extra in MODES.items():
                results, digests = {}, {}
                for device in ("cpu", "cuda"):
                    out = work / f"out-{device}"
                    shutil.rmtree(out, ignore_errors=True)
                    results[device] = run_measured([PY, "-m", "ia3convert.cli", "merge", "--quiet", str(qbase),
                                                    str(adapter), str(out), "--device", device, *extra])
                    digests[device] = weights_digest(out)
                (cpu_s, cpu_mib), (gpu_s, gpu_mib) = results["cpu"], results["cuda"]
                print(f"{storage:<8} {mode:<18} {cpu_s:>7.1f} {gpu_s:>7.1f} {cpu_s / gpu_s:>8.2f}x {cpu_mib:>8.0f} "
                      f"{gpu_mib:>9.0f} {digests['cpu'] == digests['cuda']!s:>11}")
                sys.stdout.flush()
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
