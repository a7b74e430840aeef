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
# `make test` runs the files in parallel (pytest-xdist), a worker per core. Each worker, and every
# server or job it starts, gets its share of the cores for torch's OpenMP threads (set before
# torch is imported): two workers' threads waiting on each other on the same cores made each
# forward pass many times slower, and a served request miss its deadline. A value the user set wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
sys.path.insert(0, str(ROOT / "tests"))
# Tests never write into the repository, and two runs at once must not share state: the MLflow
# store and the checkpoint cache of a run live in a scratch folder of its own. So does each worker
# of a parallel run (pytest-xdist): a worker inherits its parent's environment, so what the parent
# set here (marked by SCRATCH_VARIABLE) is replaced, while what the user set is kept.
SCRATCH = Path(tempfile.mkdtemp(prefix="mmdet-mlflow-tests-"))
SCRATCH_VARIABLE = "MMDET_MLFLOW_TESTS_SCRATCH"
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
_parents_scratch = os.environ.get(SCRATCH_VARIABLE)
# Spark's local driver JVMs, of which the Spark tests start several, live for seconds. The JVM's
# defaults tune for a long-lived server (two JIT compilers, a parallel collector); every test JVM
# gets the options the Spark fast start gives a local driver (the first compiler alone, the serial
# collector), which spend far less CPU on a 2-core machine (docs/architecture.md, "Where the
# suite's time goes"). Only the `java` launcher reads JDK_JAVA_OPTIONS: jcmd, which writes the
# fast start's archive, does not. The JVMs' temporary files (Spark's block manager and artifact
# folders, which a killed JVM leaves behind) go to the scratch folder too.
from mmdet_mlflow.spark_jvm import DRIVER_OPTIONS  # noqa: E402  (light: no torch, no pyspark)

_JVM_OPTIONS = " ".join([*DRIVER_OPTIONS, f"-Djava.io.tmpdir={SCRATCH}"])
for _variable, _value in {"MLFLOW_TRACKING_URI": "sqlite:///" + str(SCRATCH / "mlflow.db"),
                          "MMDET_MLFLOW_CACHE": str(SCRATCH / "cache"),
                          "SPARK_LOCAL_DIRS": str(SCRATCH),
                          # Hypothesis's example database and the constants it collects from our
                          # modules would otherwise go to .hypothesis/ in the folder pytest started in
                          "HYPOTHESIS_STORAGE_DIRECTORY": str(SCRATCH / "hypothesis"),
                          "JDK_JAVA_OPTIONS": _JVM_OPTIONS}.items():
    if _variable not in os.environ or (_parents_scratch and _parents_scratch in os.environ[_variable]):
        os.environ[_variable] = _value
os.environ[SCRATCH_VARIABLE] = str(SCRATCH)

from helpers import (OD_CLASSES, TINY, TINY_OD, TINY_TEST_SCALE, config_with_test_scale,  # noqa: E402
                     make_official_checkpoint, scene_image, write_png)


# The files that take longest, in the order a parallel run starts them (each file runs on one
# worker, `--dist loadfile`): started first, they do not leave one worker busy at the end while the
# others wait. An order, not a measurement: `pytest --durations=0` says what is slow now; a file
# not named here starts after these, in pytest's order.
SLOW_FILES_FIRST = ("test_hostile.py", "test_spark.py", "test_onnx_runtime.py", "test_finetune.py",
                    "test_evaluate.py", "test_onnx_model.py", "test_families.py", "test_answer_formats.py",
                    "test_demo.py", "test_readme.py", "test_cli.py", "test_openvino_runtime.py",
                    "test_onnx_families.py", "test_tiling.py", "test_tiled_validation.py", "test_faults.py",
                    "test_load.py", "test_azure_yaml.py", "test_work_limits.py", "test_finetune_precision.py")


@pytest.hookimpl(trylast=True)  # after pytest has grouped each file's tests by their fixtures
def pytest_collection_modifyitems(items):
    rank = {name: at for at, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


@pytest.fixture(scope="session", autouse=True)
def work_in_scratch():
    """A sqlite tracking store keeps logged artifacts in ./mlruns of the working directory: the
    tests work from their scratch folder, so nothing lands in the checkout they were started in.
    (A fixture, not an import-time chdir: the workers of a parallel run start in the folder their
    parent was started in, where the paths it was given are.)"""
    started_in = os.getcwd()
    os.chdir(SCRATCH)
    yield
    os.chdir(started_in)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_official_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_coco.pth")


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    """The tiny RTMDet-Ins config at TINY_TEST_SCALE, as a config file of the same name."""
    return config_with_test_scale(TINY, tmp_path_factory.mktemp("config"), TINY_TEST_SCALE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_config, tiny_checkpoint) -> Path:
    import mlflow_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    mlflow_model.save_model(path, str(tiny_config), str(tiny_checkpoint))
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
def tiny_onnx_model_dir(tmp_path_factory, tiny_config, tiny_checkpoint) -> Path:
    """The tiny model's weights packaged for the ONNX Runtime runtime."""
    import mlflow_model

    path = tmp_path_factory.mktemp("models") / "tiny-onnx"
    mlflow_model.save_model(path, str(tiny_config), str(tiny_checkpoint), runtime="onnx")
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
