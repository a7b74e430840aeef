"""Pipeline job YAML: loaded with azure-ai-ml, components resolved from this repo, validated."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmdet_mlflow.azure_pipeline import PipelineError, load_pipeline

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_pipeline_loads_resolves_its_components_and_validates(path):
    job = load_pipeline(path)
    raw = yaml.safe_load(path.read_text())
    assert set(job.jobs) == set(raw["jobs"])
    for name, step in job.jobs.items():
        component_file = (path.parent / raw["jobs"][name]["component"]).resolve()
        assert component_file.is_file()
        spec = yaml.safe_load(component_file.read_text())
        # the SDK inlines a file component as an anonymous one: its command and inputs stay
        assert " ".join(step.component.command.split()) == " ".join(spec["command"].split())
        assert set(step.component.inputs) == set(spec["inputs"])


def test_the_main_pipeline_chains_finetune_evaluate_register_deploy():
    job = load_pipeline(ROOT / "pipelines" / "finetune-evaluate-deploy.yaml")
    raw = yaml.safe_load((ROOT / "pipelines" / "finetune-evaluate-deploy.yaml").read_text())["jobs"]
    assert raw["evaluate"]["inputs"]["mlflow_model"] == "${{parent.jobs.finetune.outputs.mlflow_model_folder}}"
    assert raw["register"]["inputs"]["model"] == "${{parent.jobs.finetune.outputs.mlflow_model_folder}}"
    for deploy in ("deploy_online", "deploy_batch"):
        assert raw[deploy]["inputs"]["registration_details"] == \
            "${{parent.jobs.register.outputs.registration_details}}"
    assert job.jobs["finetune"].distribution.type == "pytorch"
    # switches and compute are pipeline inputs
    for name in ("deploy_online", "deploy_batch", "compute_finetune", "instance_count"):
        assert name in job.inputs


def test_overrides_apply_and_bad_ones_are_clear():
    job = load_pipeline(ROOT / "pipelines" / "finetune-evaluate-deploy.yaml",
                        ["inputs.number_of_epochs=3", "inputs.deploy_batch=true"])
    assert job.inputs["number_of_epochs"]._data == 3
    with pytest.raises(PipelineError, match="KEY=VALUE"):
        load_pipeline(ROOT / "pipelines" / "batch-score.yaml", ["no-equals-sign"])


def test_submit_dry_run_prints_the_resolved_job():
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "pipeline", "submit",
                           "--dry-run", "--file", str(ROOT / "pipelines" / "finetune-evaluate-deploy.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = yaml.safe_load(done.stdout)
    assert printed["type"] == "pipeline"
    assert "mmdet_mlflow.cli finetune" in printed["jobs"]["finetune"]["component"]["command"]
