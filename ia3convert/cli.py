"""The ``ia3convert`` command: a thin click layer over the Python API (parse, call, print).

User mistakes end in one line on stderr, ``error: <what> (<fix>)``, and the exit code of the error's class
(see ``errors``); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import IA3ConvertError


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


def _quiet_libraries() -> None:
    """No progress bars or per-call warnings from the libraries underneath: our output is the report."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


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
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check every merged module against the IA3 forward.")
@click.option("--max-error", type=float, default=None,
              help="Largest relative error allowed per module (default: per transform kind).")
@click.option("--probe-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Probe inputs per module for the check.")
@click.option("--probe-scale", type=float, default=1.0, show_default=True, help="Standard deviation of the probes.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output shard (e.g. 5GB, 500MB).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar and no table, only errors.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def merge(base: str, adapter: str, out: str, adapter_name: str | None, quantize: str | None, double_quant: bool,
          dtype: str | None, renest: bool, requantize: bool, check: bool, max_error: float | None,
          probe_tokens: int, probe_scale: float, max_shard_size: str, force: bool, quiet: bool,
          as_json: bool) -> None:
    """Merge ADAPTER into BASE and write a self-contained model to OUT.

    BASE and ADAPTER are local directories or Hub repo ids. The output keeps the base's storage (int8,
    NF4/FP4, float) unless --quantize or --dtype says otherwise. Every merged module is checked against the
    IA3-wrapped original layer; OUT appears only when the merge is complete and checked.
    """
    from .errors import MergeCheckError
    from .merging import merge as run_merge

    _quiet_libraries()
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
                           check=check, max_error=max_error, probe_tokens=probe_tokens, probe_scale=probe_scale,
                           max_shard_size=max_shard_size, force=force,
                           progress=None if quiet or as_json else progress)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
