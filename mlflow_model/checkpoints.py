"""Checkpoints: where they come from (path, URL, ``official``: downloaded, hash-checked and
cached), and writing a model's weights. Reading them safely is ``scoring.weights``' (serving
reads them too): weights are only ever read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from scoring import settings
from scoring.model_dir import sha256_of
from scoring.weights import CheckpointError

OFFICIAL = "official"
OFFICIAL_HOST = "https://download.openmmlab.com/"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")


@dataclass(frozen=True)
class CheckpointSource:
    """Where a model's weights came from; recorded in the MLmodel."""

    checkpoint: str  # what the user passed: a path, a URL or "official"
    url: str | None
    sha256: str

    def as_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    return settings.cache_root() / "checkpoints"


def resolve_checkpoint(checkpoint: str | Path, config_name: str | None = None) -> tuple[Path, CheckpointSource]:
    """A local file for ``checkpoint`` (a path, an http(s) URL, or ``official`` for the
    published COCO weights of ``config_name``), downloaded and hash-checked when needed."""
    text = str(checkpoint)
    if text == OFFICIAL:
        from mlflow_model.configs import official_checkpoint

        if not config_name:
            raise CheckpointError("--checkpoint official needs a config name")
        published = official_checkpoint(config_name)
        url = published.url
        # A mirror (an internal artifact store, a local server) laid out as the official host.
        mirror = settings.CHECKPOINT_MIRROR.value()
        if mirror and url.startswith(OFFICIAL_HOST):
            url = mirror.rstrip("/") + "/" + url[len(OFFICIAL_HOST):]
        path = download(url, expected_sha256_prefix=published.sha256_prefix)
        return path, CheckpointSource(text, published.url, sha256_of(path))
    if re.match(r"^https?://", text, re.IGNORECASE):
        match = _HASH_IN_NAME.search(text.split("?")[0])
        path = download(text, expected_sha256_prefix=match.group(1) if match else None)
        return path, CheckpointSource(text, text, sha256_of(path))
    path = Path(text).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {text!r} is not a file, an http(s) URL or 'official'")
    return path.resolve(), CheckpointSource(text, None, sha256_of(path))


def download(url: str, expected_sha256_prefix: str | None = None) -> Path:
    """Download into the cache (once), checking the sha256 against the hash prefix in the file
    name when there is one. A partial or mismatched download never lands in the cache."""
    name = Path(url.split("?")[0]).name or "checkpoint.pth"
    # Keyed by the whole URL: two URLs ending in the same file name (best.pth) must not collide.
    target = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.is_file() and (expected_sha256_prefix is None
                             or sha256_of(target).startswith(expected_sha256_prefix)):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers={"User-Agent": "mmdet-mlflow"}),
            timeout=settings.DOWNLOAD_TIMEOUT.value())
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise CheckpointError(
            f"could not download {url}: {reason}. Without network access, download the file "
            f"elsewhere and pass --checkpoint PATH, or point {settings.CHECKPOINT_MIRROR.env} at a mirror."
        ) from None
    digest = hashlib.sha256()
    total = int(response.headers.get("Content-Length") or 0)
    with response, tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as tmp:
        try:
            from tqdm import tqdm

            with tqdm(total=total or None, unit="B", unit_scale=True, desc=f"downloading {name}",
                      file=sys.stderr, disable=None) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    tmp.write(block)
                    digest.update(block)
                    bar.update(len(block))
        except BaseException:
            os.unlink(tmp.name)
            raise
    actual = digest.hexdigest()
    if expected_sha256_prefix and not actual.startswith(expected_sha256_prefix):
        os.unlink(tmp.name)
        raise CheckpointError(
            f"{url} has sha256 {actual}, which does not start with {expected_sha256_prefix} as its "
            f"name says: a corrupt or tampered download; nothing was cached")
    os.replace(tmp.name, target)
    return target


def classes_from_meta(meta: Mapping) -> list[str] | None:
    dataset_meta = meta.get("dataset_meta") or {}
    classes = dataset_meta.get("classes") or meta.get("CLASSES")
    return [str(c) for c in classes] if classes else None


def write_weights(state_dict: Mapping, path: Path) -> None:
    """Plain, contiguous CPU tensors: loadable with weights_only=True anywhere."""
    import torch

    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path)


