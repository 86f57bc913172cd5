"""Re-save an IA3 adapter in PEFT's canonical format.

(Named ``resaving`` so that the package attribute ``ia3convert.resave`` stays the function.)

The input is an adapter directory (or Hub repo id) holding safetensors or a legacy ``.bin``, or one adapter
of a multi-adapter directory. The output is what PEFT itself writes: ``adapter_model.safetensors`` with
``{"format": "pt"}`` metadata and ``base_model.model.<module>.ia3_l`` keys, and an ``adapter_config.json``
with sorted lists and ``peft_type`` IA3, optionally with the vectors cast to another float dtype (an
overflowing cast is refused). Tensors that are not IA3 vectors are dropped, each named in a warning.

OUT is built in a temporary sibling, validated, and renamed into place only when complete: it appears whole
or not at all, never inside or around the input, and replaces an existing OUT only with ``force``.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import DEFAULT_ADAPTER, check_adapter_name, read_adapter
from .errors import AdapterError, OutputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LISTED = 10  # dropped keys named in the warning before "and N more"


@dataclass
class ResaveResult:
    """What ``resave`` wrote: the adapter's folder in OUT, its name there, and what was left out."""

    out: Path
    folder: Path  # OUT itself for the default adapter, OUT/<name> for another name
    adapter_name: str
    source: Path
    modules: int
    dtype: str | None
    dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def resave(adapter: str | Path, out: str | Path, *, dtype: str | None = None,
           adapter_name: str = DEFAULT_ADAPTER, select: str | None = None, force: bool = False) -> ResaveResult:
    """Write the adapter at ``adapter`` to ``out`` in PEFT's canonical format.

    ``select`` picks one adapter of a multi-adapter directory (default: the root one). ``adapter_name`` is its
    name in ``out``: ``"default"`` at the root of ``out``, any other name in ``out/<name>/`` as PEFT lays out
    a non-default adapter. ``dtype`` ("float32", "bfloat16", "float16") casts the vectors, refusing values
    that would overflow. Tensors that are not IA3 vectors are dropped with a ``UserWarning`` naming them
    (also listed in the result). The written adapter is validated before it is published; an adapter with
    errors (NaN scales, say) raises ``AdapterError`` and nothing is written.
    """
    from .merging import prepare_output, publish
    from .sources import resolve_adapter
    from .validation import validate

    if dtype is not None and dtype not in DTYPES:
        raise OutputError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}", hint="pick float32, bfloat16 or "
                          "float16, or leave it out to keep the stored dtype")
    check_adapter_name(adapter_name)
    adapter_dir = resolve_adapter(adapter)
    loaded = read_adapter(adapter_dir, select, strict=False)
    out = Path(out)
    inputs = [adapter_dir] + ([loaded.source] if loaded.source is not None else [])
    tmp = prepare_output(out, inputs, force)
    try:
        folder = tmp if adapter_name == DEFAULT_ADAPTER else tmp / adapter_name
        loaded.save(folder, dtype=None if dtype is None else DTYPES[dtype])
        report = validate(folder)
        if report.errors:
            first = report.errors[0]
            more = f" (and {len(report.errors) - 1} more error(s))" if len(report.errors) > 1 else ""
            raise AdapterError(f"{loaded.source}: {first.where}: {first.message}{more}; nothing was written",
                               hint=first.fix or "run 'ia3convert validate' on the adapter")
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = ResaveResult(out=out, folder=out if adapter_name == DEFAULT_ADAPTER else out / adapter_name,
                          adapter_name=adapter_name, source=loaded.source or adapter_dir,
                          modules=len(loaded.vectors), dtype=dtype, dropped=list(loaded.dropped))
    if loaded.dropped:
        listed = ", ".join(loaded.dropped[:_LISTED])
        more = f" and {len(loaded.dropped) - _LISTED} more" if len(loaded.dropped) > _LISTED else ""
        message = (f"{result.source}: dropped {len(loaded.dropped)} tensor(s) that are not IA3 vectors: "
                   f"{listed}{more}")
        result.warnings.append(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return result
