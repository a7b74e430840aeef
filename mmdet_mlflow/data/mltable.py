"""MLTable folders (Azure ML's table definition) that read AutoML JSON lines files."""
from __future__ import annotations

import os
from pathlib import Path

from mmdet_mlflow.data.paths import OutsideDataFolder, image_path
from mmdet_mlflow.data.problems import DataError
from mmdet_mlflow.files import atomic_write_text

MLTABLE_FILE = "MLTable"


def is_mltable(path: Path) -> bool:
    return path.is_dir() or path.name == MLTABLE_FILE


def mltable_jsonl_paths(path: Path) -> list[Path]:
    """The JSONL files an MLTable reads (``paths``: file / folder / pattern entries)."""
    import yaml

    table = path / MLTABLE_FILE if path.is_dir() else path
    folder = table.parent
    if not table.is_file():
        raise DataError(f"{folder}: folder has no {MLTABLE_FILE} file (expected an MLTable folder)")
    try:
        spec = yaml.safe_load(table.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{table}: not valid YAML: {err}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("paths"), list) or not spec["paths"]:
        raise DataError(f"{table}: paths: missing or empty (expected '- file: ./train.jsonl')")
    transformations = spec.get("transformations") or []
    kinds = [next(iter(t)) if isinstance(t, dict) else t for t in transformations]
    if "read_json_lines" not in kinds:
        raise DataError(f"{table}: transformations: no read_json_lines (only JSON lines MLTables "
                        f"hold image annotations), found {kinds or 'none'}")
    files: list[Path] = []
    for i, entry in enumerate(spec["paths"]):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise DataError(f"{table}: paths[{i}]: expected one of file/folder/pattern, got {entry!r}")
        kind, value = next(iter(entry.items()))
        try:
            local = image_path(str(value), folder)
        except OutsideDataFolder as err:
            raise DataError(f"{table}: paths[{i}]: {err}") from None
        if kind == "file":
            files.append(local)
        elif kind == "folder":
            files.extend(sorted(local.glob("*.jsonl")))
        elif kind == "pattern":
            files.extend(sorted(folder.glob(str(value))) if not Path(str(value)).is_absolute()
                         else sorted(Path("/").glob(str(value).lstrip("/"))))
        else:
            raise DataError(f"{table}: paths[{i}]: unknown kind {kind!r} (file, folder or pattern)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{table}: paths: " + (f"file not found: {', '.join(missing)}" if missing
                                                 else "matches no JSONL file"))
    return files


def write_mltable(folder, jsonl_path) -> Path:
    """An MLTable folder reading ``jsonl_path`` (referenced relative to the folder) the way
    Azure AutoML expects: read_json_lines, image_url as a stream column."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    relative = Path(os.path.relpath(Path(jsonl_path).absolute(), folder)).as_posix()
    if not relative.startswith("."):
        relative = "./" + relative
    text = ("type: mltable\n"
            "paths:\n"
            f"  - file: {relative}\n"
            "transformations:\n"
            "  - read_json_lines:\n"
            "      encoding: utf8\n"
            "      invalid_lines: error\n"
            "      include_path_column: false\n"
            "  - convert_column_types:\n"
            "      - columns: image_url\n"
            "        column_type: stream_info\n")
    atomic_write_text(folder / MLTABLE_FILE, text)
    return folder
