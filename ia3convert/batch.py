"""Batch conversion: many adapters, many bases, one pass per base, on any ``concurrent.futures`` executor.

``run_batch(jobs)`` groups the merge jobs by base: each group reads its base once and writes every adapter's
output from that pass (``merging.run_pass``). Groups run one after the other in this process, or on any
``Executor`` passed in (``ProcessPoolExecutor``, or Dask's ``Client.get_executor()`` to go beyond one machine):
jobs and results are plain picklable dataclasses, and a group needs nothing from the submitting process.

A bad job fails alone with its one-line error and leaves no output. A finished merge records a fingerprint of
its inputs (every file's size and modification time) and options in its merge_report.json; with ``resume``, a
job whose record matches is skipped and one whose inputs or options changed is redone.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AdapterError, IA3ConvertError

ACTIONS = ("merge", "validate", "resave")
# Job fields that are merge options (passed to MergeOptions under the same names).
MERGE_OPTIONS = ("quantize", "double_quant", "dtype", "renest", "requantize", "fold", "check", "max_error",
                 "probe_tokens", "check_sample", "device", "max_shard_size", "force")


@dataclass(frozen=True)
class Job:
    """One unit of work. ``merge``: ``adapter`` into ``base``, written to ``out``; ``validate``: ``adapter``
    alone or against ``base``; ``resave``: ``adapter`` rewritten to ``out``. ``adapter_name`` picks one adapter
    of a multi-adapter directory. The other fields are ``merge``'s options (``dtype`` is also resave's)."""

    adapter: str
    base: str | None = None
    out: str | None = None
    action: str = "merge"
    adapter_name: str | None = None
    quantize: str | None = None
    double_quant: bool = False
    dtype: str | None = None
    renest: bool = False
    requantize: bool = False
    fold: bool = True
    check: bool = True
    max_error: float | None = None
    probe_tokens: int = 32
    check_sample: int = 512
    device: str = "cpu"
    max_shard_size: str = "5GB"
    force: bool = False

    def problem(self) -> str | None:
        """What makes this job impossible to run as written, or None."""
        if self.action not in ACTIONS:
            return f"action {self.action!r} is not one of {', '.join(ACTIONS)}"
        if self.action == "merge" and (not self.base or not self.out):
            return "a merge job needs base and out"
        if self.action == "resave" and not self.out:
            return "a resave job needs out"
        return None

    @property
    def label(self) -> str:
        target = self.out or self.base or ""
        return f"{self.action} {self.adapter}" + (f" -> {target}" if target else "")


@dataclass
class JobResult:
    """How one job ended: ``done``, ``skipped`` (resume found its record), ``failed`` or ``cancelled``."""

    job: Job
    status: str
    message: str = ""
    exit_code: int = 0
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchReport:
    """Every job's result, in the order the jobs were given."""

    results: list[JobResult]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status in ("done", "skipped") for r in self.results)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": self.seconds, "counts": self.counts(),
                "results": [asdict(r) for r in self.results]}

    def table(self) -> str:
        """One line per job: status, what, how long, and the message of a failure."""
        width = max((len(r.job.label) for r in self.results), default=3)
        lines = [f"{'status':<9} {'job':<{width}} {'seconds':>8}  message"]
        for r in self.results:
            lines.append(f"{r.status:<9} {r.job.label:<{width}} {r.seconds:>8.1f}  {r.message}")
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts().items()))
        lines.append(f"{len(self.results)} jobs in {self.seconds:.1f}s: {counts}")
        return "\n".join(lines)


