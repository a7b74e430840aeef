"""Every Azure ML YAML in the repo, and what `mmdet-mlflow deploy --dry-run` writes, loaded with
azure-ai-ml's own loaders (strict schemas: an unknown or mistyped field fails); every
component's command parses with the CLI; the generated files follow the pins; --dry-run
contacts nothing."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmdet_mlflow.azure import deploy, deployment_settings, environment, generate
from mmdet_mlflow.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "outputs", "node_modules", "mlruns", ".pytest_cache"}

CONNECTS: list = []


def _audit(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        CONNECTS.append((event, args[1] if event == "socket.connect" else args[0]))


sys.addaudithook(_audit)


def _loaders():
    from azure.ai.ml import (load_batch_endpoint, load_component, load_environment, load_job,
                             load_online_deployment, load_online_endpoint)
    # the SDK's loader for `type: model` batch deployments (the schema `az ml batch-deployment`
    # takes with a `settings:` block); load_batch_deployment reads the older flat schema
    from azure.ai.ml.entities._load_functions import load_model_batch_deployment

    return {
        "environment": load_environment,
        "commandComponent": load_component,
        "pipelineComponent": load_component,
        "sparkComponent": load_component,
        "managedOnlineEndpoint": load_online_endpoint,
        "managedOnlineDeployment": load_online_deployment,
        "batchEndpoint": load_batch_endpoint,
        "modelBatchDeployment": load_model_batch_deployment,
        "pipelineJob": load_job,
        "commandJob": load_job,
    }


def load_azure_yaml(path: Path):
    """Load ``path`` with the loader its $schema names; a conda file is checked as one."""
    data = yaml.safe_load(path.read_text())
    schema = (data or {}).get("$schema", "")
    match = re.search(r"/latest/(\w+)\.schema\.json$", schema)
    if match is None:
        assert {"dependencies"} <= set(data or {}), f"{path}: neither an Azure ML YAML ($schema) nor a conda file"
        assert any(isinstance(d, dict) and "pip" in d for d in data["dependencies"]), path
        return data
    loader = _loaders().get(match.group(1))
    assert loader is not None, f"{path}: no loader for schema {match.group(1)}"
    return loader(path)


def repo_yaml_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.y*ml")
                  if p.suffix in (".yml", ".yaml") and not SKIP_DIRS & set(p.relative_to(ROOT).parts)
                  and p.relative_to(ROOT).parts[0] in ("components", "pipelines"))


def test_the_repo_has_the_azure_yaml_we_expect():
    names = {p.relative_to(ROOT).as_posix() for p in repo_yaml_files()}
    assert {"components/environment/environment.yml", "components/environment/deploy-conda.yaml",
            "components/deploy_online/spec.yaml", "components/deploy_online/online-endpoint.yml",
            "components/deploy_online/online-deployment.yml", "components/deploy_batch/spec.yaml",
            "components/deploy_batch/batch-endpoint.yml",
            "components/deploy_batch/batch-deployment.yml"} <= names


@pytest.mark.parametrize("path", repo_yaml_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_repo_yaml_loads_with_azure_ai_ml(path):
    """Loaded by the loader its $schema names, the entity keeps the YAML's name (or, for a
    conda file, its pip dependencies), so nothing was dropped on the way."""
    data = yaml.safe_load(path.read_text())
    loaded = load_azure_yaml(path)
    if isinstance(loaded, dict):  # a conda file
        assert loaded["dependencies"] == data["dependencies"]
    elif "name" in data:
        assert loaded.name == data["name"], path
    else:  # a pipeline job: its YAML names its jobs instead
        assert set(loaded.jobs) == set(data["jobs"]), path


def test_the_loaders_are_strict(tmp_path):
    """A misspelt field or a wrong type fails: loading is a real schema check."""
    from marshmallow.exceptions import ValidationError

    source = (ROOT / "components/deploy_online/online-deployment.yml").read_text()
    for broken in (source.replace("instance_count: 1", "instance_cont: 1"),
                   source.replace("initial_delay: 180", "initial_delay: soon")):
        path = tmp_path / "online-deployment.yml"
        path.write_text(broken)
        with pytest.raises(ValidationError):
            load_azure_yaml(path)


def test_generated_files_follow_the_pins():
    assert generate.sync_generated(ROOT, check=True) == [], \
        "run `python -m mmdet_mlflow.azure.generate` and commit the result"
    context = environment.CONTEXT_DIR
    pins = (ROOT / "mlflow_model/requirements.txt").read_text()
    assert (context / "requirements.txt").read_text().endswith(pins)
    import mlflow_model

    build = (context / "build-requirements.txt").read_text().splitlines()
    assert [line for line in build if not line.startswith("#")] == mlflow_model.mmcv_build_requirements()


def test_environment_builds_mmcv_as_setup_venv_does():
    env = load_azure_yaml(ROOT / "components/environment/environment.yml")
    context = ROOT / "components/environment" / env.build.path
    assert env.version == environment.environment_version()
    dockerfile = (context / env.build.dockerfile_path).read_text()
    steps = [line for line in dockerfile.splitlines() if line.startswith(("RUN", "COPY", "FROM"))]
    copied = steps[[s.startswith("COPY") for s in steps].index(True)].split()[1:-1]
    assert sorted(copied) == sorted(environment.context_files(ROOT / "requirements-dev.txt"))
    torch_first = dockerfile.index("-r /opt/pins/build-requirements.txt")
    mmcv = dockerfile.index("--no-build-isolation")
    assert torch_first < mmcv < dockerfile.index("-r /opt/pins/requirements.txt")
    assert "MMCV_WITH_OPS=1" in dockerfile and 'python -c "import mmcv._ext"' in dockerfile


def _dry_run(kind: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    """Run `mmdet-mlflow deploy <kind> --dry-run` in this process (so the audit hook sees every
    connection; errors propagate as they are raised) and load what it wrote."""
    import contextlib
    import io

    out = tmp_path / kind
    args = build_parser().parse_args(["deploy", kind, "--dry-run", "--output-dir", str(out), *extra])
    before = len(CONNECTS)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert args.handler(args) == 0
    assert CONNECTS[before:] == [], f"--dry-run reached out: {CONNECTS[before:]}"
    loaded = {p.name: load_azure_yaml(p) for p in sorted(out.iterdir())}
    return loaded, stdout.getvalue()


def _ref(reference: str) -> str:
    return reference.removeprefix("azureml:")  # the loaders drop the prefix


def test_online_dry_run(tmp_path):
    loaded, printed = _dry_run("online", tmp_path, "--endpoint-name", "seg-ep", "--model", "azureml:seg:3",
                               "--instance-type", "Standard_F8s_v2", "--instance-count", "2",
                               "--url-allowlist", "10.1.0.0/16,images.internal")
    assert set(loaded) == {"online-endpoint.yml", "online-deployment.yml", "environment.yml"}
    endpoint, deployment = loaded["online-endpoint.yml"], loaded["online-deployment.yml"]
    assert endpoint.name == "seg-ep" and endpoint.auth_mode == "key"
    # traffic goes to the deployment once it exists (the service refuses it before)
    assert not endpoint.traffic
    assert '#   az ml online-endpoint update -n seg-ep --traffic "blue=100"' in printed
    assert (_ref(deployment.model), deployment.instance_type, deployment.instance_count) == \
        ("seg:3", "Standard_F8s_v2", 2)
    settings = deployment.request_settings
    assert (settings.request_timeout_ms, settings.max_concurrent_requests_per_instance,
            settings.max_queue_wait_ms) == (90_000, 1, 500)
    assert deployment.liveness_probe.initial_delay == 180
    assert deployment.liveness_probe.failure_threshold * deployment.liveness_probe.period > 90
    # a request's work ends before Azure's 90 s timeout (85 % of it), so our answer comes first
    assert deployment.environment_variables == {"WORKER_COUNT": "1", "MMDET_MLFLOW_REQUEST_TIMEOUT": "76.5",
                                                "MMDET_MLFLOW_URL_ALLOWLIST": "10.1.0.0/16,images.internal"}
    code = (tmp_path / "online" / deployment.code_configuration.code).resolve()
    assert (code / deployment.code_configuration.scoring_script) == ROOT / "scoring" / "azureml" / "score.py"
    env = loaded["environment.yml"]
    assert _ref(deployment.environment) == f"{env.name}:{env.version}"
    assert (tmp_path / "online" / env.build.path).resolve() == environment.CONTEXT_DIR
    assert "name: seg-ep" in printed and "scoring_script: score.py" in printed


def test_online_no_code_dry_run_names_only_the_model(tmp_path):
    """Azure's no-code MLflow deployment (ONNX models): no environment, no scoring script."""
    loaded, _ = _dry_run("online", tmp_path, "--endpoint-name", "seg-ep", "--model", "azureml:seg-onnx:1",
                         "--no-code", "true")
    assert set(loaded) == {"online-endpoint.yml", "online-deployment.yml"}, "no environment to create"
    deployment = loaded["online-deployment.yml"]
    assert deployment.environment is None and deployment.code_configuration is None
    assert (_ref(deployment.model), deployment.instance_type) == ("seg-onnx:1", "Standard_DS3_v2")
    assert deployment.liveness_probe.initial_delay == 180


