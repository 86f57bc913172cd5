"""The command line: version, help, the wrap report, and one-line errors with distinct exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner
from conftest import ADAPTERS, MODELS

import ia3convert
from ia3convert.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version_and_help():
    assert run("--version").output.strip() == f"ia3convert, version {ia3convert.__version__}"
    result = run("--help")
    assert result.exit_code == 0 and "wrap" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from ia3convert.cli import main; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_wrap_reports_every_module():
    result = run("wrap", MODELS / "llama-nf4", ADAPTERS / "llama", "--adapter-name", "second")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    rows = [line for line in lines if line.startswith("model.layers.")]
    assert len(rows) == 8  # q, v, up, down in two layers
    assert all("Linear4bit" in r and "nf4" in r for r in rows)
    assert any("up_proj" in r and " input " in r for r in rows)
    assert lines[-1].startswith("wrapped 8 modules of LlamaForCausalLM with adapter 'second'")


def test_wrap_json_on_int8_gpt2():
    result = run("wrap", MODELS / "gpt2-int8", ADAPTERS / "gpt2-legacy", "--json")
    summary = json.loads(result.output)
    assert {m["wrapper"] for m in summary["modules"]} == {"Linear8bitLt"}
    assert summary["relative_change"] > 0.01


def test_errors_are_one_line_with_an_exit_code(tmp_path):
    cases = [
        (("wrap", MODELS / "llama-nf4", tmp_path / "missing"), 3, "no such file or directory"),
        (("wrap", MODELS / "llama-nf4", ADAPTERS / "llama", "--adapter-name", "../x"), 3, "not usable"),
        (("wrap", tmp_path, ADAPTERS / "llama"), 4, "has no config.json"),
        (("wrap", MODELS / "opt-int8", ADAPTERS / "llama"), 5, "does not exist in this OPTForCausalLM"),
    ]
    for args, code, text in cases:
        result = run(*args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.output
        assert result.output.startswith("error: ") and result.output.count("\n") == 1
        assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "wrap", MODELS / "llama-nf4", tmp_path / "missing")
    assert result.exit_code != 0
    assert isinstance(result.exception, ia3convert.AdapterError)


def test_large_blocks_go_back_to_the_system_on_glibc():
    import platform

    from ia3convert.memory import return_large_blocks

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("mallopt is glibc's")
    assert return_large_blocks() is True
