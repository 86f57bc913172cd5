"""The committed fixtures are what fixtures/make_fixtures.py makes, byte for byte."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import FIXTURES


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.slow
def test_script_reproduces_committed_fixtures(tmp_path):
    subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for part in ("models", "adapters"):
        committed, fresh = FIXTURES / part, tmp_path / part
        assert _files(committed) == _files(fresh)
        differing = [str(f) for f in _files(committed) if (committed / f).read_bytes() != (fresh / f).read_bytes()]
        assert not differing, f"regenerated fixtures differ: {differing}"
