"""Writing files and folders so that a crash or a kill never leaves one half-written.

The one atomic writer of the project: write to a temporary file beside the target, flush and
fsync it, give it ordinary permissions (0644: these are results to share, while mkstemp makes
files 0600), rename it over the target and fsync the folder so the rename itself survives a
power cut. On any error the temporary file is removed. ``publishing`` does the same for a
whole folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

FILE_MODE = 0o644
DIR_MODE = 0o755


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new entry in ``folder`` durable (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then put it in place atomically.
    For writers that want a path (matplotlib, cv2, torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, document: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(document, indent=indent, default=str))


@contextlib.contextmanager
def publishing(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder aside and move it to ``target`` only when complete: never half-written.
    An existing ``target`` is replaced; an existing empty one (an Azure ML output mount) is
    filled entry by entry from a staging folder inside it."""
    target = Path(target)
    in_place = target.is_dir() and not any(target.iterdir())
    parent = target if in_place else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.partial-"))
    try:
        yield staging
        _share(staging)
        if in_place:
            for entry in staging.iterdir():
                os.replace(entry, target / entry.name)
            staging.rmdir()
            fsync_dir(target)
        else:
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            os.replace(staging, target)
            fsync_dir(parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _share(folder: Path) -> None:
    """fsync every file and give the tree ordinary permissions (mkdtemp makes it 0700)."""
    for root, dirs, files in os.walk(folder):
        os.chmod(root, DIR_MODE)
        for name in files:
            file = Path(root, name)
            if file.is_symlink():
                continue
            with open(file, "rb") as f:
                os.fsync(f.fileno())
            if file.stat().st_mode & 0o777 in (0o600, 0o700):
                os.chmod(file, FILE_MODE if file.stat().st_mode & 0o100 == 0 else DIR_MODE)
        fsync_dir(root)