def test_no_code_with_an_environment_is_refused(tmp_path):
    from scoring.errors import MmdetMlflowError

    with pytest.raises(MmdetMlflowError, match="no-code deployment names no environment"):
        _dry_run("online", tmp_path, "--endpoint-name", "e", "--model", "azureml:m:1", "--no-code", "true",
                 "--environment", "azureml:env:1")


def test_batch_dry_run(tmp_path):
    loaded, _ = _dry_run("batch", tmp_path, "--endpoint-name", "seg-batch", "--model", "azureml:seg:3",
                         "--compute", "gpu-cluster", "--mini-batch-size", "4",
                         "--params", json.dumps({"score_threshold": 0.5}),
                         "--environment", "azureml:my-env:7")
    assert set(loaded) == {"batch-endpoint.yml", "batch-deployment.yml"}  # its own environment
    deployment = loaded["batch-deployment.yml"]
    s = deployment.settings
    assert (deployment.compute, _ref(deployment.environment), s.mini_batch_size, s.output_action,
            s.output_file_name, s.error_threshold, s.max_concurrency_per_instance) == \
        ("gpu-cluster", "my-env:7", 4, "append_row", "predictions.csv", 0, 1)
    assert (s.retry_settings.max_retries, s.retry_settings.timeout) == (3, 600)
    # each of a mini-batch's 4 pictures gets its share of the 600 s before the mini-batch's timeout
    assert s.environment_variables == {"MMDET_MLFLOW_BATCH_PARAMS": '{"score_threshold": 0.5}',
                                       "MMDET_MLFLOW_BATCH_PICTURE_TIMEOUT": "127.5"}
    code = (tmp_path / "batch" / deployment.code_configuration.code).resolve()
    assert (code / deployment.code_configuration.scoring_script) == ROOT / "scoring" / "azureml" / "batch_score.py"


