"""One exception family for every mistake a user can make; the CLI turns each into a one-line message.

Every error says what was wrong, where (file, tensor key or module path) and what to do. Each class has its
own exit code so that scripts can tell failures apart without parsing messages.
"""

from __future__ import annotations


class IA3ConvertError(Exception):
    """Base of every error ia3convert raises on purpose. ``exit_code`` is what the CLI exits with."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message} ({hint})" if hint else message)


class AdapterError(IA3ConvertError):
    """An adapter directory or file is missing, unreadable, not IA3, or inconsistent."""

    exit_code = 3


class CheckpointError(IA3ConvertError):
    """A base model checkpoint is missing, unreadable or of a kind we cannot use."""

    exit_code = 4


class TargetError(IA3ConvertError):
    """Adapter targets do not fit the model: nothing matches, a match is not a Linear, shapes disagree."""

    exit_code = 5


class OutputError(IA3ConvertError):
    """An output location cannot be written as asked."""

    exit_code = 6


class MergeCheckError(IA3ConvertError):
    """A merged module is further from the IA3 forward than allowed; nothing was written."""

    exit_code = 7

    def __init__(self, report) -> None:
        self.report = report
        worst = max(report.failures, key=lambda m: m.rel_error / m.limit)
        super().__init__(
            f"merge check failed for {len(report.failures)} module(s), worst {worst.module} "
            f"({worst.transform}, relative error {worst.rel_error:.3g} > {worst.limit:.3g}); nothing was written",
            hint="raise --max-error if this error is acceptable, or inspect the adapter's scales",
        )


class HubError(IA3ConvertError):
    """The Hugging Face Hub could not be reached or refused a request."""

    exit_code = 8
