"""A model's runtime options as MLflow's ``model_config``: recorded in the MLmodel, passed at
load by ``mlflow.pyfunc.load_model``, ``spark_udf`` and the Azure scripts, with the
``MMDET_MLFLOW_*`` variables as the fallback, in the one order scoring.settings documents.
And model.json as the one record of what a model is, models saved the old way included."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException

import mlflow_model
from helpers import TINY, b64
from scoring import settings
from scoring.model_dir import ModelDir


def _two_rows(image_files) -> pd.DataFrame:
    return pd.DataFrame({"image": [b64(image_files[0]), b64(image_files[1])]})


def _load(model_dir, model_config=None):
    import mlflow

    return mlflow.pyfunc.load_model(str(model_dir), model_config=model_config)


@pytest.fixture(scope="module")
def recorded_model_dir(tmp_path_factory, tiny_checkpoint):
    """The tiny model saved with model_config values of its own, recorded in its MLmodel."""
    path = tmp_path_factory.mktemp("models") / "tiny-configured"
    mlflow_model.save_model(path, TINY, str(tiny_checkpoint),
                            model_config={"batch_size": 2, "max_rows": 1})
    return path


@pytest.fixture
def no_settings(monkeypatch):
    for setting in settings.SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", raising=False)
    return monkeypatch


def test_the_mlmodel_records_every_key_unset_unless_the_packager_set_it(tiny_model_dir,
                                                                         recorded_model_dir):
    def recorded(model_dir):
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        return mlmodel["flavors"]["python_function"]["config"]

    assert recorded(tiny_model_dir) == {key: None for key in settings.MODEL_CONFIG_KEYS}
    assert recorded(recorded_model_dir) == {**{key: None for key in settings.MODEL_CONFIG_KEYS},
                                            "batch_size": 2, "max_rows": 1}


def test_model_config_at_load_changes_what_the_model_does(tiny_model_dir, image_files, no_settings):
    model = _load(tiny_model_dir, {"max_rows": 1, "batch_size": 3})
    assert model.get_raw_model().batch_size == 3
    with pytest.raises(MlflowException, match="model_config max_rows"):
        model.predict(_two_rows(image_files))
    assert len(_load(tiny_model_dir).predict(_two_rows(image_files))) == 2


def test_two_models_in_one_process_keep_their_own_config(tiny_model_dir, image_files, no_settings):
    limited = _load(tiny_model_dir, {"max_rows": 1, "batch_size": 2})
    small_images = _load(tiny_model_dir, {"max_image_pixels": 10})
    assert limited.get_raw_model() is not small_images.get_raw_model()
    for _ in range(2):  # alternately: neither call leaves its config behind for the other
        with pytest.raises(MlflowException, match="model_config max_rows"):
            limited.predict(_two_rows(image_files))
        assert len(limited.predict(_two_rows(image_files)[:1])) == 1
        with pytest.raises(MlflowException, match="model_config max_image_pixels"):
            small_images.predict(_two_rows(image_files)[:1])
    assert (limited.get_raw_model().batch_size, small_images.get_raw_model().batch_size) == (2, 1)
    assert settings.MAX_ROWS.value() == 64 and settings.MAX_IMAGE_PIXELS.value() == 50_000_000


def _batches_and_refuses_two_rows(model, batch_size: int, limit_named: str, image_files) -> None:
    assert model.get_raw_model().batch_size == batch_size
    with pytest.raises(MlflowException, match=limit_named):
        model.predict(_two_rows(image_files))


def _batches_and_answers_two_rows(model, batch_size: int, image_files) -> None:
    assert model.get_raw_model().batch_size == batch_size
    assert len(model.predict(_two_rows(image_files))) == 2


def test_the_environment_is_the_fallback_for_keys_the_config_leaves_unset(tiny_model_dir, image_files,
                                                                          no_settings):
    no_settings.setenv(settings.MAX_ROWS.env, "1")
    no_settings.setenv(settings.BATCH_SIZE.env, "4")
    _batches_and_refuses_two_rows(_load(tiny_model_dir), 4, "MMDET_MLFLOW_MAX_ROWS", image_files)
    # load beats environment
    _batches_and_answers_two_rows(_load(tiny_model_dir, {"max_rows": 2, "batch_size": 3}), 3, image_files)


def test_precedence_load_then_recorded_then_environment(recorded_model_dir, image_files, no_settings):
    no_settings.setenv(settings.BATCH_SIZE.env, "4")
    no_settings.setenv(settings.MAX_ROWS.env, "5")
    # what the MLmodel records beats the environment
    _batches_and_refuses_two_rows(_load(recorded_model_dir), 2, "model_config max_rows", image_files)
    # load beats both
    _batches_and_answers_two_rows(_load(recorded_model_dir, {"batch_size": 3, "max_rows": 2}), 3,
                                  image_files)
    # MLflow's own variable for servers that cannot pass model_config (mlflow models serve)
    no_settings.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"batch_size": 5}))
    assert _load(recorded_model_dir).get_raw_model().batch_size == 5


def test_unknown_keys_and_bad_values_are_refused_naming_the_keys(tiny_model_dir, tmp_path,
                                                                tiny_checkpoint):
    data = ModelDir(tiny_model_dir).data.path
    with pytest.raises(settings.SettingError, match="unknown model_config key 'batchsize'; the keys "
                                                    "are: device, batch_size, precision"):
        mlflow_model._load_pyfunc(str(data), {"batchsize": 2})
    with pytest.raises(settings.SettingError, match="model_config max_rows='many' is not valid"):
        mlflow_model._load_pyfunc(str(data), {"max_rows": "many"})
    with pytest.raises(mlflow_model.SaveModelError, match="unknown model_config key 'rows'.*max_rows"):
        mlflow_model.save_model(tmp_path / "m", TINY, str(tiny_checkpoint), model_config={"rows": 1})
    assert not (tmp_path / "m").exists()


def test_the_azure_scripts_take_model_config_and_mlflows_variable(tiny_model_dir, image_files,
                                                                 no_settings):
    from scoring.azureml import batch_score

    batch_score.init(model_dir=str(tiny_model_dir), model_config={"batch_size": 2})
    assert batch_score._state["predictor"].batch_size == 2
    no_settings.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"max_image_pixels": 10}))
    batch_score.init(model_dir=str(tiny_model_dir))  # as a deployment's variable sets it
    (record,) = batch_score.score_files([str(image_files[0])])
    assert "model_config max_image_pixels" in record["error"]



def test_our_commands_load_a_model_with_the_config_mlflow_would_give_it(recorded_model_dir, tmp_path,
                                                                      tiny_checkpoint, image_files,
                                                                      no_settings):
    """predict, batch and evaluate load a saved model as ``mlflow.pyfunc.load_model`` does: what
    its MLmodel records over the environment, MLflow's variable over that."""
    import subprocess
    import sys

    import mlflow.pyfunc

    assert mlflow_model.PYFUNC_MODEL_CONFIG_KEY == mlflow.pyfunc.MODEL_CONFIG  # read without MLflow
    no_settings.setenv(settings.BATCH_SIZE.env, "4")
    assert mlflow_model.load_saved_predictor(recorded_model_dir).batch_size == 2
    no_settings.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"batch_size": 5}))
    assert mlflow_model.load_saved_predictor(recorded_model_dir).batch_size == 5
    assert _load(recorded_model_dir).get_raw_model().batch_size == 5
    no_settings.delenv("MLFLOW_PYFUNC_INFERENCE_CONFIG")

    model = tmp_path / "small-pictures-only"
    mlflow_model.save_model(model, TINY, str(tiny_checkpoint), model_config={"max_image_pixels": 10})
    for command in ("predict", "batch"):
        out = tmp_path / f"{command}.jsonl"
        done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", command, "--model", str(model),
                               "--input", str(image_files[0]), "--output", str(out)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 1, done.stderr[-2000:]
        (line,) = [json.loads(text) for text in out.read_text().splitlines()]
        assert "model_config max_image_pixels" in line["error"], line

