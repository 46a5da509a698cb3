"""Exceptions raised for user errors.

Every error a user can cause is a :class:`MixMatchError` (or a subclass) whose message says what is
wrong and what to do about it, in one line. The CLI prints that line and exits non-zero; Python
callers can catch the base class.
"""

from __future__ import annotations


class MixMatchError(ValueError):
    """A user-facing error: bad input, an impossible request, or a file that cannot be used."""


class PlanMismatchError(MixMatchError):
    """A plan or strategy does not fit the model it is applied to."""


class BudgetError(MixMatchError):
    """A target sparsity cannot be reached under the given ranges and constraints."""


class RulesError(MixMatchError):
    """A rules or preset file is malformed or refers to unknown roles or keys."""


class SignalError(MixMatchError):
    """Sensitivity scores could not be computed or contain NaN/inf."""


def first_line(exc: BaseException | str, limit: int = 240) -> str:
    """The first line of an error message (an exception's type name when it has none), cut at a word, never mid-word."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."
