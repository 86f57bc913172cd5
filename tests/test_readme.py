"""The README's promise: its test command is what CI runs, and its commands name things that exist."""

from __future__ import annotations

import re

from conftest import ROOT


def _commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    setup, test = _commands()[:2]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
    assert "pytest" in test and "ia3convert" in setup


def test_readme_paths_exist():
    text = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"fixtures/[\w./-]+", text)):
        base = path.split("{")[0].rstrip(".,)")
        assert (ROOT / base).exists(), path
