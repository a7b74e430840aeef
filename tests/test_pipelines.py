"""Pipeline job YAML: loaded with azure-ai-ml, components resolved from this repo, validated."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmdet_mlflow.azure.pipeline import PipelineError, load_pipeline

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


def data_flow(job) -> dict[tuple[str, str], tuple[str, str]]:
    """(consuming step, input) -> (producing step, output), as the SDK resolved the job."""
    flow = {}
    for name, step in job.jobs.items():
        for input_name, node_input in step.inputs.items():
            source = re.fullmatch(r"\$\{\{parent\.jobs\.(\w+)\.outputs\.(\w+)\}\}", str(node_input._data))
            if source:
                flow[(name, input_name)] = source.groups()
    return flow


def test_the_main_pipeline_chains_finetune_evaluate_register_deploy():
    job = load_pipeline(ROOT / "pipelines" / "finetune-evaluate-deploy.yaml")
    flow = data_flow(job)
    assert flow == {
        ("evaluate", "mlflow_model"): ("finetune", "mlflow_model_folder"),
        ("register", "model"): ("finetune", "mlflow_model_folder"),
        ("deploy_online", "registration_details"): ("register", "registration_details"),
        ("deploy_batch", "registration_details"): ("register", "registration_details"),
    }
    for (step, input_name), (source, output) in flow.items():  # what flows is what is expected
        assert job.jobs[source].component.outputs[output].type == \
            job.jobs[step].component.inputs[input_name].type, (step, input_name)
    assert job.jobs["finetune"].distribution.type == "pytorch"
    # switches and compute are pipeline inputs
    for name in ("deploy_online", "deploy_batch", "compute_finetune", "instance_count"):
        assert name in job.inputs
    # the runtime is chosen once, for the fine-tune's export (what evaluate, register and the
    # deployments then take), and an ONNX model can go online without an environment
    assert job.inputs["runtime"]._data == "torch" and job.inputs["online_no_code"]._data is False
    assert job.jobs["finetune"].inputs["runtime"]._data == "${{parent.inputs.runtime}}"
    assert job.jobs["deploy_online"].inputs["no_code"]._data == "${{parent.inputs.online_no_code}}"


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
    # every step's component is inlined: its command is the one of its spec file
    from azure.ai.ml import load_component

    raw = yaml.safe_load((ROOT / "pipelines" / "finetune-evaluate-deploy.yaml").read_text())["jobs"]
    for name, step in printed["jobs"].items():
        spec = load_component(ROOT / "pipelines" / raw[name]["component"])
        assert " ".join(step["component"]["command"].split()) == " ".join(spec.command.split())