# -- manifests ---------------------------------------------------------------------------------------------
def load_manifest(path: str | Path) -> list[Job]:
    """Jobs from a YAML or JSON manifest: a list of job mappings, or ``{"defaults": {...}, "jobs": [...]}``.
    Relative paths (base, adapter, out) are resolved against the manifest's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdapterError(f"{path}: cannot be read ({exc.strerror or exc})", hint="give the manifest's path") from None
    import yaml

    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise AdapterError(f"{path}: not valid {kind} ({str(exc).splitlines()[0]})", hint="fix the manifest") from None
    defaults: dict[str, Any] = {}
    if isinstance(data, dict):
        defaults = data.get("defaults") or {}
        data = data.get("jobs")
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data) or not isinstance(defaults, dict):
        raise AdapterError(f"{path}: expected a list of jobs (or a mapping with 'jobs' and 'defaults')",
                           hint="see the README's batch section for the format")
    known = {f.name for f in fields(Job)}
    jobs = []
    for number, entry in enumerate(data, start=1):
        merged = {**defaults, **entry}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise AdapterError(f"{path}: job {number} has unknown field(s) {unknown}",
                               hint=f"known fields: {', '.join(sorted(known))}")
        if "adapter" not in merged:
            raise AdapterError(f"{path}: job {number} has no adapter", hint="every job names an adapter")
        for key in ("base", "adapter", "out"):
            value = merged.get(key)
            # base and adapter may be Hub repo ids (when no such local path exists); out is always a path
            if isinstance(value, str) and not Path(value).is_absolute() and (
                    key == "out" or not _looks_like_repo_id(value, path.parent)):
                merged[key] = str((path.parent / value).resolve())
        jobs.append(Job(**merged))
    return jobs


def _looks_like_repo_id(value: str, folder: Path) -> bool:
    from .sources import _REPO_ID

    return bool(_REPO_ID.match(value)) and not (folder / value).exists()


# -- fingerprints and records --------------------------------------------------------------------------------
def _files_of(folder: Path, recursive: bool = True) -> list[tuple[str, int, int]]:
    items = []
    for item in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        rel = item.relative_to(folder)
        if item.is_file() and not any(part.startswith(".") for part in rel.parts):
            stat = item.stat()
            items.append((rel.as_posix(), stat.st_size, stat.st_mtime_ns))
    return items


def fingerprint(job: Job, base_dir: Path, adapter_dir: Path) -> str:
    """A digest of the job's options and of every input file's name, size and modification time: touching an
    input or changing an option changes it."""
    options = {f.name: getattr(job, f.name) for f in fields(Job) if f.name not in ("base", "adapter", "out", "force")}
    # Only the chosen adapter's own files: a named adapter is its sub-folder; the root one excludes sub-folders.
    named = job.adapter_name not in (None, "default") and (adapter_dir / job.adapter_name).is_dir()
    adapter_files = _files_of(adapter_dir / job.adapter_name, recursive=False) if named else \
        _files_of(adapter_dir, recursive=False)
    data = {"version": __version__, "options": options, "base": _files_of(base_dir), "adapter": adapter_files}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _record(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- running -------------------------------------------------------------------------------------------------
def _fail(job: Job, exc: IA3ConvertError, seconds: float = 0.0) -> JobResult:
    return JobResult(job, "failed", str(exc), exc.exit_code, round(seconds, 3))


def run_group(items: Sequence[tuple[int, Job]], resume: bool = True,
              progress: Callable[[int, int], None] | None = None) -> list[tuple[int, JobResult]]:
    """Run one group (merge jobs sharing a base: one pass; or a single validate/resave job) and return each
    job's result with its index. Module-level and self-contained, so executors can pickle it."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:  # an executor's worker: its memory settings are ours
        from .memory import return_large_blocks

        return_large_blocks()
    started = time.perf_counter()
    results: dict[int, JobResult] = {}
    merges: list[tuple[int, Job, Any, str]] = []
    base_dir = None
    for index, job in items:
        try:
            if job.action == "merge":
                prepared = _prepare_merge(job, resume)
                if isinstance(prepared, JobResult):
                    results[index] = prepared
                else:
                    base_dir = prepared[0]
                    merges.append((index, job, prepared[1], prepared[2]))
            else:
                results[index] = _run_single(job)
        except IA3ConvertError as exc:
            results[index] = _fail(job, exc, time.perf_counter() - started)
    if merges:
        try:
            _run_merges(base_dir, merges, results, started, progress)
        except Exception as exc:  # a bug must not take the other groups down; the outputs were cleaned up
            for index, job, _, _ in merges:
                results.setdefault(index, JobResult(job, "failed", f"internal error: {type(exc).__name__}: {exc}", 1))
    return sorted(results.items())


def _prepare_merge(job: Job, resume: bool):
    """(base dir, merge job, fingerprint) for a merge to run, or the JobResult of one skipped by resume."""
    from .adapter import read_adapter
    from .merging import MergeJob, MergeOptions, _label
    from .sources import resolve_adapter, resolve_base

    base_dir = resolve_base(job.base)
    adapter_dir = resolve_adapter(job.adapter)
    digest = fingerprint(job, base_dir, adapter_dir)
    out = Path(job.out)
    record = _record(out) if out.is_dir() else None
    if resume and record is not None and record.get("fingerprint") == digest and record.get("passed"):
        return JobResult(job, "skipped", "inputs and options unchanged since the recorded merge",
                         summary=record.get("summary", {}))
    opts = MergeOptions(adapter_name=job.adapter_name,
                        **{name: getattr(job, name) for name in MERGE_OPTIONS})
    # An output this batch made before (it carries a merge record) is ours to replace when its inputs changed.
    opts.force = job.force or (resume and record is not None)
    opts.validate()
    adapter = read_adapter(adapter_dir, job.adapter_name)
    return base_dir, MergeJob(adapter, out, opts, _label(job.base), _label(job.adapter), digest), digest


def _run_merges(base_dir: Path, merges: list, results: dict[int, JobResult], started: float,
                progress: Callable[[int, int], None] | None) -> None:
    from .merging import Base, run_pass

    try:
        base = Base.open(base_dir)
    except IA3ConvertError as exc:
        for index, job, _, _ in merges:
            results[index] = _fail(job, exc, time.perf_counter() - started)
        return
    outcomes = run_pass(base, [m[2] for m in merges], progress)
    for (index, job, _, _), outcome in zip(merges, outcomes, strict=True):
        seconds = time.perf_counter() - started
        if isinstance(outcome, IA3ConvertError):
            results[index] = _fail(job, outcome, seconds)
        else:
            results[index] = JobResult(job, "done", f"{len(outcome.modules)} modules merged", 0, round(seconds, 3),
                                       outcome.summary())


