"""The ``ia3convert`` command: a thin click layer over the Python API (parse, call, print).

User mistakes end in one line on stderr, ``error: <what> (<fix>)``, and the exit code of the error's class
(see ``errors``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from . import __version__
from .errors import IA3ConvertError

BATCH_FAILED = 9  # exit code of a batch in which some job failed


class _Group(click.Group):
    """Runs commands so that our errors become one line and an exit code, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IA3ConvertError as exc:
            if ctx.meta.get("ia3convert.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


def _quiet_libraries(import_transformers: bool = True) -> None:
    """No progress bars or per-call warnings from the libraries underneath: our output is the report. Also
    returns freed large blocks to the system (see ``memory``), for every command that loads tensors.

    ``import_transformers=False`` (merge, batch: a quantized base merges without transformers) leaves
    transformers unimported and quiets it through its environment variable, should it be imported later."""
    import logging

    from huggingface_hub.utils import disable_progress_bars

    from .memory import return_large_blocks

    return_large_blocks()
    disable_progress_bars()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if not import_transformers and "transformers" not in sys.modules:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ia3convert")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Wrap, save and merge (IA)^3 adapters on bitsandbytes-quantized models (int8, NF4, FP4)."""
    ctx.meta["ia3convert.debug"] = debug


@main.command()
@click.argument("base", type=click.Path(path_type=str))
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--adapter-name", default=None, help="Which adapter of a multi-adapter directory to load.")
@click.option("--prompt", default="Hello", show_default=True, help="Text run through the model to show the effect.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
def wrap(base: str, adapter: str, adapter_name: str | None, prompt: str, as_json: bool) -> None:
    """Load BASE (float or quantized) with transformers, wrap it with ADAPTER, and show what was wrapped.

    Prints one line per wrapped module (layer type, weight storage, scaled side, vector statistics) and how
    much the adapter changes the model's output on PROMPT.
    """
    from .summary import wrap_summary

    _quiet_libraries()
    summary = wrap_summary(base, adapter, adapter_name=adapter_name, prompt=prompt)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rows = summary["modules"]
    width = max(len(r["module"]) for r in rows)
    click.echo(f"{'module':<{width}}  {'wrapper':<12} {'storage':<8} {'scales':<6} {'min':>8} {'mean':>8} {'max':>8}")
    for r in rows:
        click.echo(f"{r['module']:<{width}}  {r['wrapper']:<12} {r['storage']:<8} {r['scales']:<6} "
                   f"{r['min']:>8.4f} {r['mean']:>8.4f} {r['max']:>8.4f}")
    click.echo(f"wrapped {len(rows)} modules of {summary['model']} with adapter {summary['adapter']!r}; "
               f"output change on the prompt: max |diff| {summary['max_abs_change']:.4g} "
               f"(relative {summary['relative_change']:.3%})")


@main.command()
@click.argument("base", type=str)
@click.argument("adapter", type=str)
@click.argument("out", type=click.Path(path_type=str))
@click.option("--adapter-name", default=None, help="Which adapter of a multi-adapter directory to merge.")
@click.option("--quantize", type=click.Choice(["int8", "nf4", "fp4"]), default=None,
              help="Quantize a float base on the way out (as transformers would on load).")
@click.option("--double-quant", is_flag=True, help="With --quantize nf4/fp4: nest the absmax (double quantization).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Write a dequantized float model instead of keeping the base's storage.")
@click.option("--renest", is_flag=True,
              help="Keep nested 4-bit layers nested after an exact fold (costs ~1e-3 relative error).")
@click.option("--requantize", is_flag=True, help="Dequantize-scale-requantize every merged module, no exact folds.")
@click.option("--fold/--no-fold", default=True, show_default=True,
              help="Move input-side scales onto the rows of the layer producing that input where that is exact.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check every merged module against the IA3 forward.")
@click.option("--max-error", type=float, default=None,
              help="Largest relative error allowed per module (default: per transform kind).")
@click.option("--probe-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Probe inputs per module for the check.")
@click.option("--probe-scale", type=float, default=1.0, show_default=True, help="Standard deviation of the probes.")
@click.option("--check-sample", type=click.IntRange(min=0), default=512, show_default=True,
              help="Output rows (fold paths: channels) each module's check compares, drawn at random plus the "
                   "rows with special scales; 0 checks every row.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]|auto",
              help="Where decoding, scaling, encoding and the check run (cuda: bitsandbytes' CUDA kernels; auto: "
                   "CUDA when there is a GPU).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 500MB).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table, only errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--push-to", default=None, metavar="REPO_ID", help="After the merge, push OUT to this Hub repo.")
@click.option("--private/--public", default=None, help="With --push-to: visibility of a repo that is created.")
@click.option("--token", default=None, help="With --push-to: Hub token (default: HF_TOKEN, then the saved login).")
@click.option("--base-model-id", default=None, metavar="REPO_ID", help="With --push-to: base model id for the card.")
@click.option("--endpoint", envvar="HF_ENDPOINT", default=None, metavar="URL",
              help="With --push-to: Hub endpoint (default: HF_ENDPOINT, else https://huggingface.co).")
def merge(base: str, adapter: str, out: str, adapter_name: str | None, quantize: str | None, double_quant: bool,
          dtype: str | None, renest: bool, requantize: bool, fold: bool, check: bool, max_error: float | None,
          probe_tokens: int, probe_scale: float, check_sample: int, device: str, max_shard_size: str, force: bool,
          quiet: bool,
          as_json: bool, push_to: str | None, private: bool | None, token: str | None, base_model_id: str | None,
          endpoint: str | None) -> None:
    """Merge ADAPTER into BASE and write a self-contained model to OUT.

    BASE and ADAPTER are local directories or Hub repo ids. The output keeps the base's storage (int8,
    NF4/FP4, float) unless --quantize or --dtype says otherwise. Every merged module is checked against the
    IA3-wrapped original layer; OUT appears only when the merge is complete and checked.
    """
    from .errors import MergeCheckError
    from .merging import merge as run_merge

    _quiet_libraries(import_transformers=False)
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="merging", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        report = run_merge(base, adapter, out, adapter_name=adapter_name, quantize=quantize,
                           double_quant=double_quant, dtype=dtype, renest=renest, requantize=requantize,
                           fold=fold, check=check, max_error=max_error, probe_tokens=probe_tokens,
                           probe_scale=probe_scale, check_sample=check_sample, device=device,
                           max_shard_size=max_shard_size, force=force,
                           progress=None if quiet or as_json or not sys.stderr.isatty() else progress)
    except MergeCheckError as exc:
        if not quiet:
            click.echo(exc.report.table(), err=True)
        raise
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(report.table())
        kinds = ", ".join(f"{v['modules']} {k}" + (f" (max {v['max_rel_error']:.1e})" if v["max_rel_error"]
                                                    is not None else "") for k, v in report.summary().items())
        click.echo(f"merged {len(report.modules)} modules into {out} in {report.seconds:.1f}s: {kinds or 'none'}")
    if push_to:
        from .hub import push as run_push

        _quiet_hub_unless_terminal()
        _print_push(run_push(out, push_to, private=private, token=token, base_model_id=base_model_id,
                             endpoint=endpoint), err=as_json)


def _quiet_hub_unless_terminal() -> None:
    """huggingface_hub's upload progress bars only where someone watches them (not in pipes, logs, tests)."""
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _print_push(result: Any, err: bool = False) -> None:
    """What a push did (or would do): notes on stderr, then the file list and card (dry run) or the URL."""
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if result.dry_run:
        click.echo(f"would push {len(result.files)} files to {result.repo_id} ({result.kind}):", err=err)
        width = max(len(f) for f in result.files)
        for name in result.files:
            click.echo(f"  {name:<{width}}  {result.sizes[name]:>12,} bytes", err=err)
        click.echo(f"--- README.md ---\n{result.card.rstrip()}\n---", err=err)
        click.echo("dry run: nothing was sent", err=err)
        return
    where = f"pull request on {result.revision or 'main'}" if result.pr_url else (result.revision or "main")
    click.echo(f"pushed {len(result.files)} files to {result.repo_id} ({result.kind}, {where}): {result.url}",
               err=err)


@main.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--repo", "repo_id", required=True, metavar="REPO_ID",
              help="Hub repo to push to: NAMESPACE/NAME, or NAME in the token's own namespace.")
@click.option("--private/--public", default=None,
              help="Visibility of a repo that is created (an existing repo with the other visibility is refused).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created from main if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None, help="Summary of the commit.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN, then the saved `hf auth login`).")
@click.option("--base-model-id", default=None, metavar="REPO_ID",
              help="Hub id of the base model for the card, when the local config names only a path.")
@click.option("--dry-run", is_flag=True, help="List the files and show the card; contact nothing.")
@click.option("--include", multiple=True, metavar="GLOB", help="Upload only files matching (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Do not upload files matching (repeatable).")
@click.option("--overwrite-card", is_flag=True, help="Replace the folder's README.md by a generated card.")
@click.option("--endpoint", envvar="HF_ENDPOINT", default=None, metavar="URL",
              help="Hub endpoint (default: HF_ENDPOINT, else https://huggingface.co).")
def push(path: str, repo_id: str, private: bool | None, revision: str | None, create_pr: bool,
         commit_message: str | None, token: str | None, base_model_id: str | None, dry_run: bool,
         include: tuple[str, ...], exclude: tuple[str, ...], overwrite_card: bool, endpoint: str | None) -> None:
    """Push PATH, an IA3 adapter directory or a merged model directory, to the Hub repo REPO_ID in one commit.

    The adapter is validated first; a model needs config.json and weights. A model card (README.md with the
    Hub's metadata: library, base model, tags; for a merged model the merge-accuracy summary) is generated, or
    the folder's README.md is kept with missing metadata added. Hidden, temporary and cache files are never
    uploaded. Prints the commit (or pull request) URL.
    """
    from .hub import push as run_push

    _quiet_hub_unless_terminal()
    result = run_push(path, repo_id, private=private, revision=revision, create_pr=create_pr,
                      commit_message=commit_message, token=token, base_model_id=base_model_id, dry_run=dry_run,
                      include=include, exclude=exclude, overwrite_card=overwrite_card, endpoint=endpoint)
    _print_push(result)


@main.command()
@click.argument("adapter", type=str)
@click.option("--base", default=None, help="A base model (directory or Hub repo id) to check the adapter against.")
@click.option("--adapter-name", default=None, help="Which adapter of a multi-adapter directory to check.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.pass_context
def validate(ctx: click.Context, adapter: str, base: str | None, adapter_name: str | None, as_json: bool) -> None:
    """Check ADAPTER (and, with --base, that it fits BASE) and list every problem with its fix.

    One line per finding: severity (error, warning, info), module path or key, what is wrong, what to do.
    The base is judged from config.json and safetensors headers only. Exit 0: no errors (warnings allowed);
    1: errors found; 2: the adapter or the base could not be read at all.
    """
    from .validation import validate as run_validate

    if base is not None:
        _quiet_libraries()
    try:
        report = run_validate(adapter, base, adapter_name=adapter_name)
    except IA3ConvertError as exc:
        if ctx.meta.get("ia3convert.debug"):
            raise
        click.echo(f"error: {exc}", err=True)
        ctx.exit(2)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            click.echo(line)
        click.echo(report.summary())
    ctx.exit(report.exit_code)


@main.command()
@click.argument("adapter", type=str)
@click.argument("out", type=click.Path(path_type=str))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the vectors (an overflowing cast is refused). Default: keep the stored dtype.")
@click.option("--adapter-name", default="default", show_default=True,
              help="Name of the adapter in OUT: 'default' at OUT's root, any other name in OUT/NAME/.")
@click.option("--select", default=None, help="Which adapter of a multi-adapter ADAPTER directory to re-save.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def resave(adapter: str, out: str, dtype: str | None, adapter_name: str, select: str | None, force: bool) -> None:
    """Write ADAPTER to OUT in PEFT's canonical format (safetensors, sorted config lists, peft_type IA3).

    ADAPTER may hold safetensors or a legacy adapter_model.bin; tensors that are not IA3 vectors are dropped
    with a warning naming them. OUT is validated and appears only when complete.
    """
    import warnings

    from .resaving import resave as run_resave

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are in the result; printed below as one line each
        result = run_resave(adapter, out, dtype=dtype, adapter_name=adapter_name, select=select, force=force)
    for message in result.warnings:
        click.echo(f"warning: {message}", err=True)
    cast = f" as {result.dtype}" if result.dtype else ""
    click.echo(f"wrote {result.modules} vectors of {result.source}{cast} to {result.folder}")


@main.command()
@click.argument("manifest", type=click.Path(path_type=str))
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run groups (one per base) in this many processes.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip merges whose recorded inputs and options are unchanged.")
@click.option("--stop-on-error", is_flag=True, help="Cancel the jobs not yet started after the first failure.")
@click.option("--quiet", is_flag=True, help="No progress lines and no table.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch report as JSON.")
def batch(manifest: str, workers: int, resume: bool, stop_on_error: bool, quiet: bool, as_json: bool) -> None:
    """Run the jobs of MANIFEST (YAML or JSON): merges, validations and re-saves; merges into the same base
    share one pass over it. Exits 9 when some job failed (each failure is listed with its one-line error)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .batch import load_manifest, run_batch

    _quiet_libraries(import_transformers=False)
    jobs = load_manifest(manifest)
    options = dict(on_error="stop" if stop_on_error else "continue", resume=resume, progress=not (quiet or as_json))
    if workers > 1:
        # "spawn", not fork: a forked child of a process that has run torch's thread pools can deadlock.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            report = run_batch(jobs, executor=pool, **options)
    else:
        report = run_batch(jobs, **options)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    elif not quiet:
        click.echo(report.table())
    if not report.ok:
        sys.exit(BATCH_FAILED)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
