"""Session fixtures: one tiny RTMDet-Ins checkpoint in the official format, one packaged model
and a few test pictures, made once and shared (keeps the suite fast)."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
# Tests never write into the repository, and two runs at once must not share state: the MLflow
# store and the checkpoint cache of a run live in a scratch folder of its own.
SCRATCH = Path(tempfile.mkdtemp(prefix="mmdet-mlflow-tests-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(SCRATCH / "mlflow.db"))
os.environ.setdefault("MMDET_MLFLOW_CACHE", str(SCRATCH / "cache"))
# A sqlite tracking store keeps logged artifacts in ./mlruns of the working directory: the
# suite works from its scratch folder, so nothing lands in the checkout it was started in.
os.chdir(SCRATCH)

from helpers import OD_CLASSES, TINY, TINY_OD, make_official_checkpoint, scene_image, write_png  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_coco.pth")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    import mlflow_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    mlflow_model.save_model(path, TINY, str(tiny_checkpoint))
    return path


@pytest.fixture(scope="session")
def tiny_od_checkpoint(tmp_path_factory) -> Path:
    """An object-detection checkpoint (RTMDet tiny, boxes only) in the official format; seed 1:
    its untrained boxes survive NMS on the test pictures (seed 0's find none)."""
    return make_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "rtmdet_tiny.pth", TINY_OD,
                                    classes=OD_CLASSES, seed=1)


@pytest.fixture(scope="session")
def tiny_od_model_dir(tmp_path_factory, tiny_od_checkpoint) -> Path:
    """The object-detection checkpoint packaged as the instance-segmentation one is, for the
    surfaces that must serve either task."""
    import mlflow_model

    path = tmp_path_factory.mktemp("models") / "tiny-od"
    mlflow_model.save_model(path, TINY_OD, str(tiny_od_checkpoint))
    return path


@pytest.fixture(scope="session")
def tiny_onnx_model_dir(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny model's weights packaged for the ONNX Runtime runtime."""
    import mlflow_model

    path = tmp_path_factory.mktemp("models") / "tiny-onnx"
    mlflow_model.save_model(path, TINY, str(tiny_checkpoint), runtime="onnx")
    return path


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> list[Path]:
    """Two PNGs of different sizes and aspect ratios (lossless: exact pixels everywhere)."""
    folder = tmp_path_factory.mktemp("images")
    return [write_png(folder / "scene0.png", scene_image(320, 240, 0)),
            write_png(folder / "scene1.png", scene_image(200, 300, 1))]


@pytest.fixture(scope="module")
def tiny_pyfunc(tiny_model_dir):
    """The tiny torch model loaded as MLflow loads it (mlflow.pyfunc.load_model)."""
    import mlflow

    return mlflow.pyfunc.load_model(str(tiny_model_dir))
