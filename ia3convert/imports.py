"""bitsandbytes, imported for a fraction of its usual start-up cost.

bitsandbytes 0.4x-0.50 decorates a few CPU helper functions with ``torch.compile`` when it is imported; the
decoration alone imports torch's whole compiler stack (dynamo, inductor, sympy: about 3 s and 50 MB on a
small CPU), although those functions run only on paths a merge never takes. Here ``torch.compile`` is
deferred during that import: each decorated function is compiled on its first call, exactly as it would be
by the real decorator's lazy compilation, so bitsandbytes behaves the same and costs 0.1 s to import.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

_LOCK = threading.Lock()


def _deferred(real: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for ``torch.compile`` that calls the real one on the decorated function's first call."""

    def compile(model: Callable[..., Any] | None = None, **options: Any) -> Any:
        if model is None:
            return lambda fn: compile(fn, **options)
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(model)
        def run(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(real(model, **options))
            return compiled[0](*args, **kwargs)

        return run

    return compile


def bitsandbytes() -> ModuleType:
    """The ``bitsandbytes`` module, imported with ``torch.compile`` deferred (see the module docstring)."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    import torch

    with _LOCK:
        real = torch.compile
        torch.compile = _deferred(real)
        try:
            return importlib.import_module("bitsandbytes")
        finally:
            torch.compile = real


def bnb_functional() -> ModuleType:
    """``bitsandbytes.functional`` (bitsandbytes imported as ``bitsandbytes()`` does)."""
    bitsandbytes()
    return importlib.import_module("bitsandbytes.functional")
