"""The benchmark script still runs end to end (at a toy size; the real run is bench/bench_merge.py alone)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_merge_runs_at_toy_size(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_merge.py"), "--sizes", "toy", "--storages", "int8", "nf4-dq",
         "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, check=True,
    )
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith("toy")]
    assert [row[3] for row in rows] == ["int8"] * 4 + ["nf4-dq"] * 4, done.stdout
    assert any("--check-sample" in line for line in done.stdout.splitlines())
    results = json.loads((tmp_path / "r.json").read_text())
    assert [r["storage"] for r in results] == ["int8", "nf4-dq"]
    assert all(len(r["results"]) == 4 for r in results)


@pytest.mark.slow
def test_bench_batch_runs_at_toy_size(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_batch.py"), "--hidden", "128", "--intermediate", "256",
         "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab", "300", "--counts", "1", "2",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, check=True,
    )
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"], done.stdout
