"""``mmdet-mlflow batch``: score files as an Azure batch endpoint would (the same records, from
``scoring.batch_files`` over the one runner), writing JSON lines, resumably.

Resuming is exact however the run was killed: each mini-batch's records are written with one
write, flushed and fsynced, and only then is each of its files entered, with the output's length
after that write, in a progress file beside the output (``.<output name>.progress``, fsynced
too). A rerun truncates the output to the last length the progress file vouches for (dropping
whatever a kill left half-written or written but not vouched for) and skips the files it lists,
so every input ends with exactly one complete set of records.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def progress_file(output: Path) -> Path:
    return output.with_name(f".{output.name}.progress")


def completed_files(output: Path) -> set[str]:
    """Files whose records are all in ``output``; truncates what is not vouched for."""
    progress = progress_file(output)
    if not output.exists():
        progress.unlink(missing_ok=True)
        return set()
    if progress.exists():
        entries = _complete_lines(progress)
    else:  # records without a progress file (an older version wrote them): vouch for them here
        entries = _entries_from_records(output)
        progress.write_bytes("".join(json.dumps(e) + "\n" for e in entries).encode())
    end = max((entry["end"] for entry in entries), default=0)
    if output.stat().st_size < end:
        raise FileExistsError(f"{output} is shorter than its progress file {progress} says; "
                              f"write to a new file or remove both")
    if output.stat().st_size > end:
        _truncate(output, end)
    return {entry["file"] for entry in entries}


def _complete_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    try:
        return [json.loads(line) for line in complete.splitlines()]
    except ValueError:
        raise FileExistsError(f"{path} is not a batch progress file; remove it and its output") from None


def _entries_from_records(output: Path) -> list[dict]:
    """Progress entries for an output with no progress file: every file with complete lines but
    the last one, which a kill may have cut between two of its records. Refuses a file whose
    lines are not batch records (it is not ours to truncate)."""
    data = output.read_bytes()
    lines = data[:data.rfind(b"\n") + 1].splitlines(keepends=True)
    try:
        files = [json.loads(line)["file"] for line in lines]
    except (ValueError, KeyError, TypeError):
        raise FileExistsError(f"{output} exists and has lines that are not batch records; "
                              f"write to a new file or remove it") from None
    last = files[-1] if files else None
    while files and files[-1] == last:
        files.pop()
        lines.pop()
    end = sum(len(line) for line in lines)
    return [{"file": name, "end": end} for name in dict.fromkeys(files)]


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as out:
        out.truncate(size)
        out.flush()
        os.fsync(out.fileno())


def _append_synced(handle, data: bytes) -> int:
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())
    return handle.tell()


def run_batch(model_dir: Path, input_path: Path, output: Path, mini_batch_size: int = 10,
              params: dict | None = None) -> dict:
    """Score ``input_path`` into ``output`` (JSON lines ``{"row", "prediction", "file",
    "error"}``), resuming a previous run. Returns counts."""
    from tqdm import tqdm

    import mlflow_model
    from scoring.batch_files import file_name, input_entries, score_files
    from scoring.class_filter import check_classes
    from scoring.runner import predict_params

    input_path, output = Path(input_path), Path(output)
    listing = input_entries(input_path, exclude=(output, progress_file(output)))
    files = listing.entries  # each one's records, or its error record (a FIFO, a symlink loop, ...)
    root = input_path if input_path.is_dir() else input_path.parent
    done = completed_files(output)
    todo = [f for f in files if file_name(f, root) not in done]
    counts = {"files": len(files), "skipped": len(files) - len(todo), "images": 0, "errors": 0,
              "hidden": listing.hidden}
    if not todo:
        return counts
    mlflow_model.checked_predict_params(model_dir, params)  # a bad param: refused before the load
    predictor = mlflow_model.load_saved_predictor(model_dir)
    params = predict_params(predictor, params)  # and against the loaded model, before any file
    check_classes(predictor.class_names, params)  # so does a class the model does not have
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "ab") as out, open(progress_file(output), "ab") as progress, \
            tqdm(total=len(files), initial=counts["skipped"], unit="file", desc="batch",
                 file=sys.stderr, disable=None) as bar:
        for start in range(0, len(todo), mini_batch_size):
            mini_batch = todo[start:start + mini_batch_size]
            records = score_files(predictor, mini_batch, params, lambda p: file_name(p, root))
            end = _append_synced(out, "".join(json.dumps(r) + "\n" for r in records).encode())
            names = [file_name(p, root) for p in mini_batch]
            _append_synced(progress, "".join(json.dumps({"file": n, "end": end}) + "\n"
                                             for n in names).encode())
            counts["images"] += sum(r["error"] is None for r in records)
            counts["errors"] += sum(r["error"] is not None for r in records)
            bar.update(len(mini_batch))
    return counts
