"""The training checkpoints mmengine writes into ``output/checkpoints``: which one to resume
from, and which one holds the weights to export."""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from mmdet_mlflow.training.settings import FinetuneError


def load_training_checkpoint(path: Path) -> dict:
    """One of our training checkpoints: plain tensors and containers only (see
    runner.PlainResumeStateHook), so weights_only=True reads it as it is."""
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint to resume from: the one mmengine's ``last_checkpoint`` names, unless that
    is missing or truncated (killed while writing), then the newest complete one."""
    if not work_dir.is_dir():
        return None
    named = None
    pointer = work_dir / "last_checkpoint"
    if pointer.is_file():
        text = pointer.read_text().strip()
        named = Path(text) if text else None
    candidates = sorted((p for p in work_dir.glob("*.pth") if not p.name.startswith("best_")),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    if named is not None and named.is_file():
        candidates.insert(0, named)
    for path in candidates:
        if zipfile.is_zipfile(path):  # torch.save's zip: truncated files lack the central directory
            return path
    return None


def best_checkpoint(runner, epochs: list[dict], metric: str) -> tuple[Path, dict | None]:
    """The checkpoint with the best validation ``metric`` (mmengine's save_best) and its epoch's
    metrics, else the last checkpoint and epoch."""
    best = runner.message_hub.get_info("best_ckpt")
    scored = [e for e in epochs if e.get(metric) is not None]
    best_epoch = max(scored, key=lambda e: e[metric]) if scored else None
    if best and Path(best).is_file():
        return Path(best), best_epoch
    last = latest_checkpoint(Path(runner.work_dir))
    if last is None:
        raise FinetuneError(f"training wrote no checkpoint under {runner.work_dir}")
    return last, epochs[-1] if epochs else None
