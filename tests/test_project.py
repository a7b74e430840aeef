"""The project's own files agree with the one list of pins, and the environment `make setup`
builds is the one they describe."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement

import mlflow_model

ROOT = Path(__file__).resolve().parent.parent


def test_conda_yaml_pins_the_same_stack_as_make_setup():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert pip_section == mlflow_model.pinned_requirements()
    assert "python=3.11" in conda["dependencies"]


def test_the_environment_has_every_pinned_version():
    """`make setup` installs requirements-dev.txt, which builds on the pins: every pinned
    package is installed at its pinned version (torch's +cpu build satisfies ==2.13.0)."""
    wrong = {}
    for line in mlflow_model.pinned_requirements():
        requirement = Requirement(line)
        installed = metadata.version(requirement.name)
        if not requirement.specifier.contains(installed, prereleases=True):
            wrong[requirement.name] = installed
    assert not wrong, f"installed versions that are not the pinned ones: {wrong}"


def test_mmcv_has_its_compiled_ops():
    """The setup builds mmcv with its ops (RTMDet-Ins needs them): they import and run."""
    check = ("import torch\n"
             "from mmcv.ops import nms\n"
             "boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])\n"
             "_, keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)\n"
             "print(sorted(keep.tolist()))\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "[0, 2]"