@pytest.fixture(scope="module")
def old_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model as models were saved before model.json became the one record: the mmdet
    flavor also holding runtime, task, classes, config name, checkpoint and versions, and no
    model_config in the MLmodel."""
    path = tmp_path_factory.mktemp("models") / "tiny-old"
    shutil.copytree(tiny_model_dir, path)
    info = ModelDir(path).read_info()
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    del mlmodel["flavors"]["python_function"]["config"]
    old_flavor = {key: value for key, value in mlmodel["flavors"]["mmdet"].items() if key != "info"}
    mlmodel["flavors"]["mmdet"] = {**old_flavor, "runtime": info["runtime"], "task": info["task"],
                                   "classes": info["classes"], "config_name": info["config_name"],
                                   "checkpoint": info["checkpoint"], **info["versions"]}
    mlmodel["metadata"].update(config_name=info["config_name"],
                               checkpoint_sha256=info["checkpoint"]["sha256"])
    (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    return path


def test_a_model_saved_the_old_way_loads_and_takes_the_environment(old_model_dir, tiny_model_dir,
                                                                  image_files, no_settings):
    frame = _two_rows(image_files)
    expected = _load(tiny_model_dir).predict(frame)
    old = _load(old_model_dir)
    pd.testing.assert_frame_equal(old.predict(frame), expected)
    assert ModelDir(old_model_dir).read_info()["classes"][0] == "person"
    assert type(mlflow_model.load_model(str(old_model_dir))).__name__ == "RTMDet"
    no_settings.setenv(settings.MAX_ROWS.env, "1")
    with pytest.raises(MlflowException, match="MMDET_MLFLOW_MAX_ROWS"):
        _load(old_model_dir).predict(frame)