def test_batch_dry_run_refuses_bad_params(tmp_path):
    from scoring.errors import InputError

    with pytest.raises(InputError, match="unknown param 'score'"):
        _dry_run("batch", tmp_path, "--endpoint-name", "e", "--model", "azureml:m:1", "--compute", "c",
                 "--params", '{"score": 1}')


@pytest.mark.parametrize("kind", ["online", "batch"])
def test_a_deployment_passes_its_model_config_as_mlflows_own_variable(tmp_path, kind):
    config = {"max_image_pixels": 20_000_000, "batch_size": 2}
    extra = ("--compute", "c") if kind == "batch" else ()
    loaded, _ = _dry_run(kind, tmp_path, "--endpoint-name", "e", "--model", "azureml:m:1", *extra,
                         "--model-config", json.dumps(config))
    deployment = loaded[f"{kind}-deployment.yml"]
    variables = (deployment.environment_variables if kind == "online"
                 else deployment.settings.environment_variables)
    assert json.loads(variables["MLFLOW_PYFUNC_INFERENCE_CONFIG"]) == config


def test_a_deployment_refuses_an_unknown_model_config_key_before_writing(tmp_path):
    from scoring.errors import MmdetMlflowError

    with pytest.raises(MmdetMlflowError, match="unknown model_config key 'max_pixels'.*max_image_pixels"):
        _dry_run("online", tmp_path, "--endpoint-name", "e", "--model", "azureml:m:1",
                 "--model-config", '{"max_pixels": 1}')
    assert not (tmp_path / "online").exists() or not any((tmp_path / "online").iterdir())


def filled_command(component, values: dict, outputs: Path) -> list[str]:
    """The component's command as Azure fills it: ``$[[...]]`` parts kept only when their input
    has a value, inputs and outputs replaced by their values."""
    command = re.sub(r"\$\[\[(.*?)\]\]",
                     lambda m: m.group(1) if re.search(r"inputs\.(\w+)", m.group(1)).group(1) in values else "",
                     component.command)
    command = re.sub(r"\$\{\{inputs\.(\w+)\}\}", lambda m: shlex.quote(str(values[m.group(1)])), command)
    command = re.sub(r"\$\{\{outputs\.(\w+)\}\}", lambda m: shlex.quote(str(outputs / m.group(1))), command)
    return shlex.split(command)


def component_specs() -> list[Path]:
    return sorted((ROOT / "components").glob("*/spec.yaml"))


CLI_PREFIX = ["python", "-m", "mmdet_mlflow.cli"]
# Components whose entry is the CLI (the fine-tune component's is its own until it moves over).
OURS = {"batch_score", "deploy_batch", "deploy_online", "evaluate", "package", "register"}


