"""The project's own files agree with the one list of pins, the environment `make setup`
builds is the one they describe, and its text speaks of the code, not of its history."""
from __future__ import annotations

import re
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


# The word issue (or issues) followed by a number, with a space, a hyphen (a branch name) or a
# "#" between; or "#" and a number on its own. Not a "#" after a word (a file named "hash#1.png")
# nor a colour (digits followed by letters).
ISSUE_REFERENCE = re.compile(r"\bissues?[ -]?#?\d+\b|(?<![\w&#/])#\d{1,4}\b", re.IGNORECASE)
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ".ini", ".json"}
TEXT_NAMES = {"Makefile", "MLproject"}
# Copies of other people's files, kept as they are.
NOT_OURS = {Path("tests/assets")}


def test_no_file_cites_an_issue_number():
    """Code, messages, help, test names and docs say why, in words a reader without our tracker
    can follow, not by the number of the issue that asked for it."""
    word, sign = "iss" + "ue", "#"  # spelt apart so that this file passes its own check
    cited = [f"{word} 12", f"{word.title()} {sign}20's rule", f"{word}s 19 and 20", f"branch {word}-19",
             f"see {sign}12"]
    assert all(ISSUE_REFERENCE.search(text) for text in cited)
    assert not any(ISSUE_REFERENCE.search(text) for text in ["hash#1.png", "color #1f77b4", "&#39;", "tissue 3"])
    found = []
    for path in sorted(ROOT.rglob("*")):
        relative = path.relative_to(ROOT)
        if (not path.is_file() or relative.parts[0].startswith(".")
                or relative.parts[0] in {"outputs", "data", "runs", "models", "mlruns"}
                or "__pycache__" in relative.parts or ".egg-info" in str(relative)
                or any(relative.is_relative_to(skipped) for skipped in NOT_OURS)
                or (path.suffix not in TEXT_SUFFIXES and path.name not in TEXT_NAMES)):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if ISSUE_REFERENCE.search(line):
                found.append(f"{relative}:{number}: {line.strip()[:120]}")
    assert not found, "issue numbers cited:\n" + "\n".join(found)
