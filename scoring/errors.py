"""The error every bad request raises: it names the row (when there is one) and the problem."""
from __future__ import annotations


class InputError(ValueError):
    """A problem with what the caller sent, never with the model: servers answer it with a 4xx."""

    def __init__(self, problem: str, row: int | str | None = None):
        self.problem = problem
        self.row = row
        super().__init__(f"row {row}: {problem}" if row is not None else problem)

    def for_row(self, row: int | str) -> "InputError":
        """The same problem, attributed to `row` (decoders raise without knowing their row)."""
        return InputError(self.problem, row)
