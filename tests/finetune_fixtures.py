"""Fixtures the fine-tuning tests share: import them into a test module to use them (a module
apart from helpers.py, which processes in models' own lean environments import, without pytest)."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from more threads, and on a shared machine several OpenMP
    threads waiting for each other make each step many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fridge(tmp_path_factory) -> Path:
    """A small synthetic fridge set: 8 training and 2 validation pictures."""
    from mmdet_mlflow.synth import generate

    folder = tmp_path_factory.mktemp("fridge")
    generate(folder, num_images=10, seed=3, progress=False)
    return folder
