"""The hardening catalogue: the real CLI on broken inputs, for every command.

Each case must end with a non-zero exit code and ONE line ``error: <what, where> (<what to do>)`` naming the
file, key or module; no traceback; the inputs byte-identical afterwards; no output and no temporary directory
left behind. Then: a base without tokenizer still merges, and a write that fails midway (disk full, file size
limit) leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, FIXTURES, MODELS, ROOT
from safetensors.torch import load_file, save_file

from ia3convert.cli import main

LEFTOVER_MARKS = ("ia3convert-tmp", "ia3convert-old", ".tmp")


# ------------------------------------------------------------------------------------------- helpers
def digest(paths: list[Path]) -> dict[str, str]:
    """Every file and folder under the given paths (symbolic links not followed) with a hash of its bytes."""
    found = {}
    for path in paths:
        if path.is_symlink() or not path.exists():
            found[str(path)] = "link" if path.is_symlink() else "missing"
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            for folder, dirs, files in os.walk(path):
                for d in dirs:
                    found[os.path.join(folder, d)] = "dir"
                for f in files:
                    p = Path(folder, f)
                    found[str(p)] = "link" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return found


def leftovers(*folders: Path) -> list[str]:
    """Temporary files or folders of ours anywhere under the folders."""
    found = []
    for top in folders:
        for folder, dirs, files in os.walk(top):
            found += [os.path.join(folder, n) for n in dirs + files if any(m in n for m in LEFTOVER_MARKS)]
    return found


def adapter_copy(tmp: Path, arch: str = "llama", name: str = "adapter") -> Path:
    """The root (default) adapter of a fixture, alone in a fresh folder."""
    folder = tmp / name
    folder.mkdir()
    source = ADAPTERS / arch
    for item in source.iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
    return folder


def base_copy(tmp: Path, name: str = "llama-int8", keep: Callable[[str], bool] = lambda n: True) -> Path:
    folder = tmp / name
    folder.mkdir()
    for item in (MODELS / name).iterdir():
        if keep(item.name):
            shutil.copy(item, folder / item.name)
    return folder


def edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def edit_vectors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def set_header_length(file: Path, length: int) -> None:
    data = bytearray(file.read_bytes())
    data[:8] = struct.pack("<Q", length)
    file.write_bytes(bytes(data))


def replace_header(file: Path, header: bytes) -> None:
    data = file.read_bytes()
    (old,) = struct.unpack("<Q", data[:8])
    file.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + old:])


K_PROJ = "base_model.model.model.layers.0.self_attn.k_proj.ia3_l"


def nan_adapter(tmp: Path) -> Path:
    return edit_vectors(adapter_copy(tmp), lambda t: t[K_PROJ].__setitem__((0, 0), float("nan")))


def short_vector_adapter(tmp: Path) -> Path:
    return edit_vectors(adapter_copy(tmp), lambda t: t.__setitem__(K_PROJ, t[K_PROJ][:31].clone()))


def overflowing_adapter(tmp: Path) -> Path:
    return edit_vectors(adapter_copy(tmp), lambda t: t[K_PROJ].__setitem__((0, 0), 1e6))  # fp16 max: 65504


def untargeted_vector_adapter(tmp: Path) -> Path:
    key = "base_model.model.model.layers.0.self_attn.q_proj.ia3_l"
    return edit_vectors(adapter_copy(tmp), lambda t: t.__setitem__(key, torch.ones(64, 1)))


def lora_adapter(tmp: Path) -> Path:
    return edit_config(adapter_copy(tmp), peft_type="LORA")


def bad_json_config(tmp: Path) -> Path:
    folder = adapter_copy(tmp)
    (folder / "adapter_config.json").write_text('{"peft_type": "IA3", "target_modules": [')
    return folder


def corrupt_adapter_header(tmp: Path) -> Path:
    folder = adapter_copy(tmp)
    replace_header(folder / "adapter_model.safetensors", b'{"broken": [')
    return folder


def huge_adapter_header(tmp: Path) -> Path:
    folder = adapter_copy(tmp)
    set_header_length(folder / "adapter_model.safetensors", 2**40)  # claims 1 TiB: must not be allocated
    return folder


class _Payload:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_bin_adapter(tmp: Path) -> Path:
    folder = tmp / "evil"
    folder.mkdir()
    shutil.copy(ADAPTERS / "gpt2-legacy" / "adapter_config.json", folder)
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.transformer.h.0.attn.c_attn.ia3_l": _Payload(tmp / "pwned")}, f)
    return folder


def truncated_base(tmp: Path) -> Path:
    base = base_copy(tmp)
    (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:5])
    return base


def base_header_past_end(tmp: Path) -> Path:
    base = base_copy(tmp)
    set_header_length(base / "model.safetensors", (base / "model.safetensors").stat().st_size)
    return base


def base_huge_header(tmp: Path) -> Path:
    base = base_copy(tmp)
    set_header_length(base / "model.safetensors", 2**40)
    return base


def base_bad_json(tmp: Path) -> Path:
    base = base_copy(tmp)
    file = base / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    data[9:12] = b"\xff\xfe\x00"
    file.write_bytes(bytes(data))
    return base


def base_offsets_past_end(tmp: Path) -> Path:
    base = base_copy(tmp)
    file = base / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    return base


def gptq_base(tmp: Path) -> Path:
    base = base_copy(tmp, "llama-fp16")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (base / "config.json").write_text(json.dumps(config))
    return base


def symlink_loop(tmp: Path) -> Path:
    os.symlink(tmp / "loop-b", tmp / "loop-a")
    os.symlink(tmp / "loop-a", tmp / "loop-b")
    return tmp / "loop-a"


def a_file(tmp: Path) -> Path:
    file = tmp / "notes.txt"
    file.write_text("not a directory\n")
    return file


def empty_dir(tmp: Path) -> Path:
    folder = tmp / "empty"
    folder.mkdir()
    return folder


def existing_out(tmp: Path) -> Path:
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    return out


def out_under_a_file(tmp: Path) -> Path:
    return a_file(tmp) / "out"


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real small or read-only file system at ``path`` (skips where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


# --------------------------------------------------------------------------------------------- cases
LLAMA_A, LLAMA_NF4, LLAMA_INT8 = ADAPTERS / "llama", MODELS / "llama-nf4", MODELS / "llama-int8"
OUT = "{out}"


@dataclass
class Case:
    """``args`` builds the command line in a scratch folder; the error line must hold ``text`` and ``names``."""

    id: str
    args: Callable[[Path], list]
    code: int
    text: str
    names: str = ""  # what the line must name (file, key or module); default: checked through ``text``
    readonly_out: bool = False  # OUT goes on a read-only file system


CASES = [
    # ---- merge
    Case("merge-missing-base", lambda t: ["merge", t / "nope", LLAMA_A, OUT], 4, "does not exist", "nope"),
    Case("merge-missing-adapter", lambda t: ["merge", LLAMA_INT8, t / "nope", OUT], 3, "no such file", "nope"),
    Case("merge-base-is-a-file", lambda t: ["merge", a_file(t), LLAMA_A, OUT], 4, "is a file", "notes.txt"),
    Case("merge-adapter-is-a-file", lambda t: ["merge", LLAMA_INT8, LLAMA_A / "adapter_config.json", OUT], 3,
         "is a file, not an adapter directory", "adapter_config.json"),
    Case("merge-empty-base", lambda t: ["merge", empty_dir(t), LLAMA_A, OUT], 4, "has no config.json", "empty"),
    Case("merge-empty-adapter", lambda t: ["merge", LLAMA_INT8, empty_dir(t), OUT], 3, "no adapter_config.json",
         "empty"),
    Case("merge-truncated-base", lambda t: ["merge", truncated_base(t), LLAMA_A, OUT], 4, "too short",
         "model.safetensors"),
    Case("merge-base-header-length-past-end", lambda t: ["merge", base_header_past_end(t), LLAMA_A, OUT], 4,
         "exceeds the file", "model.safetensors"),
    Case("merge-base-huge-header", lambda t: ["merge", base_huge_header(t), LLAMA_A, OUT], 4, "exceeds the file",
         "model.safetensors"),
    Case("merge-base-bad-json-header", lambda t: ["merge", base_bad_json(t), LLAMA_A, OUT], 4,
         "header is not valid JSON", "model.safetensors"),
    Case("merge-base-offsets-past-end", lambda t: ["merge", base_offsets_past_end(t), LLAMA_A, OUT], 4,
         "offsets outside the file", "model.safetensors"),
    Case("merge-adapter-bad-json-header", lambda t: ["merge", LLAMA_INT8, corrupt_adapter_header(t), OUT], 3,
         "not a readable safetensors file", "adapter_model.safetensors"),
    Case("merge-adapter-huge-header", lambda t: ["merge", LLAMA_INT8, huge_adapter_header(t), OUT], 3,
         "not a readable safetensors file", "adapter_model.safetensors"),
    Case("merge-wrong-peft-type", lambda t: ["merge", LLAMA_INT8, lora_adapter(t), OUT], 3,
         "a LORA adapter, not IA3", "adapter_config.json"),
    Case("merge-malformed-config", lambda t: ["merge", LLAMA_INT8, bad_json_config(t), OUT], 3, "not valid JSON",
         "adapter_config.json"),
    Case("merge-config-tensor-mismatch", lambda t: ["merge", LLAMA_INT8, untargeted_vector_adapter(t), OUT], 3,
         "which target_modules does not select", "q_proj"),
    Case("merge-wrong-shape-for-base", lambda t: ["merge", LLAMA_INT8, short_vector_adapter(t), OUT], 5,
         "31 scales for the output side", "layers.0.self_attn.k_proj"),
    Case("merge-other-architecture", lambda t: ["merge", MODELS / "opt-int8", LLAMA_A, OUT], 5,
         "is not a Linear layer of the base", "model.layers.0"),
    Case("merge-nan", lambda t: ["merge", LLAMA_NF4, nan_adapter(t), OUT], 3, "NaN or infinite", "k_proj"),
    Case("merge-malicious-bin", lambda t: ["merge", MODELS / "gpt2-int8", evil_bin_adapter(t), OUT], 3,
         "refused", "adapter_model.bin"),
    Case("merge-adapter-name-with-separator", lambda t: ["merge", LLAMA_INT8, LLAMA_A, OUT, "--adapter-name",
                                                         "../second"], 3, "is not usable", "../second"),
    Case("merge-out-is-the-base", lambda t: ["merge", LLAMA_INT8, LLAMA_A, LLAMA_INT8, "--force"], 6,
         "is the input", "llama-int8"),
    Case("merge-out-inside-adapter", lambda t: ["merge", LLAMA_INT8, LLAMA_A, LLAMA_A / "merged"], 6,
         "is inside the input", "merged"),
    Case("merge-out-exists", lambda t: ["merge", LLAMA_INT8, LLAMA_A, existing_out(t)], 6, "already exists",
         "out"),
    Case("merge-out-parent-is-a-file", lambda t: ["merge", LLAMA_INT8, LLAMA_A, out_under_a_file(t)], 6,
         "is a file, not a directory", "notes.txt"),
    Case("merge-out-read-only-parent", lambda t: ["merge", LLAMA_INT8, LLAMA_A, OUT], 6, "Read-only file system",
         "out", readonly_out=True),
    Case("merge-gptq-base", lambda t: ["merge", gptq_base(t), LLAMA_A, OUT], 4, "quantized with gptq",
         "llama-fp16"),
    Case("merge-base-symlink-loop", lambda t: ["merge", symlink_loop(t), LLAMA_A, OUT], 4, "does not exist",
         "loop-a"),
    Case("merge-out-symlink-loop", lambda t: ["merge", LLAMA_INT8, LLAMA_A, symlink_loop(t)], 6,
         "symbolic link loop", "loop-a"),
    # ---- validate (2: could not read; 1: errors found)
    Case("validate-missing", lambda t: ["validate", t / "nope"], 2, "no such file", "nope"),
    Case("validate-empty-dir", lambda t: ["validate", empty_dir(t)], 2, "no adapter_config.json", "empty"),
    Case("validate-corrupt-safetensors", lambda t: ["validate", corrupt_adapter_header(t)], 2,
         "not a readable safetensors file", "adapter_model.safetensors"),
    Case("validate-malformed-config", lambda t: ["validate", bad_json_config(t)], 2, "not valid JSON",
         "adapter_config.json"),
    Case("validate-malicious-bin", lambda t: ["validate", evil_bin_adapter(t)], 2, "refused", "adapter_model.bin"),
    Case("validate-symlink-loop", lambda t: ["validate", symlink_loop(t)], 2, "no such file", "loop-a"),
    Case("validate-base-offsets-past-end", lambda t: ["validate", LLAMA_A, "--base", base_offsets_past_end(t)], 2,
         "offsets outside the file", "model.safetensors"),
    Case("validate-wrong-peft-type", lambda t: ["validate", lora_adapter(t)], 1, "a LORA adapter, not IA3",
         "adapter_config.json"),
    Case("validate-nan", lambda t: ["validate", nan_adapter(t)], 1, "NaN or infinite", "k_proj"),
    Case("validate-config-tensor-mismatch", lambda t: ["validate", untargeted_vector_adapter(t)], 1,
         "which target_modules does not select", "q_proj"),
    Case("validate-wrong-shape-for-base", lambda t: ["validate", short_vector_adapter(t), "--base", LLAMA_NF4], 1,
         "31 scales for the output side", "layers.0.self_attn.k_proj"),
    Case("validate-gptq-base", lambda t: ["validate", LLAMA_A, "--base", gptq_base(t)], 1, "quantized with gptq",
         "llama-fp16"),
    # ---- resave
    Case("resave-missing", lambda t: ["resave", t / "nope", OUT], 3, "no such file", "nope"),
    Case("resave-adapter-is-a-file", lambda t: ["resave", a_file(t), OUT], 3, "is a file", "notes.txt"),
    Case("resave-wrong-peft-type", lambda t: ["resave", lora_adapter(t), OUT], 3, "a LORA adapter, not IA3",
         "adapter_config.json"),
    Case("resave-truncated-safetensors", lambda t: ["resave", huge_adapter_header(t), OUT], 3,
         "not a readable safetensors file", "adapter_model.safetensors"),
    Case("resave-nan", lambda t: ["resave", nan_adapter(t), OUT], 3, "NaN or infinite", "k_proj"),
    Case("resave-malicious-bin", lambda t: ["resave", evil_bin_adapter(t), OUT], 3, "refused", "adapter_model.bin"),
    Case("resave-select-with-separator", lambda t: ["resave", LLAMA_A, OUT, "--select", "a/b"], 3, "is not usable",
         "a/b"),
    Case("resave-name-with-separator", lambda t: ["resave", LLAMA_A, OUT, "--adapter-name", "../x"], 3,
         "is not usable", "../x"),
    Case("resave-out-is-the-input", lambda t: ["resave", LLAMA_A, LLAMA_A, "--force"], 6, "is the input",
         "llama"),
    Case("resave-out-inside-input", lambda t: ["resave", LLAMA_A, LLAMA_A / "second" / "copy"], 6,
         "is inside the input", "copy"),
    Case("resave-out-exists", lambda t: ["resave", LLAMA_A, existing_out(t)], 6, "already exists", "out"),
    Case("resave-out-parent-is-a-file", lambda t: ["resave", LLAMA_A, out_under_a_file(t)], 6,
         "is a file, not a directory", "notes.txt"),
    Case("resave-out-read-only-parent", lambda t: ["resave", LLAMA_A, OUT], 6, "Read-only file system", "out",
         readonly_out=True),
    Case("resave-overflowing-cast", lambda t: ["resave", overflowing_adapter(t), OUT, "--dtype", "float16"], 6,
         "overflow float16", K_PROJ),
    # ---- wrap
    Case("wrap-missing-base", lambda t: ["wrap", t / "nope", LLAMA_A], 4, "does not exist", "nope"),
    Case("wrap-gptq-base", lambda t: ["wrap", gptq_base(t), LLAMA_A], 4, "quantized with gptq", "llama-fp16"),
    Case("wrap-corrupt-adapter", lambda t: ["wrap", LLAMA_NF4, corrupt_adapter_header(t)], 3,
         "not a readable safetensors file", "adapter_model.safetensors"),
    Case("wrap-wrong-shape-for-base", lambda t: ["wrap", LLAMA_NF4, short_vector_adapter(t)], 5,
         "does not fit the layer", "layers.0.self_attn.k_proj"),
    Case("wrap-adapter-symlink-loop", lambda t: ["wrap", LLAMA_NF4, symlink_loop(t)], 3, "no such file",
         "loop-a"),
    Case("wrap-adapter-name-with-separator", lambda t: ["wrap", LLAMA_NF4, LLAMA_A, "--adapter-name", "x/../y"], 3,
         "is not usable", "x/../y"),
]


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} == {"merge", "validate", "resave", "wrap"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path):
    scratch = tmp_path / "in"
    scratch.mkdir()
    with (tmpfs(tmp_path / "ro", "ro,size=64k") if case.readonly_out else _nothing()) as ro:
        out = (ro if ro is not None else tmp_path) / "out"
        args = [out if a == OUT else a for a in case.args(scratch)]
        command = args[0]
        inputs = [Path(a) for a in args[1:] if isinstance(a, Path) and a != out]
        inputs += [p for p in (FIXTURES / "models", FIXTURES / "adapters") if any(p in Path(a).parents
                                                                                for a in inputs)]
        before = digest(inputs)
        result = CliRunner().invoke(main, [str(a) for a in args])

        assert result.exit_code == case.code, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, result.output
        line = errors[0]
        assert case.text in line and case.names in line, line
        assert line.endswith(")") and " (" in line, f"no fix offered: {line}"
        if command != "validate" or case.code == 2:
            assert result.stderr.strip() == line  # the whole story in one line
        assert digest(inputs) == before, "an input was modified"
        assert not out.exists()
        assert leftovers(tmp_path, FIXTURES) == []
        assert not (scratch / "pwned").exists(), "the pickle ran code"


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


# --------------------------------------------------------------------------- not broken, but unusual
def test_tokenizer_less_base_merges_and_wraps(tmp_path):
    base = base_copy(tmp_path, "llama-int8", keep=lambda n: not n.startswith("tokenizer"))
    runner = CliRunner()
    merged = runner.invoke(main, ["merge", str(base), str(LLAMA_A), str(tmp_path / "out"), "--quiet"])
    assert merged.exit_code == 0, merged.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "generation_config.json", "merge_report.json", "model.safetensors"]
    wrapped = runner.invoke(main, ["wrap", str(base), str(LLAMA_A), "--json"])
    assert wrapped.exit_code == 0, wrapped.output
    assert json.loads(wrapped.stdout)["relative_change"] > 0


# ------------------------------------------------------------------------- failures in the middle of writing
def test_disk_full_during_merge_leaves_nothing(tmp_path):
    """A real full disk (a 64 KiB tmpfs; the merged model needs 117 KB): one line, no OUT, no temp dir."""
    before = digest([LLAMA_INT8, LLAMA_A])
    with tmpfs(tmp_path / "small", "size=64k") as small:
        result = CliRunner().invoke(main, ["merge", str(LLAMA_INT8), str(LLAMA_A), str(small / "out"), "--quiet"])
        assert result.exit_code == 6, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "No space left on device" in result.stderr and "model.safetensors" in result.stderr
        assert list(small.iterdir()) == []
    assert digest([LLAMA_INT8, LLAMA_A]) == before


@pytest.mark.skipif(sys.platform == "win32", reason="file size limits are a POSIX feature")
@pytest.mark.parametrize("command", [
    ["merge", str(LLAMA_INT8), str(LLAMA_A)],
    ["resave", str(LLAMA_A)],
])
def test_file_size_limit_mid_write_leaves_nothing(command, tmp_path):
    """The kernel refuses writes past RLIMIT_FSIZE (here below each output file's size), as a full disk would."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    before = digest([LLAMA_INT8, LLAMA_A])
    done = subprocess.run([sys.executable, "-m", "ia3convert.cli", *command, str(tmp_path / "out")],
                          cwd=ROOT, preexec_fn=limit, capture_output=True, text=True, timeout=300)
    assert done.returncode == 6, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "File too large" in done.stderr
    assert list(tmp_path.iterdir()) == []
    assert digest([LLAMA_INT8, LLAMA_A]) == before
