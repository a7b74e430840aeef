"""Reading a torch model's weights safely, and checking that they fit its network: serving
reads ``weights.pth`` this way, and so does packaging (``mlflow_model.checkpoints``).

Weights are only ever read with ``torch.load(weights_only=True)``: a checkpoint that needs
arbitrary unpickling is refused, never loaded "just this once". torch is imported inside the
functions, so this module imports without it (an ONNX model's code never calls them).
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping

from scoring.errors import MmdetMlflowError


class CheckpointError(MmdetMlflowError, ValueError):
    """A checkpoint that cannot be had, read safely, or does not fit its config."""


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


def check_state_dict(model, state_dict: Mapping, source: str, family=None) -> None:
    """Refuse a checkpoint that does not fit the model exactly, saying what is wrong: with the
    model's family (``scoring.families``), a checkpoint of another class count or of another
    family is named as such."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(expected) & set(state_dict))
                  if state_dict[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if family is not None:
        problems.extend(_family_problems(model, state_dict, family))
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have the wrong shape, e.g. " + "; ".join(
            f"{k}: checkpoint {g} vs model {w}" for k, g, w in mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} model tensors are missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensors are not in the model, e.g. "
                        f"{', '.join(unexpected[:3])}")
    raise CheckpointError(f"checkpoint {source} does not match the config: " + "; ".join(problems))


def _family_problems(model, state_dict: Mapping, family) -> list[str]:
    """What a misfit means in words: another family's checkpoint, or another class count."""
    from scoring.families import NAMED

    # a family with keys of its own (RTMDet-Ins's mask kernels) is told apart from one that
    # shares its class layer (RTMDet)
    others = [f for f in NAMED if f is not family and f.claims(state_dict)]
    other = next((f for f in others if f.own_key), None) or (None if family.claims(state_dict)
                                                             else next(iter(others), None))
    if other is not None:
        return [f"it looks like a {other.title} checkpoint (it has {other.title}'s layers), "
                f"but the config is {family.title}'s"]
    got, want = family.class_count(state_dict), family.class_count(model.state_dict())
    if got is not None and got != want:
        return [f"the checkpoint was trained for {got} classes but the model is set up for {want} "
                f"(pass --classes matching the checkpoint)"]
    return []
