"""Batch scoring of files, shared by Azure's batch entry script (``scoring.azureml.batch_score``)
and ``mmdet-mlflow batch``: which images a file holds, and the record each image gets.

A file is an image (row 0), or a table (CSV, JSON lines, parquet) with an ``image`` column of
base64 strings, URLs or bytes (one row each). Every image gets one record ``{"row",
"prediction", "file", "error"}``: ``prediction`` is the online response's entry for it
(``{"boxes": [...]}``) or ``error`` says what was wrong with that file or row, so one bad input
never costs the others. Scoring goes through the one runner (``scoring.runner``).

Which files a folder holds is listed here too (``input_entries``), for every command that scores
a folder (``batch``, ``predict``, ``spark-batch``): every entry is accounted for, a regular file
to read or an entry with its problem (a FIFO, a socket, a symlink loop, ...), which becomes that
entry's error record. Nothing is opened before ``os.stat`` says it is a regular file: reading a
FIFO would wait for a writer forever.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import stat
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from scoring import settings
from scoring.errors import InputError
from scoring.runner import score_images
from scoring.runtimes.base import Predictor
from scoring.schema import INPUT_COLUMN, PredictParams

COLUMNS = ("row", "prediction", "file", "error")  # predictions.csv's columns, in order
logger = logging.getLogger("mmdet_mlflow.batch")


# --- which entries a folder holds, and what is wrong with those that are no file to read -------

@dataclass(frozen=True)
class Entry(os.PathLike):
    """An entry of an input folder, usable as its path. ``problem``: why the listing found it
    is no file to read (a symlink loop, a FIFO, ...), or None (``file_problem`` checks it again
    when it is read)."""

    path: Path
    problem: str | None = None

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return os.fspath(self.path)


@dataclass(frozen=True)
class Listing:
    entries: list[Entry]  # sorted by path
    hidden: int  # entries not listed because their names are hidden (a hidden folder: once)


_NOT_REGULAR = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                stat.S_IFDIR: "a folder"}


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` gives no image, from what the listing found or ``os.stat`` alone (never
    opened): a symlink loop, a dangling symlink, not a regular file (a FIFO, a socket, a
    device, a folder), unreadable, empty; None for a regular file with bytes to read."""
    if isinstance(path, Entry) and path.problem:
        return path.problem
    try:
        info = os.stat(path)
    except OSError as err:
        return _stat_problem(path, err)
    kind = stat.S_IFMT(info.st_mode)
    if kind != stat.S_IFREG:
        return f"not a regular file: {_NOT_REGULAR.get(kind, f'file type {kind:o}')}"
    if not os.access(path, os.R_OK):
        return "cannot read the file: permission denied"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return None


def _stat_problem(path, err: OSError) -> str:
    import errno

    if err.errno == errno.ELOOP:
        return "a symlink loop: the link leads back to itself"
    if err.errno == errno.ENOENT and os.path.islink(path):
        return f"a dangling symlink: its target {os.readlink(path)} does not exist"
    return problem(err)


def _dot_name(name: str) -> bool:
    return name.startswith(".")


def input_entries(path: str | os.PathLike, exclude: Iterable[str | os.PathLike] = (),
                  hidden: Callable[[str], bool] = _dot_name,
                  wanted: Callable[[str], bool] | None = None) -> Listing:
    """The file itself, or every entry under the folder (as Azure passes a folder's files),
    each with its problem (``file_problem``, and a symlink to a folder that holds it: a loop,
    never followed), sorted. Folders, real or linked, are descended into; names ``hidden``
    says are skipped (and counted), as are ``exclude`` (the output, when it sits inside) and
    entries whose name ``wanted`` refuses."""
    path = Path(path)
    if not path.is_dir():
        if not os.path.lexists(path):
            raise FileNotFoundError(f"{path} is neither a file nor a folder")
        return Listing([Entry(path, file_problem(path))], 0)
    skip = {os.path.abspath(p) for p in exclude}
    entries, hidden_count = [], 0
    start = os.stat(path)
    folders = [(path, frozenset({(start.st_dev, start.st_ino)}))]  # and the folders above it
    while folders:
        folder, above = folders.pop()
        try:
            names = os.listdir(folder)
        except OSError as err:  # a sub-folder we may not list: its entry, not the end of the run
            entries.append(Entry(folder, f"cannot list the folder: {err.strerror or err}"))
            continue
        for name in names:
            entry = folder / name
            if os.path.abspath(entry) in skip:
                continue
            if hidden(name):
                hidden_count += 1
                continue
            try:
                info = os.stat(entry)
            except OSError:
                info = None
            if info is not None and stat.S_ISDIR(info.st_mode):
                if (info.st_dev, info.st_ino) not in above:
                    folders.append((entry, above | {(info.st_dev, info.st_ino)}))
                elif wanted is None or wanted(name):
                    entries.append(Entry(entry, f"a symlink loop: a link to the folder "
                                                f"{os.path.realpath(entry)}, which holds it"))
            elif wanted is None or wanted(name):
                entries.append(Entry(entry, file_problem(entry)))
    return Listing(sorted(entries, key=lambda e: e.path), hidden_count)


# --- the images of a file, and their records --------------------------------------------------