def _sample_values(component) -> dict:
    """A distinct value for every input, so that each can be found where the parser put it."""
    values = {}
    for number, (name, spec) in enumerate(component.inputs.items(), start=1):
        values[name] = {"string": f"{name}-value", "integer": 1000 + number, "number": number / 100,
                        "boolean": True}.get(spec.type, f"/mnt/inputs/{name}")
        if getattr(spec, "enum", None):  # a choice the CLI knows (the last: not the default)
            values[name] = spec.enum[-1]
    if "params" in values:  # deploy batch: predict params, a JSON object
        values["params"] = json.dumps({"score_threshold": 0.5})
    if "model_config" in values:  # deploy: the model's options, a JSON object
        values["model_config"] = json.dumps({"batch_size": 2})
    return values


def _arriving_inputs(component, values: dict) -> set[str]:
    """The given inputs whose value the parser keeps: where two inputs feed the same option
    (package: checkpoint_file after checkpoint), the last one given wins."""
    last = {}
    for option, name in re.findall(r"(--[\w-]+) \$\{\{inputs\.(\w+)\}\}", component.command):
        if name in values:
            last[option] = name
    return set(last.values())


def test_the_components_we_own_run_the_cli():
    running_the_cli = {p.parent.name for p in component_specs()
                       if load_azure_yaml(p).command.split()[:3] == CLI_PREFIX}
    assert OURS <= running_the_cli


@pytest.mark.parametrize("path", component_specs(), ids=lambda p: p.parent.name)
def test_every_component_command_parses_with_the_cli(path, tmp_path):
    """Every input reaches an option the CLI knows, with every optional input given and with
    only the required ones and defaults: spec, CLI and library cannot drift apart."""
    component = load_azure_yaml(path)
    if component.command.split()[:3] != CLI_PREFIX:
        pytest.skip(f"{path.parent.name} does not run the CLI")
    everything = _sample_values(component)
    minimal = {name: spec.default for name, spec in component.inputs.items() if spec.default is not None}
    minimal.update({name: everything[name] for name, spec in component.inputs.items()
                    if not spec.optional and spec.default is None})
    for values in (everything, minimal):
        argv = filled_command(component, values, tmp_path)
        args = build_parser().parse_args(argv[3:])  # argparse exits on an unknown option
        parsed = {json.dumps(v) if isinstance(v, dict) else str(v) for v in vars(args).values()}
        unused = set(values) - set(re.findall(r"\$\{\{inputs\.(\w+)\}\}", component.command))
        assert not unused, f"inputs the command never passes: {unused}"
        missing = {name for name in _arriving_inputs(component, values) if str(values[name]) not in parsed}
        assert not missing, f"inputs that reach no option: {missing}"


def test_the_package_component_prefers_checkpoint_file(tmp_path):
    component = load_azure_yaml(ROOT / "components/package/spec.yaml")
    for given, expected in (({}, "official"), ({"checkpoint_file": "/mnt/ckpt.pth"}, "/mnt/ckpt.pth")):
        values = {"model_name": "rtmdet-ins_tiny_8xb32-300e_coco", "checkpoint": "official", **given}
        args = build_parser().parse_args(filled_command(component, values, tmp_path)[3:])
        assert args.checkpoint == expected


@pytest.mark.parametrize("kind, required", [
    ("online", {"endpoint_name": "ep", "model": "azureml:m:1"}),
    ("batch", {"endpoint_name": "ep", "model": "azureml:m:1", "compute": "cluster"}),
])
def test_component_command_runs_the_cli_as_azure_would(kind, required, tmp_path):
    """Fill the component's command the way Azure does (inputs, defaults, optional parts left
    out) and run it, dry."""
    component = load_azure_yaml(ROOT / "components" / f"deploy_{kind}" / "spec.yaml")
    import dataclasses

    fields = {f.name for f in dataclasses.fields(deployment_settings.SETTINGS[kind])}
    assert set(component.inputs) == fields | {"dry_run", "enabled", "registration_details"}
    values = {name: spec.default for name, spec in component.inputs.items() if spec.default is not None}
    values.update(required, dry_run=True)
    argv = filled_command(component, values, tmp_path)
    assert argv[0] == "python"
    result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in (tmp_path / "deployment_yaml").iterdir():
        load_azure_yaml(path)


