"""``mmdet-mlflow batch``: run scoring/batch_score.py over files the way Azure's batch driver
does (``init()`` once, ``run(mini_batch)`` per mini-batch of file paths), writing JSON lines.

Resumable: every mini-batch's lines are written with one write, flushed and fsynced; a rerun
reads the output, drops a trailing partial line (and, since that write was cut short, the
lines of the file it was writing) and skips the files already there.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def input_files(path: Path, exclude: Path | None = None) -> list[Path]:
    """The file itself, or every file under the folder (as Azure passes a folder's files),
    sorted, without hidden files or ``exclude`` (the output, when it sits inside)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a file nor a folder")
    skip = exclude.resolve() if exclude else None
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                  and p.resolve() != skip)


def completed_files(output: Path) -> set[str]:
    """Files whose records are all in ``output``; truncates what a kill left half-written."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.splitlines(keepends=True)
    try:
        files = [json.loads(line)["file"] for line in lines]
    except (ValueError, KeyError, TypeError):
        raise FileExistsError(f"{output} exists and has lines that are not batch records; "
                              f"write to a new file or remove it") from None
    if len(complete) < len(data):  # the last write was cut short: its last file may be partial
        last = files[-1] if files else None
        while files and files[-1] == last:
            files.pop()
            lines.pop()
        with open(output, "r+b") as out:
            out.truncate(sum(len(line) for line in lines))
            out.flush()
            os.fsync(out.fileno())
    return set(files)


def run_batch(model_dir: Path, input_path: Path, output: Path, mini_batch_size: int = 10,
              params: dict | None = None) -> dict:
    """Score ``input_path`` into ``output`` (JSON lines ``{"row", "prediction", "file",
    "error"}``), resuming a previous run. Returns counts."""
    from tqdm import tqdm

    from scoring import batch_score

    input_path, output = Path(input_path), Path(output)
    files = input_files(input_path, exclude=output)
    root = input_path if input_path.is_dir() else input_path.parent
    done = completed_files(output)
    todo = [f for f in files if f.relative_to(root).as_posix() not in done]
    counts = {"files": len(files), "skipped": len(files) - len(todo), "images": 0, "errors": 0}
    if not todo:
        return counts
    batch_score.init(model_dir=str(model_dir), params=params, input_root=str(root))
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as out, tqdm(total=len(files), initial=counts["skipped"], unit="file",
                                         desc="batch", file=sys.stderr, disable=None) as bar:
        for start in range(0, len(todo), mini_batch_size):
            mini_batch = [str(p) for p in todo[start:start + mini_batch_size]]
            records = [batch_score.parse_record(line) for line in batch_score.run(mini_batch)]
            out.write("".join(json.dumps(r) + "\n" for r in records).encode())
            out.flush()
            os.fsync(out.fileno())
            counts["images"] += sum(r["error"] is None for r in records)
            counts["errors"] += sum(r["error"] is not None for r in records)
            bar.update(len(mini_batch))
    return counts
