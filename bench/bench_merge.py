"""Merge benchmark: ia3convert against the route a user has today and against the disk floor, in one run.

For each model size and storage it builds (once per work directory, not measured) a synthetic Llama
checkpoint with random weights, its quantized twin (transformers + bitsandbytes) and a PEFT-default IA3
adapter (k_proj, v_proj scaled on the output side, down_proj on the input side), then runs each contender in
its own process and measures wall time and peak RSS:

- ``ia3convert merge QBASE ADAPTER OUT`` (streaming, exact folds, sampled check: the defaults);
- the same with ``--check-sample 0`` (every row of every merged module checked);
- the route today: transformers + PEFT load the float model, ``merge_and_unload``, save, reload it quantized
  with ``BitsAndBytesConfig``, save (PEFT cannot merge into the quantized model itself);
- the disk floor: copying the quantized checkpoint's files (``shutil.copytree``, from the page cache).

Sizes: ``tinyllama`` (TinyLlama-1.1B: hidden 2048, intermediate 5632, 22 layers, 4 KV heads) and ``7b``
(Llama-2-7B's layer shape: hidden 4096, intermediate 11008, 32 heads, with ``--layers-7b`` layers; the cost
per layer is what grows with a real 7B). ``toy`` is a seconds-long size for smoke tests.

    python bench/bench_merge.py                                   # tinyllama and 7b x int8, nf4, nf4-dq
    python bench/bench_merge.py --sizes tinyllama --storages nf4 --workdir /tmp/bench
Prints one table with ratios; nothing is asserted: the numbers are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

PY = sys.executable
STORAGES = ("int8", "nf4", "fp4", "nf4-dq")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int


SHAPES = {
    "tinyllama": Shape(2048, 5632, 22, 32, 4, 32000),
    "7b": Shape(4096, 11008, 8, 32, 32, 32000),
    "toy": Shape(128, 256, 1, 4, 2, 300),
}


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run a command in its own process; (wall seconds, peak RSS in MiB) of that process alone."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(args)}\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def build_inputs(work: Path, shape: Shape, storage: str) -> tuple[Path, Path, Path]:
    """Float base, quantized base and adapter in ``work``; made once per work directory (not measured)."""
    fbase, qbase, adapter = work / "base-fp16", work / f"base-{storage}", work / "adapter"
    script = textwrap.dedent(f"""
        import torch, transformers
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size={shape.hidden}, intermediate_size={shape.intermediate},
                          num_hidden_layers={shape.layers}, num_attention_heads={shape.heads},
                          num_key_value_heads={shape.kv_heads}, vocab_size={shape.vocab},
                          max_position_embeddings=2048, tie_word_embeddings=False)
        if {not (fbase / "config.json").exists()}:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
            model.save_pretrained({str(fbase)!r})
            del model
        storage = {storage!r}
        qc = (BitsAndBytesConfig(load_in_8bit=True) if storage == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=storage.split("-")[0],
                                 bnb_4bit_use_double_quant=storage.endswith("-dq")))
        q = LlamaForCausalLM.from_pretrained({str(fbase)!r}, quantization_config=qc, device_map="cpu")
        q.save_pretrained({str(qbase)!r})
    """)
    work.mkdir(parents=True, exist_ok=True)
    if not (qbase / "config.json").exists():
        print(f"building {qbase} ...", file=sys.stderr)
        subprocess.run([PY, "-c", script], check=True)
    if not (adapter / "adapter_config.json").exists():
        make_adapter(fbase, adapter)
    return fbase, qbase, adapter


ADAPTER = """
import json, sys, torch
from pathlib import Path
from ia3convert import Adapter, IA3Config
fbase, out, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
config = json.loads((fbase / "config.json").read_text())
hidden, inter = config["hidden_size"], config["intermediate_size"]
kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
generator = torch.Generator().manual_seed(seed)
vectors = {}
for layer in range(config["num_hidden_layers"]):
    prefix = f"model.layers.{layer}"
    vectors[f"{prefix}.self_attn.k_proj"] = 1 + 0.2 * torch.randn(kv, 1, generator=generator)
    vectors[f"{prefix}.self_attn.v_proj"] = 1 + 0.2 * torch.randn(kv, 1, generator=generator)
    vectors[f"{prefix}.mlp.down_proj"] = 1 + 0.2 * torch.randn(1, inter, generator=generator)