@pytest.mark.parametrize("existing, percent, expected", [
    ({}, 100, {"blue": 100}),
    ({"green": 100}, 100, {"green": 0, "blue": 100}),
    ({"green": 100}, 10, {"green": 90, "blue": 10}),
    ({"green": 50, "red": 50}, 10, {"green": 45, "red": 45, "blue": 10}),
    ({"green": 67, "red": 33, "blue": 0}, 50, {"green": 34, "red": 16, "blue": 50}),
    ({"blue": 100}, 100, {"blue": 100}),
])
def test_traffic_for_a_new_deployment_keeps_a_total_of_100(existing, percent, expected):
    traffic = deploy.traffic_with(existing, "blue", percent)
    assert traffic == expected and sum(traffic.values()) == 100


def test_deploy_dry_run_from_an_installed_wheel(tmp_path):
    """Installed from a wheel (no checkout, no components/), deploy still finds the scoring
    code and the environment's build context: both are in the package."""
    import shutil
    import zipfile

    source = tmp_path / "source"  # building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("mlflow_model", "scoring", "mmdet_mlflow"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--no-index", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    site = tmp_path / "site"
    zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))).extractall(site)

    out = tmp_path / "yaml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-m", "mmdet_mlflow.cli", "deploy", "online", "--dry-run",
                           "--endpoint-name", "e", "--model", "azureml:m:1", "--output-dir", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    deployment = load_azure_yaml(out / "online-deployment.yml")
    code = (out / deployment.code_configuration.code).resolve()
    assert code.is_relative_to(site) and (code / deployment.code_configuration.scoring_script).is_file()
    environment_file = load_azure_yaml(out / "environment.yml")
    context = (out / environment_file.build.path).resolve()
    assert context.is_relative_to(site) and (context / environment_file.build.dockerfile_path).is_file()
    assert environment_file.version == environment.environment_version()  # the same image


@pytest.mark.parametrize("config, checkpoint, task", [
    ("rtmdet-ins_tiny_8xb32-300e_coco", "tiny_checkpoint", "instance-segmentation"),
    ("rtmdet_tiny_8xb32-300e_coco", "tiny_od_checkpoint", "object-detection"),  # any family's config
])
def test_the_package_component_fills_the_output_folder_azure_made(tmp_path, request, config, checkpoint, task):
    """Run as Azure runs it: the output folder exists (empty) before the command starts, and
    checkpoint_file overrides the default checkpoint `official` (nothing is downloaded)."""
    component = load_azure_yaml(ROOT / "components/package/spec.yaml")
    (tmp_path / "mlflow_model_folder").mkdir()
    values = {"model_name": config, "checkpoint": "official",
              "checkpoint_file": request.getfixturevalue(checkpoint)}
    argv = filled_command(component, values, tmp_path)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "mlflow_model_folder" / "MLmodel").is_file()
    info = json.loads((tmp_path / "mlflow_model_folder" / "model" / "model.json").read_text())
    assert info["config_name"] == config and info["task"] == task


def test_the_package_component_writes_an_int8_onnx_model(tmp_path, tiny_checkpoint, image_files):
    """runtime onnx with quantize int8 and a calibration folder, as Azure runs it: a model that
    needs no torch, serving int8, and the measured cost of int8 in the job's log."""
    from helpers import TINY

    component = load_azure_yaml(ROOT / "components/package/spec.yaml")
    (tmp_path / "mlflow_model_folder").mkdir()
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for image in image_files:
        shutil.copy(image, calibration / image.name)
    values = {"model_name": TINY, "checkpoint": "official", "checkpoint_file": tiny_checkpoint,
              "runtime": "onnx", "quantize": "int8", "calibration_data": calibration}
    argv = filled_command(component, values, tmp_path)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "int8 vs fp32 on" in done.stdout and "onnx runtime" in done.stdout, done.stdout[-2000:]
    model = tmp_path / "mlflow_model_folder"
    requirements = (model / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements
    assert (model / "model" / "model.int8.onnx").is_file()


def test_the_register_component_dry_run_writes_what_deploy_reads(tmp_path, tiny_model_dir):
    from mlflow_model.model_dir import REGISTRATION_FILE

    component = load_azure_yaml(ROOT / "components/register/spec.yaml")
    values = {name: spec.default for name, spec in component.inputs.items() if spec.default is not None}
    values.update(model=tiny_model_dir, dry_run=True)
    argv = filled_command(component, values, tmp_path)
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    registered = json.loads((tmp_path / "registration_details" / REGISTRATION_FILE).read_text())
    assert registered["id"] == f"azureml:{values['registered_model_name']}@latest"
    loaded, _ = _dry_run("online", tmp_path, "--endpoint-name", "e",
                         "--registration-details", str(tmp_path / "registration_details"))
    assert _ref(loaded["online-deployment.yml"].model) == registered["id"].removeprefix("azureml:")
