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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
