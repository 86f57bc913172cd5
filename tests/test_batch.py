"""Batch conversion: one pass per base, byte-identical to separate merges, failures isolated, resume, and the
same bytes through a ProcessPoolExecutor and a Dask cluster."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ADAPTERS, MODELS

import ia3convert as ia
import ia3convert.merging
from ia3convert.batch import Job, load_manifest, run_batch
from ia3convert.cli import main

BASES = ("llama-int8", "llama-nf4")


def variants(folder: Path) -> list[Path]:
    """Four llama adapters (the two fixture ones and two rescaled copies) and one broken adapter."""
    made = []
    for number, (name, factor) in enumerate([("default", 1.0), ("second", 1.0), ("default", 0.9), ("second", 1.1)]):
        adapter = ia.read_adapter(ADAPTERS / "llama", name)
        adapter.vectors = {p: v * factor for p, v in adapter.vectors.items()}
        made.append(adapter.save(folder / f"adapter-{number}"))
    broken = ia.read_adapter(ADAPTERS / "llama")
    first = sorted(broken.vectors)[0]
    broken.vectors[first] = broken.vectors[first].clone()
    broken.vectors[first][0, 0] = float("inf")
    made.append(broken.save(folder / "broken"))
    return made


def batch_jobs(tmp_path: Path, out: str) -> list[Job]:
    adapters = variants(tmp_path / "adapters")
    jobs = []
    for base in BASES:
        chosen = adapters[:4] if base == "llama-int8" else [*adapters[:3], adapters[4]]  # the broken one: nf4
        for adapter in chosen:
            jobs.append(Job(adapter=str(adapter), base=str(MODELS / base), out=str(tmp_path / out / f"{base}-"
                                                                                      f"{adapter.name}")))
    return jobs


def model_files(folder: Path) -> dict[str, bytes]:
    """Every output file but the report (which records times and labels), as bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "merge_report.json"}


def outputs(folder: Path) -> dict[str, dict[str, bytes]]:
    return {p.name: model_files(p) for p in sorted(folder.iterdir()) if p.is_dir()}


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("batch")
    jobs = batch_jobs(tmp_path, "batch")
    report = run_batch(jobs, progress=False)
    return tmp_path, jobs, report


def test_batch_equals_separate_merges(batch_run):
    tmp_path, jobs, report = batch_run
    statuses = [r.status for r in report.results]
    assert statuses.count("done") == 7 and statuses.count("failed") == 1
    failed = next(r for r in report.results if r.status == "failed")
    assert failed.job.adapter.endswith("broken") and "NaN or infinite scales" in failed.message
    assert failed.exit_code == 3 and "\n" not in failed.message
    assert not Path(failed.job.out).exists()
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == sorted(
        Path(j.out).name for j in jobs if not j.adapter.endswith("broken"))  # nothing partial, no temp dirs

    runner = CliRunner()
    for job in jobs:
        if job.adapter.endswith("broken"):
            continue
        separate = tmp_path / "separate" / Path(job.out).name
        result = runner.invoke(main, ["merge", job.base, job.adapter, str(separate), "--quiet"])
        assert result.exit_code == 0, result.output
        assert model_files(separate) == model_files(Path(job.out)), job.out
        ours = json.loads((Path(job.out) / "merge_report.json").read_text())
        theirs = json.loads((separate / "merge_report.json").read_text())
        assert ours["modules"] == theirs["modules"]


def test_rerun_skips_and_touching_redoes_exactly_that_job(batch_run):
    _, jobs, _ = batch_run
    again = run_batch(jobs, progress=False)
    assert [r.status for r in again.results].count("skipped") == 7

    touched = jobs[3]  # adapter-3 serves only the int8 base: exactly one job uses it
    weights = Path(touched.adapter) / "adapter_model.safetensors"
    later = time.time() + 5
    os.utime(weights, (later, later))
    third = run_batch(jobs, progress=False)
    redone = [r.job for r in third.results if r.status == "done"]
    assert redone == [touched]
    assert [r.status for r in third.results].count("skipped") == 6

    changed_options = [Job(**{**vars(j), "probe_tokens": 8}) if j is jobs[0] else j for j in jobs]
    fourth = run_batch(changed_options, progress=False)
    assert [r.job.out for r in fourth.results if r.status == "done"] == [jobs[0].out]


