"""The project's one error base class, and the error every bad request raises.

Everything mmdet-mlflow raises on purpose (bad input, bad data, a checkpoint that does not fit,
a pipeline that does not load, ...) is an ``MmdetMlflowError``: the CLI prints it as one line
and exits 2, the servers answer it with a 4xx. Anything else is a bug and keeps its traceback.
This module ships inside every saved model (``code/scoring``), so it imports nothing heavy.
"""
from __future__ import annotations


class MmdetMlflowError(Exception):
    """A problem the user can fix (input, data, settings, files): reported as a message, never
    as a stack trace. Subclasses say which kind."""


class InputError(MmdetMlflowError, ValueError):
    """A problem with what the caller sent, never with the model: servers answer it with a 4xx."""

    status = 400

    def __init__(self, problem: str, row: int | str | None = None):
        self.problem = problem
        self.row = row
        super().__init__(f"row {row}: {problem}" if row is not None else problem)

    def for_row(self, row: int | str) -> "InputError":
        """The same problem, attributed to `row` (decoders raise without knowing their row)."""
        return InputError(self.problem, row)


class RequestTooLarge(InputError):
    """A request body over the size limit (HTTP 413)."""

    status = 413
