"""The benchmark script still runs end to end (at a toy size; the real run is bench/bench_merge.py alone)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_merge_runs_at_toy_size(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_merge.py"), "--hidden", "128", "--intermediate", "256",
         "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--storage", "int8",
         "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=True,
    )
    rows = [line for line in done.stdout.splitlines() if line.startswith(("ia3convert", "route"))]
    assert len(rows) == 3, done.stdout
    assert (tmp_path / "r.json").is_file()