def file_images(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(row, image value) of a file: a table's ``image`` column, or the file itself as row 0.
    Values that are not strings come back as they are; scoring reports them per row."""
    known = file_problem(path)
    if known:
        raise InputError(known)
    suffix = Path(path).suffix.lower()
    reader = TABLE_READERS.get(suffix)
    if reader is None:
        return [(0, Path(path).read_bytes())]
    table = reader(path)
    if INPUT_COLUMN not in table.columns:
        raise InputError(f"the table has no {INPUT_COLUMN!r} column (columns: "
                         f"{', '.join(map(str, table.columns)) or 'none'})")
    if len(table) == 0:
        raise InputError("the table has no rows")
    return list(enumerate(table[INPUT_COLUMN].tolist()))


def _read_csv(path):
    import pandas as pd

    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _read_jsonl(path):
    import pandas as pd

    return pd.read_json(path, lines=True, dtype=False)


def _read_parquet(path):
    import pandas as pd

    return pd.read_parquet(path)


TABLE_READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def file_name(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """How records name a file: relative to ``root`` when it lies below it, else its base name
    (as Azure's batch output does). Links are not resolved: a symlinked input keeps its own
    name, so a resumed run recognises it."""
    if root:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            pass
    return os.path.basename(path)


def score_files(predictor: Predictor, paths: Iterable[str | os.PathLike],
                params: PredictParams | dict | None = None,
                file_name: Callable[[str], str] = file_name) -> list[dict]:
    """Records for every image in ``paths``, in order (see the module docstring), within the
    model's model_config (scoring.settings)."""
    with settings.using(predictor.model_config):
        return _score_files(predictor, paths, params, file_name)


def _score_files(predictor: Predictor, paths: Iterable[str | os.PathLike],
                 params: PredictParams | dict | None, file_name: Callable[[str], str]) -> list[dict]:
    records: list[dict] = []
    items = []  # (index into records, image value)
    for path in paths:
        path = path if isinstance(path, Entry) else str(path)
        name = file_name(path)
        try:
            images = file_images(path)
        except Exception as err:  # an unreadable file is one error record, not a failed batch
            records.append(record(name, None, error=problem(err)))
            continue
        for row, value in images:
            records.append(record(name, row))
            items.append((len(records) - 1, value))
    for scored in score_images(predictor, items, params, on_error="yield",
                               decode=lambda index, value: _decode(value, records[index]["row"])):
        if scored.ok:
            records[scored.key]["prediction"] = scored.response
        else:
            records[scored.key]["error"] = problem(scored.error)
    return records


def read_image_file(path: str | os.PathLike, row=None):
    """An image file decoded, or an InputError saying why not, for every path that scores
    files (batch scoring, ``predict``): an unreadable file (permissions, a folder, a link to
    nothing) is that file's error, as an undecodable one is, never the end of the run."""
    from scoring.decode import decode_image

    known = file_problem(path)
    if known:
        raise InputError(known, row=row)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InputError(problem(err), row=row) from None
    return decode_image(data, row=row)


def _decode(value, row):
    from scoring.decode import decode_image, image_value_problem

    problem = image_value_problem(value)  # a table's cell, in the request's terms
    if problem:
        raise InputError(problem, row=row)
    return decode_image(value, row=row)


def record(file: str, row, error: str | None = None) -> dict:
    return {"row": row, "prediction": None, "file": file, "error": error}


def problem(err: Exception) -> str:
    """The message for an error record: input problems as they are, anything else with its type
    (and the traceback in the log, for whoever runs the job)."""
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, OSError):
        return f"cannot read the file: {err.strerror or err}"
    logger.error("scoring failed:\n%s", "".join(traceback.format_exception(err)))
    return f"scoring failed: {type(err).__name__}: {err}"


def format_record(rec: dict) -> str:
    """One CSV line (no line break) for a record: predictions.csv stays valid CSV, one record per
    line. The prediction is JSON (which escapes line breaks itself); the file name and the error
    message are text that may hold line breaks (a file name with one, an error quoting a table
    cell), which CSV would keep inside quotes, splitting the record over lines that Azure's
    driver and line-by-line readers take for separate records: ``escape_text`` puts them on one
    line and ``parse_record`` restores them."""
    prediction = json.dumps(rec["prediction"]) if rec["prediction"] is not None else ""
    row = "" if rec["row"] is None else rec["row"]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(
        [row, prediction, escape_text(rec["file"]), escape_text(rec["error"] or "")])
    return buffer.getvalue()


# Every character str.splitlines() breaks at (pandas' parser breaks at LF and CR only).
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
_ESCAPED = re.compile(r"\\(\\|n|r|u[0-9a-f]{4})")


def escape_text(text: str) -> str:
    """``text`` on one line, reversibly: a backslash doubled, LF and CR as backslash-n and
    backslash-r, the other line breaks as backslash-u and four hex digits."""
    def escaped(char: str) -> str:
        if char == "\\":
            return "\\\\"
        if char in _LINE_BREAKS:
            return {"\n": "\\n", "\r": "\\r"}.get(char, f"\\u{ord(char):04x}")
        return char

    return "".join(map(escaped, text))


def unescape_text(text: str) -> str:
    def unescaped(match: re.Match) -> str:
        code = match.group(1)
        return {"\\": "\\", "n": "\n", "r": "\r"}.get(code) or chr(int(code[1:], 16))

    return _ESCAPED.sub(unescaped, text)


def parse_record(line: str) -> dict:
    """The inverse of format_record (to read predictions.csv lines back)."""
    row, prediction, file, error = next(csv.reader([line]))
    return {"row": int(row) if row else None, "prediction": json.loads(prediction) if prediction else None,
            "file": unescape_text(file), "error": unescape_text(error) or None}


__all__ = ["COLUMNS", "Entry", "Listing", "file_images", "file_problem", "format_record",
           "input_entries", "parse_record", "problem", "record", "score_files"]
