"""Bad data is reported whole: every problem found, each naming the file, the line (JSONL) or
record (COCO) and the field, in one ``DataError``."""
from __future__ import annotations

from pathlib import Path

from scoring.errors import MmdetMlflowError

MAX_REPORTED_PROBLEMS = 20


class DataError(MmdetMlflowError, ValueError):
    """Bad training/evaluation data. The message lists every problem found (up to
    ``MAX_REPORTED_PROBLEMS``), each naming the file, the line (JSONL) or record (COCO) and the
    field; ``problems`` holds them all."""

    def __init__(self, problems: list[str] | str, source: str | Path | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        shown = self.problems[:MAX_REPORTED_PROBLEMS]
        if len(self.problems) == 1:
            message = shown[0]
        else:
            lines = [f"{len(self.problems)} problems" + (f" in {source}:" if source else ":")]
            lines += [f"  {p}" for p in shown]
            if len(self.problems) > len(shown):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
            message = "\n".join(lines)
        super().__init__(message)


class Problems:
    """Collects problems instead of stopping at the first, so one run shows them all."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, where: str, fld: str, problem: str):
        self.items.append(f"{where}: {fld}: {problem}")

    def raise_if_any(self, source):
        if self.items:
            raise DataError(self.items, source)