def _run_single(job: Job) -> JobResult:
    started = time.perf_counter()
    if job.action == "validate":
        from .validation import validate

        report = validate(job.adapter, base=job.base, adapter_name=job.adapter_name)
        seconds = round(time.perf_counter() - started, 3)
        if report.ok:
            return JobResult(job, "done", f"{len(report.warnings)} warning(s)", 0, seconds)
        first = report.errors[0]
        return JobResult(job, "failed", f"{len(report.errors)} error(s), first: {first.where}: {first.message}", 1,
                         seconds)
    from .resaving import resave

    result = resave(job.adapter, job.out, dtype=job.dtype, select=job.adapter_name, force=job.force)
    dropped = f", dropped {len(result.dropped)} non-IA3 tensor(s)" if result.dropped else ""
    return JobResult(job, "done", f"written{dropped}", 0, round(time.perf_counter() - started, 3))


def group_jobs(jobs: Sequence[Job]) -> list[list[tuple[int, Job]]]:
    """Merge jobs grouped by base (one pass each, in order of first appearance); other jobs alone."""
    groups: dict[str, list[tuple[int, Job]]] = {}
    singles: list[list[tuple[int, Job]]] = []
    for index, job in enumerate(jobs):
        if job.action == "merge" and job.base:
            key = str(Path(job.base).resolve()) if Path(job.base).exists() else job.base
            groups.setdefault(key, []).append((index, job))
        else:
            singles.append([(index, job)])
    return list(groups.values()) + singles


def run_batch(jobs: Iterable[Job], *, executor: Executor | None = None, on_error: str = "continue",
              resume: bool = True, progress: bool | Callable[[str, JobResult], None] = True) -> BatchReport:
    """Run every job; merges into the same base share one pass over it.

    ``executor``: None runs the groups here one after the other (with per-group tensor progress); any
    ``concurrent.futures.Executor`` runs one group per task. ``on_error="stop"`` cancels what has not started
    after the first failure (those jobs end ``cancelled``); ``"continue"`` runs everything. ``resume`` skips
    merges whose recorded fingerprint matches. ``progress``: True prints a line per finished job on stderr
    (False: silent; a callable gets ``(label, result)`` instead).
    """
    if on_error not in ("continue", "stop"):
        raise ValueError("on_error is 'continue' or 'stop'")
    jobs = list(jobs)
    started = time.perf_counter()
    results: dict[int, JobResult] = {}
    report_progress = _progress_printer(progress, len(jobs))
    todo = []
    for group in group_jobs(jobs):
        runnable = []
        for index, job in group:
            problem = job.problem()
            if problem:
                results[index] = _fail(job, AdapterError(f"job {index + 1} ({job.label}): {problem}",
                                                         hint="fix the job description"))
                report_progress(results[index])
            else:
                runnable.append((index, job))
        if runnable:
            todo.append(runnable)

    def collect(items: list[tuple[int, JobResult]]) -> bool:
        failed = False
        for index, result in items:
            results[index] = result
            report_progress(result)
            failed |= result.status == "failed"
        return failed

    stop = on_error == "stop" and any(r.status == "failed" for r in results.values())
    if executor is None:
        for number, group in enumerate(todo, start=1):
            if stop:
                break
            tensors = _tensor_progress(f"group {number}/{len(todo)}") if progress is True else None
            stop = collect(run_group(group, resume, tensors)) and on_error == "stop"
    else:
        futures: list[Future] = [executor.submit(run_group, group, resume) for group in todo]
        for future in futures:
            if stop:
                future.cancel()
                continue
            try:
                stop = collect(future.result()) and on_error == "stop"
            except Exception as exc:  # a worker that died: its group fails, the others go on
                group = todo[futures.index(future)]
                collect([(i, JobResult(j, "failed", f"worker failed: {type(exc).__name__}: {exc}", 1))
                         for i, j in group])
    for group in todo:
        for index, job in group:
            results.setdefault(index, JobResult(job, "cancelled", "not run: an earlier job failed (on_error=stop)"))
    return BatchReport([results[i] for i in range(len(jobs))], round(time.perf_counter() - started, 3))


def _tensor_progress(label: str) -> Callable[[int, int], None] | None:
    """A one-line tensor counter on an interactive stderr (nothing when stderr is a file or a pipe)."""
    import sys

    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        sys.stderr.write(f"\r{label}: tensor {done}/{total}{end}")
        sys.stderr.flush()

    return show


def _progress_printer(progress: bool | Callable[[str, JobResult], None], total: int) -> Callable[[JobResult], None]:
    if callable(progress):
        return lambda result: progress(result.job.label, result)
    if not progress:
        return lambda result: None
    import click

    count = [0]

    def show(result: JobResult) -> None:
        count[0] += 1
        click.echo(f"[{count[0]}/{total}] {result.status}: {result.job.label}", err=True)

    return show
