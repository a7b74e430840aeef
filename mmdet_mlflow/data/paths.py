"""Where an annotation's image reference points, and where it may point.

Resolving (against ``folder``, the folder of the annotation file that names the image; for an
MLTable, the folder of the JSONL file it reads):
- a relative path resolves against ``folder``; ``..`` is normalised away lexically (symlinks are
  left alone: an image folder is often a link to a mount);
- an absolute path or a ``file://`` URL is taken as it is;
- a datastore URI (``azureml://.../paths/fridge/images/1.jpg``, ``AmlDatastore://store/fridge/
  images/1.jpg``, any other ``scheme://`` URL) is never fetched: its path is looked up under
  ``folder``, longest suffix first (``fridge/images/1.jpg``, then ``images/1.jpg``, then
  ``1.jpg``); the first that exists wins, else the longest is reported missing.

What is allowed:
- a datastore URI always stays inside ``folder`` (it names a file of the mounted data, so a
  ``..`` that climbs out of it is refused);
- relative paths, absolute paths and ``file://`` URLs may point anywhere by default: local data
  is the user's own, and layouts such as ``../images/1.jpg`` are common. With
  ``confine=True`` (``--confine-images`` on the CLI; the Azure fine-tune component sets it, as
  data assets come from others) each must resolve inside ``folder`` too.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

from scoring.errors import MmdetMlflowError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class OutsideDataFolder(MmdetMlflowError, ValueError):
    """An image reference that resolves outside the folder it must stay in (the readers report
    it as one of a DataError's problems)."""


def image_path(value: str, folder: Path, confine: bool = False) -> Path:
    """An annotation's image reference -> an absolute local path (see the module docstring);
    raises ``OutsideDataFolder`` when the reference may not leave ``folder`` but does."""
    folder = Path(os.path.normpath(folder))
    if value.startswith("file://"):
        return _inside(Path(os.path.normpath(unquote(urlparse(value).path))), folder, confine, value)
    if _URI.match(value):
        return _inside(_datastore_path(value, folder), folder, True, value)
    path = Path(value).expanduser()
    # normpath, not resolve: "train/../images/1.jpg" -> "images/1.jpg", symlinks left alone
    return _inside(Path(os.path.normpath(path if path.is_absolute() else folder / path)), folder,
                   confine, value)


def _datastore_path(value: str, folder: Path) -> Path:
    remote = unquote(urlparse(value).path)
    if "/paths/" in remote:               # azureml://[...]/datastores/<store>/paths/<path>
        remote = remote.split("/paths/", 1)[1]
    parts = [p for p in remote.split("/") if p]
    candidates = [Path(os.path.normpath(folder.joinpath(*parts[i:]))) for i in range(len(parts))]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0] if candidates else folder


def _inside(path: Path, folder: Path, confine: bool, value: str) -> Path:
    if confine and not path.is_relative_to(folder):
        raise OutsideDataFolder(f"{value!r} resolves to {path}, outside the data folder {folder}")
    return path


def path_text(path: Path, relative_to: Path | None) -> str:
    """How a written file names an image: relative to ``relative_to`` when the image is below it,
    else absolute."""
    if relative_to is not None:
        try:
            return Path(os.path.relpath(path, relative_to)).as_posix() \
                if Path(path).resolve().is_relative_to(Path(relative_to).resolve()) else str(path)
        except ValueError:
            return str(path)
    return str(path)
