"""The project's own files agree with the one list of pins."""
from __future__ import annotations

from pathlib import Path

import yaml

import mlflow_model

ROOT = Path(__file__).resolve().parent.parent


def test_conda_yaml_pins_the_same_stack_as_make_setup():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert pip_section == mlflow_model.pinned_requirements()
    assert "python=3.11" in conda["dependencies"]


def test_dev_requirements_build_on_the_pins():
    lines = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r mlflow_model/requirements.txt" in lines


def test_setup_script_checks_mmcv_ops():
    script = (ROOT / "tools" / "setup_venv.sh").read_text()
    assert "import mmcv._ext" in script and "--no-build-isolation" in script