def test_one_pass_reads_the_base_once_and_decodes_each_module_once(tmp_path, monkeypatch):
    """Three adapters requantizing the same modules: the base is read as much as for one merge, and each
    module's weight is decoded once for all three."""
    adapters = variants(tmp_path / "adapters")[:3]
    decodes: dict[str, int] = {}
    original = ia3convert.merging._decode

    def counting(module, tensors):
        decodes[module.path] = decodes.get(module.path, 0) + 1
        return original(module, tensors)

    monkeypatch.setattr(ia3convert.merging, "_decode", counting)
    base = ia3convert.merging.Base.open(MODELS / "llama-nf4")
    jobs = [ia3convert.merging.MergeJob(ia.read_adapter(a), tmp_path / f"out-{i}",
                                        ia3convert.merging.MergeOptions(requantize=True), "base", a.name)
            for i, a in enumerate(adapters)]
    results = ia3convert.merging.run_pass(base, jobs)
    assert all(isinstance(r, ia.MergeReport) and r.passed for r in results)
    assert decodes and set(decodes.values()) == {1}

    single = ia3convert.merging.Base.open(MODELS / "llama-nf4")
    alone = ia3convert.merging.MergeJob(ia.read_adapter(adapters[0]), tmp_path / "single",
                                        ia3convert.merging.MergeOptions(requantize=True), "base", "a")
    ia3convert.merging.run_pass(single, [alone])
    assert base.reader.bytes_read == single.reader.bytes_read > 0


@pytest.mark.slow
def test_process_pool_and_dask_give_the_same_bytes(batch_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    _, jobs, _ = batch_run
    reference = outputs(Path(jobs[0].out).parent)

    def rerouted(name):
        return [Job(**{**vars(j), "out": str(tmp_path / name / Path(j.out).name)}) for j in jobs]

    # "spawn": a forked child of a process that has run torch's thread pools can deadlock.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pooled = run_batch(rerouted("pool"), executor=pool, progress=False)
    assert [r.status for r in pooled.results].count("done") == 7
    assert outputs(tmp_path / "pool") == reference

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dasked = run_batch(rerouted("dask"), executor=client.get_executor(), progress=False)
    assert [r.status for r in dasked.results].count("done") == 7
    assert outputs(tmp_path / "dask") == reference


def test_manifest_cli_and_stop_on_error(tmp_path):
    adapters = variants(tmp_path / "adapters")
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(
        "defaults:\n  base: " + os.path.relpath(MODELS / "llama-int8", tmp_path) + "\n"
        "jobs:\n"
        f"  - {{adapter: adapters/broken, out: out/broken}}\n"
        f"  - {{adapter: adapters/{adapters[0].name}, out: out/first}}\n"
        f"  - {{adapter: adapters/{adapters[1].name}, action: validate}}\n"
        f"  - {{adapter: adapters/{adapters[1].name}, action: resave, out: out/resaved, dtype: bfloat16}}\n")
    jobs = load_manifest(manifest)
    assert Path(jobs[1].adapter) == (tmp_path / "adapters" / adapters[0].name).resolve()
    result = CliRunner().invoke(main, ["batch", str(manifest), "--json"])
    assert result.exit_code == 9
    report = json.loads(result.output)
    assert [r["status"] for r in report["results"]] == ["failed", "done", "done", "done"]
    resaved = ia.read_adapter(tmp_path / "out" / "resaved")
    assert {v.dtype for v in resaved.vectors.values()} == {torch.bfloat16}

    stopped = run_batch(load_manifest(manifest), on_error="stop", resume=False, progress=False)
    assert stopped.results[0].status == "failed"
    assert "cancelled" in [r.status for r in stopped.results]

    bad = tmp_path / "bad.json"
    bad.write_text('[{"adapter": "x", "colour": "red"}]')
    broken = CliRunner().invoke(main, ["batch", str(bad)])
    assert broken.exit_code == 3 and "unknown field(s) ['colour']" in broken.output


def test_job_merge_options_are_mergeoptions_fields_with_the_same_defaults():
    """Job (light, picklable, no torch) repeats MergeOptions' fields: a new option must keep both in step."""
    from dataclasses import fields

    from ia3convert.batch import MERGE_OPTIONS
    from ia3convert.merging import MergeOptions

    job_defaults = {f.name: f.default for f in fields(Job)}
    option_defaults = {f.name: f.default for f in fields(MergeOptions)}
    assert set(MERGE_OPTIONS) <= set(option_defaults) & set(job_defaults)
    assert {n: job_defaults[n] for n in MERGE_OPTIONS} == {n: option_defaults[n] for n in MERGE_OPTIONS}
