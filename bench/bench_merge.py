"""Merge benchmark: ia3convert against the route a user has today, side by side, in one run.

Builds a synthetic Llama checkpoint locally (random weights, TinyLlama-1.1B dimensions by default), its
quantized twin (transformers + bitsandbytes) and a PEFT-default IA3 adapter (k_proj, v_proj, down_proj), then
runs each contender in its own process and measures wall time and peak RSS:

- ``ia3convert merge QBASE ADAPTER OUT`` on the quantized base (streaming, exact folds where possible);
- ``ia3convert merge FBASE ADAPTER OUT --quantize Q`` from the float base;
- the route today: transformers + PEFT load the float model, ``merge_and_unload``, save, reload it quantized
  with ``BitsAndBytesConfig``, save (PEFT cannot merge into the quantized model itself);
- the disk floor: copying the quantized checkpoint's files.

    python bench/bench_merge.py                       # TinyLlama-1.1B shape, nf4
    python bench/bench_merge.py --storage int8 --layers 4
Prints a table with ratios (route / ia3convert). Nothing here is asserted: the numbers are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PY = sys.executable


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


def build_inputs(work: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Float base, quantized base and adapter; made once per work directory (not measured)."""
    fbase, qbase, adapter = work / "base-fp16", work / f"base-{args.storage}", work / "adapter"
    script = textwrap.dedent(f"""
        import torch, transformers
        from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size={args.hidden}, intermediate_size={args.intermediate},
                          num_hidden_layers={args.layers}, num_attention_heads={args.heads},
                          num_key_value_heads={args.kv_heads}, vocab_size={args.vocab},
                          max_position_embeddings=2048, tie_word_embeddings=False)
        if {not (fbase / "config.json").exists()}:
            model = LlamaForCausalLM(cfg).to(torch.float16)
            model.save_pretrained({str(fbase)!r})
            del model
        storage = {args.storage!r}
        qc = (BitsAndBytesConfig(load_in_8bit=True) if storage == "int8" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=storage.split("-")[0],
                                 bnb_4bit_use_double_quant=storage.endswith("-dq")))
        q = LlamaForCausalLM.from_pretrained({str(fbase)!r}, quantization_config=qc, device_map="cpu")
        q.save_pretrained({str(qbase)!r})
    """)
    if not (qbase / "config.json").exists():
        print(f"building synthetic inputs in {work} ...", file=sys.stderr)
        subprocess.run([PY, "-c", script], check=True)
    if not (adapter / "adapter_config.json").exists():
        make_adapter(fbase, adapter)
    return fbase, qbase, adapter


def make_adapter(fbase: Path, out: Path, seed: int = 1) -> None:
    """A PEFT-default llama adapter (k, v scaled on the output side, down_proj on the input side)."""
    import torch

    from ia3convert import Adapter, IA3Config

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


def main() -> None:
    parser = argparse.ArgumentParser(description="ia3convert merge vs the transformers + PEFT route")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--storage", choices=["int8", "nf4", "fp4", "nf4-dq"], default="nf4")
    parser.add_argument("--workdir", type=Path, default=None, help="reuse built inputs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ia3convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        fbase, qbase, adapter = build_inputs(work, args)
        merge = [PY, "-m", "ia3convert.cli", "merge", "--quiet", "--force"]
        quant = args.storage.split("-")[0]
        double = ["--double-quant"] if args.storage.endswith("-dq") else []
        contenders = {
            f"ia3convert merge ({args.storage} base)": [*merge, str(qbase), str(adapter), str(work / "o1")],
            f"ia3convert merge --quantize {quant} (fp16 base)": [
                *merge, str(fbase), str(adapter), str(work / "o2"), "--quantize", quant, *double],
            "route today: PEFT float merge + transformers quantize": [
                PY, "-c", ROUTE, str(fbase), str(adapter), str(work / "tmp-float"), str(work / "o3"), args.storage],
            "disk floor: copy the quantized checkpoint": [
                PY, "-c", COPY, str(qbase), str(work / "o4")],
        }
        results = {}
        for name, command in contenders.items():
            for leftover in ("o1", "o2", "o3", "o4", "tmp-float"):
                shutil.rmtree(work / leftover, ignore_errors=True)
            results[name] = run_measured(command)
        route_wall, route_rss = results["route today: PEFT float merge + transformers quantize"]
        size = sum(p.stat().st_size for p in qbase.glob("*.safetensors")) / 2**20
        print(f"model: llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
              f"vocab={args.vocab}, {args.storage} checkpoint {size:.0f} MiB; adapter: k, v, down "
              f"(machine: {os.cpu_count()} cores)")
        print(f"{'contender':<52} {'wall s':>8} {'peak RSS MiB':>13} {'route/ours wall':>16} {'route/ours RSS':>15}")
        for name, (wall, rss) in results.items():
            print(f"{name:<52} {wall:>8.1f} {rss:>13.0f} {route_wall / wall:>16.2f} {route_rss / rss:>15.2f}")
        floor_wall = results["disk floor: copy the quantized checkpoint"][0]
        ours_wall = results[f"ia3convert merge ({args.storage} base)"][0]
        print(f"ia3convert merge / disk floor, wall: {ours_wall / floor_wall:.1f}x")
        if args.json:
            args.json.write_text(json.dumps({k: {"wall_s": w, "peak_rss_mib": r} for k, (w, r) in results.items()},
                                            indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
