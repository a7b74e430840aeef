"""Azure ML batch endpoint scoring script: ``init()`` once, ``run(mini_batch)`` per mini-batch.

``mini_batch`` is a list of file paths. An image file is one image; a CSV, JSON lines or parquet
file is a table whose ``image`` column holds base64 strings or http(s) URLs (parquet may hold
raw bytes), one image per row. Images from all files of a mini-batch are scored together, in
real batches, through the model's pyfunc (the same path as the online endpoint).

``run()`` returns a list of strings, each one complete CSV record
``row,prediction,file,error`` (see COLUMNS): Azure's driver (output_action ``append_row``)
writes each returned element as one line of ``predictions.csv``, so the file is valid CSV
(a returned DataFrame would be written with the driver's own separator, which breaks on the
commas and quotes in the prediction JSON). ``prediction`` is the online response's entry for
that image (``{"boxes": [...]}``). A file or row that cannot be scored gets a record with
``error`` set instead of failing the mini-batch, so one bad input never costs the others.
Read the output with ``pandas.read_csv("predictions.csv", names=COLUMNS)``.

Settings (environment variables, set on the deployment): ``MMDET_MLFLOW_BATCH_PARAMS`` (a JSON
object of predict params), ``MMDET_MLFLOW_BATCH_SIZE`` (images per forward pass).
"""
from __future__ import annotations

import base64
import csv
import importlib.util
import io
import json
import logging
import os
import sys
import traceback
from pathlib import Path

COLUMNS = ("row", "prediction", "file", "error")
PARAMS_ENV = "MMDET_MLFLOW_BATCH_PARAMS"
INPUT_ROOT_ENV = "MMDET_MLFLOW_BATCH_INPUT_ROOT"  # names files relative to it (else base name)
CHUNK_IMAGES = int(os.environ.get("MMDET_MLFLOW_BATCH_SIZE", 8))
logger = logging.getLogger("mmdet_mlflow.batch_score")

_state: dict = {}


def init(model_dir: str | None = None, params: dict | None = None, input_root: str | None = None):
    """Load the model (as score.py does: found under AZUREML_MODEL_DIR unless ``model_dir`` is
    given) and check the predict params before any file is read."""
    online = _online_script()
    online.init(model_dir)
    from scoring.errors import InputError
    from scoring.schema import PredictParams

    if params is None:
        raw = os.environ.get(PARAMS_ENV)
        try:
            params = json.loads(raw) if raw else None
        except ValueError as err:
            raise InputError(f"{PARAMS_ENV} is not a JSON object: {err}") from None
    PredictParams().updated(params)  # raises InputError naming a bad param
    _state.update(model=online.model, params=params or None,
                  input_root=input_root or os.environ.get(INPUT_ROOT_ENV))


def run(mini_batch) -> list[str]:
    """One CSV record per image of every file in ``mini_batch`` (see the module docstring)."""
    return [format_record(record) for record in score_files(mini_batch)]


def score_files(paths) -> list[dict]:
    """Records ``{"row", "prediction", "file", "error"}`` for every image in ``paths``, in order."""
    if "model" not in _state:
        raise RuntimeError("init() has not loaded the model")
    records, pending = [], []  # pending: (index into records, image value)
    for path in map(str, paths):
        name = _file_name(path)
        try:
            images = file_images(path)
        except Exception as err:  # an unreadable file is one error record, not a failed batch
            records.append(_record(name, None, error=_problem(err)))
            continue
        for row, value in images:
            records.append(_record(name, row))
            pending.append((len(records) - 1, value))
    for start in range(0, len(pending), CHUNK_IMAGES):
        _score_chunk(pending[start:start + CHUNK_IMAGES], records)
    return records


def file_images(path: str) -> list[tuple[int, str]]:
    """(row, image value) of a file: a table's ``image`` column, or the file itself as row 0.
    Values that are not strings come back as they are; scoring reports them per row."""
    from scoring.errors import InputError
    from scoring.schema import INPUT_COLUMN

    suffix = Path(path).suffix.lower()
    reader = TABLE_READERS.get(suffix)
    if reader is None:
        return [(0, base64.b64encode(Path(path).read_bytes()).decode("ascii"))]
    table = reader(path)
    if INPUT_COLUMN not in table.columns:
        raise InputError(f"the table has no {INPUT_COLUMN!r} column (columns: "
                         f"{', '.join(map(str, table.columns)) or 'none'})")
    if len(table) == 0:
        raise InputError("the table has no rows")
    values = [base64.b64encode(v).decode("ascii") if isinstance(v, (bytes, bytearray)) else v
              for v in table[INPUT_COLUMN].tolist()]
    return list(enumerate(values))


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


def format_record(record: dict) -> str:
    """One CSV line (no line break) for a record."""
    prediction = json.dumps(record["prediction"]) if record["prediction"] is not None else ""
    row = "" if record["row"] is None else record["row"]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([row, prediction, record["file"], record["error"] or ""])
    return buffer.getvalue()


def parse_record(line: str) -> dict:
    """The inverse of format_record (to read predictions.csv lines back)."""
    row, prediction, file, error = next(csv.reader([line]))
    return {"row": int(row) if row else None, "prediction": json.loads(prediction) if prediction else None,
            "file": file, "error": error or None}


def _score_chunk(chunk, records):
    """Score a chunk together; when it fails, score its images one by one so that only the bad
    ones get an error."""
    if len(chunk) > 1:
        try:
            for (index, _), prediction in zip(chunk, _predict([value for _, value in chunk])):
                records[index]["prediction"] = prediction
            return
        except Exception:
            pass
    for index, value in chunk:
        try:
            records[index]["prediction"] = _predict([value], row=records[index]["row"])[0]
        except Exception as err:
            records[index]["error"] = _problem(err)


def _predict(values, row=None) -> list[dict]:
    import pandas as pd

    from scoring.errors import InputError
    from scoring.request import image_value_problem

    for value in values:
        problem = image_value_problem(value)
        if problem:
            raise InputError(problem, row=row)
    frame = pd.DataFrame({"image": values}, index=[row] * len(values) if row is not None else None)
    return _state["model"].predict(frame, params=_state["params"]).to_dict(orient="records")


def _problem(err: Exception) -> str:
    """The message for an error record: input problems as they are, anything else with its type
    (and the traceback in the log, for whoever runs the job)."""
    from mlflow.exceptions import MlflowException

    from scoring.errors import InputError

    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, MlflowException) and err.get_http_status_code() == 400:
        return err.message
    if isinstance(err, OSError):
        return f"cannot read the file: {err.strerror or err}"
    logger.error("scoring failed:\n%s", "".join(traceback.format_exception(err)))
    return f"scoring failed: {type(err).__name__}: {err}"


def _record(file: str, row, error: str | None = None) -> dict:
    return {"row": row, "prediction": None, "file": file, "error": error}


def _file_name(path: str) -> str:
    root = _state.get("input_root")
    if root:
        try:
            return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    return os.path.basename(path)


def _online_script():
    """score.py from beside this file (Azure uploads both scripts in one code folder and may not
    put it on sys.path): one way to find and load the model for both endpoints."""
    name = "mmdet_mlflow_online_score"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("score.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]