ia3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                base_model_name_or_path=str(fbase))
Adapter(config=ia3, vectors=vectors).save(out)
"""


def make_adapter(fbase: Path, out: Path, seed: int = 1) -> None:
    """A PEFT-default llama adapter (k, v scaled on the output side, down_proj on the input side), made in a
    child process: this process stays small, so that the peak RSS of the processes it forks (which starts at
    the parent's size) is theirs alone."""
    subprocess.run([PY, "-c", ADAPTER, str(fbase), str(out), str(seed)], check=True)


COPY = "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])"
ROUTE = """
import sys, torch, transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
transformers.logging.set_verbosity_error()
fbase, adapter, tmp, out, storage = sys.argv[1:6]
model = AutoModelForCausalLM.from_pretrained(fbase, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(tmp)
del model
qc = (BitsAndBytesConfig(load_in_8bit=True) if storage == "int8" else
      BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=storage.split("-")[0],
                         bnb_4bit_use_double_quant=storage.endswith("-dq")))
AutoModelForCausalLM.from_pretrained(tmp, quantization_config=qc, device_map="cpu").save_pretrained(out)
"""

OURS, FULL, ROUTE_NAME, FLOOR = "ia3convert merge", "ia3convert merge --check-sample 0", "route today", "disk floor"


def measure(work: Path, shape: Shape, storage: str, full_check: bool) -> dict[str, tuple[float, float]]:
    """Every contender on one (shape, storage), each in its own process, outputs removed in between."""
    fbase, qbase, adapter = build_inputs(work, shape, storage)
    merge = [PY, "-m", "ia3convert.cli", "merge", "--quiet", "--force", str(qbase), str(adapter)]
    contenders = {OURS: [*merge, str(work / "out")]}
    if full_check:
        contenders[FULL] = [*merge, str(work / "out"), "--check-sample", "0"]
    contenders[ROUTE_NAME] = [PY, "-c", ROUTE, str(fbase), str(adapter), str(work / "tmp-float"), str(work / "out"),
                              storage]
    contenders[FLOOR] = [PY, "-c", COPY, str(qbase), str(work / "out")]
    results = {}
    for name, command in contenders.items():
        for leftover in ("out", "tmp-float"):
            shutil.rmtree(work / leftover, ignore_errors=True)
        results[name] = run_measured(command)
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.rmtree(work / "tmp-float", ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="ia3convert merge vs the transformers + PEFT route and the disk")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SHAPES), default=["tinyllama", "7b"])
    parser.add_argument("--storages", nargs="+", choices=STORAGES, default=["int8", "nf4", "nf4-dq"])
    parser.add_argument("--layers-7b", type=int, default=SHAPES["7b"].layers, help="layers of the 7b shape")
    parser.add_argument("--no-full-check", action="store_true", help="skip the --check-sample 0 contender")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse built inputs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ia3convert-bench-"))
    rows = []
    try:
        for size in args.sizes:
            shape = SHAPES[size]
            if size == "7b":
                shape = Shape(**{**vars(shape), "layers": args.layers_7b})
            for storage in args.storages:
                results = measure(work / f"{size}-{shape.layers}", shape, storage, not args.no_full_check)
                qbase = work / f"{size}-{shape.layers}" / f"base-{storage}"
                mib = sum(p.stat().st_size for p in qbase.glob("*.safetensors")) / 2**20
                rows.append((f"{size} ({shape.layers} layers)", storage, mib, results))
                print(f"done: {size} {storage}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; "
          "adapter: PEFT default llama targets (k, v, down)")
    header = (f"{'model':<20} {'storage':<7} {'MiB':>6}  {'contender':<34} {'wall s':>7} {'peak MiB':>9} "
              f"{'route/it wall':>13} {'route/it RSS':>12} {'it/floor wall':>13}")
    print(header)
    for model, storage, mib, results in rows:
        route_wall, route_rss = results[ROUTE_NAME]
        floor_wall = results[FLOOR][0]
        for name, (wall, rss) in results.items():
            print(f"{model:<20} {storage:<7} {mib:>6.0f}  {name:<34} {wall:>7.1f} {rss:>9.0f} "
                  f"{route_wall / wall:>13.2f} {route_rss / rss:>12.2f} {wall / floor_wall:>13.1f}")
    if args.json:
        args.json.write_text(json.dumps([{"model": m, "storage": s, "checkpoint_mib": round(mib),
                                          "results": {k: {"wall_s": w, "peak_rss_mib": r} for k, (w, r) in
                                                      res.items()}} for m, s, mib, res in rows], indent=2))


if __name__ == "__main__":
    main()
