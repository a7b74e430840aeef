"""Checkpoints: where they come from (path, URL, ``official``), and reading them safely.

Weights are only ever read with ``torch.load(weights_only=True)``: a checkpoint that needs
arbitrary unpickling is refused, never loaded "just this once".
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re

import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from scoring import settings
from scoring.errors import MmdetMlflowError

OFFICIAL = "official"
OFFICIAL_HOST = "https://download.openmmlab.com/"
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth$")


class CheckpointError(MmdetMlflowError, ValueError):
    """A checkpoint that cannot be had, read safely, or does not fit its config."""


@dataclass(frozen=True)
class CheckpointSource:
    """Where a model's weights came from; recorded in the MLmodel."""

    checkpoint: str  # what the user passed: a path, a URL or "official"
    url: str | None
    sha256: str

    def as_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    root = settings.CACHE.value() or Path.home() / ".cache" / "mmdet-mlflow"
    return Path(root) / "checkpoints"


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def read_state_dict(path: Path) -> tuple[dict, dict]:
    """(state_dict, meta) from a plain state dict or an mmdet/mmengine checkpoint
    (``{"meta": ..., "state_dict": ...}``), loaded with ``weights_only=True``."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if not unsupported:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or "
                                  f"truncated?): {_first_line(err)}") from None
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors and plain containers "
            f"({unsupported.group(1)}), and we never unpickle those: they can run arbitrary code. "
            f"Save just the weights: torch.save({{'state_dict': model.state_dict()}}, path)") from None
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or "
                              f"truncated?): {type(err).__name__}: {_first_line(err)}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state_dict, meta = obj["state_dict"], obj.get("meta") or {}
    elif isinstance(obj, Mapping):
        state_dict, meta = obj, {}
    else:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    cleaned = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        cleaned[key.removeprefix("module.")] = value  # DDP-wrapped saves
    return cleaned, dict(meta) if isinstance(meta, Mapping) else {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def classes_from_meta(meta: Mapping) -> list[str] | None:
    dataset_meta = meta.get("dataset_meta") or {}
    classes = dataset_meta.get("classes") or meta.get("CLASSES")
    return [str(c) for c in classes] if classes else None


def check_state_dict(model, state_dict: Mapping, source: str) -> None:
    """Refuse a checkpoint that does not fit the model exactly, saying what is wrong."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(expected) & set(state_dict))
                  if state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    cls_key = next((k for k, _, _ in mismatched if "rtm_cls" in k), None)
    if cls_key:
        got, want = dict((k, (g, w)) for k, g, w in mismatched)[cls_key]
        problems.append(f"the checkpoint was trained for {got[0]} classes but the model is set up "
                        f"for {want[0]} (pass --classes matching the checkpoint)")
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape, e.g. " + "; ".join(
            f"{k}: checkpoint {g} vs model {w}" for k, g, w in mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} model tensors are missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors are not in the model, e.g. "
                        f"{', '.join(unexpected[:3])}")
    raise CheckpointError(f"checkpoint {source} does not match the config: " + "; ".join(problems))


def write_weights(state_dict: Mapping, path: Path) -> None:
    """Plain, contiguous CPU tensors: loadable with weights_only=True anywhere."""
    import torch

    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, path)


