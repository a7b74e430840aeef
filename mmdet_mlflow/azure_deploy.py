"""Azure ML deployment with the azure-ai-ml SDK (v2): managed online endpoints and batch endpoints
for a registered MLflow model, scored by scoring/azureml/score.py and scoring/azureml/batch_score.py, in the
environment of components/environment (built as tools/setup_venv.sh builds .venv).

``online_entities`` / ``batch_entities`` build the SDK entities from settings; ``write_yaml``
writes them as the YAML files ``az ml`` takes (what ``--dry-run`` does, contacting nothing);
``deploy_online`` / ``deploy_batch`` create or update them in a workspace. Credentials come from
azure-identity's DefaultAzureCredential (environment, managed identity, Azure CLI login, ...):
nothing secret is read from or written to files, and only resource names are logged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ENVIRONMENT_DIR = REPO / "components" / "environment"
ENVIRONMENT_YAML = ENVIRONMENT_DIR / "environment.yml"
ENVIRONMENT_CONTEXT = ENVIRONMENT_DIR / "context"
PINS = REPO / "mlflow_model" / "requirements.txt"
DEV_PINS = REPO / "requirements-dev.txt"
SCHEMA = "https://azuremlschemas.azureedge.net/latest/{}.schema.json"
ALLOWLIST_ENV = "MMDET_MLFLOW_URL_ALLOWLIST"  # scoring.fetch reads it in the deployment
BATCH_PARAMS_ENV = "MMDET_MLFLOW_BATCH_PARAMS"  # scoring.azureml.batch_score reads it
logger = logging.getLogger("mmdet_mlflow.azure")


def scoring_dir() -> Path:
    """The code folder both deployments upload: score.py and batch_score.py."""
    import scoring.azureml

    return Path(scoring.azureml.__file__).resolve().parent


@dataclass
class OnlineSettings:
    """A managed online endpoint + deployment. Defaults follow Azure's catalog examples
    (Standard_DS3_v2, 1 instance, 90 s timeout, 1 request at a time, 500 ms queue wait)."""

    endpoint_name: str
    model: str  # azureml:<name>:<version> (a registered MLflow model)
    deployment_name: str = "blue"
    environment: str | None = None  # azureml:<name>:<version>; None: components/environment
    instance_type: str = "Standard_DS3_v2"
    instance_count: int = 1
    request_timeout_ms: int = 90_000
    max_concurrent_requests: int = 1
    max_queue_wait_ms: int = 500
    traffic_percent: int = 100
    # Loading a ~400 MB model (imports, weights, model build) takes minutes on a small CPU
    # instance; and with one worker busy scoring a 90 s request, a probe may wait, so failures
    # are tolerated for well over a request timeout before the container is restarted.
    liveness_initial_delay: int = 180
    readiness_initial_delay: int = 30
    probe_period: int = 10
    probe_timeout: int = 10
    probe_failure_threshold: int = 30
    url_allowlist: str | None = None  # MMDET_MLFLOW_URL_ALLOWLIST in the deployment
    auth_mode: str = "key"


@dataclass
class BatchSettings:
    """A batch endpoint + model deployment. Defaults follow Azure's catalog examples (mini-batch
    of 2 files, 1 process per instance, 1 instance, 3 retries of 600 s, error threshold 0)."""

    endpoint_name: str
    model: str
    compute: str  # an AmlCompute cluster name
    deployment_name: str = "default"
    environment: str | None = None
    instance_count: int = 1
    mini_batch_size: int = 2
    max_concurrency_per_instance: int = 1
    max_retries: int = 3
    retry_timeout: int = 600
    error_threshold: int = 0  # bad files and rows are error records, not failed mini-batches
    output_file_name: str = "predictions.csv"
    params: dict[str, Any] = field(default_factory=dict)  # predict params for every image
    url_allowlist: str | None = None


def repo_environment():
    """The serving/training environment of components/environment, as an SDK entity."""
    from azure.ai.ml import load_environment

    return load_environment(ENVIRONMENT_YAML)


def environment_reference(environment: str | None) -> tuple[str, Any]:
    """(the ``azureml:name:version`` a deployment names, the Environment entity to create
    first or None when it is already registered)."""
    if environment:
        return environment, None
    env = repo_environment()
    return f"azureml:{env.name}:{env.version}", env


def online_entities(settings: OnlineSettings):
    """(ManagedOnlineEndpoint, ManagedOnlineDeployment, Environment or None)."""
    from azure.ai.ml.entities import (CodeConfiguration, ManagedOnlineDeployment,
                                      ManagedOnlineEndpoint, OnlineRequestSettings, ProbeSettings)

    env_ref, env = environment_reference(settings.environment)
    endpoint = ManagedOnlineEndpoint(
        name=settings.endpoint_name, auth_mode=settings.auth_mode,
        description="RTMDet-Ins instance segmentation (mmdet-mlflow)",
        traffic={settings.deployment_name: settings.traffic_percent})

    def probe(initial_delay: int):
        return ProbeSettings(initial_delay=initial_delay, period=settings.probe_period,
                             timeout=settings.probe_timeout,
                             failure_threshold=settings.probe_failure_threshold, success_threshold=1)

    deployment = ManagedOnlineDeployment(
        name=settings.deployment_name,
        endpoint_name=settings.endpoint_name,
        model=settings.model,
        environment=env_ref,
        code_configuration=CodeConfiguration(code=str(scoring_dir()), scoring_script="score.py"),
        instance_type=settings.instance_type,
        instance_count=settings.instance_count,
        request_settings=OnlineRequestSettings(
            request_timeout_ms=settings.request_timeout_ms,
            max_concurrent_requests_per_instance=settings.max_concurrent_requests,
            max_queue_wait_ms=settings.max_queue_wait_ms),
        liveness_probe=probe(settings.liveness_initial_delay),
        readiness_probe=probe(settings.readiness_initial_delay),
        # one model copy per instance, serving one request at a time (max_concurrent_requests)
        environment_variables=_deployment_env({"WORKER_COUNT": "1"}, settings.url_allowlist),
    )
    return endpoint, deployment, env


def batch_entities(settings: BatchSettings):
    """(BatchEndpoint, ModelBatchDeployment, Environment or None)."""
    from azure.ai.ml.entities import (BatchEndpoint, BatchRetrySettings, CodeConfiguration,
                                      ModelBatchDeployment, ModelBatchDeploymentSettings,
                                      ResourceConfiguration)

    from scoring.schema import PredictParams

    PredictParams().updated(settings.params)  # a bad param fails here, not in every job
    env_ref, env = environment_reference(settings.environment)
    endpoint = BatchEndpoint(name=settings.endpoint_name,
                             description="RTMDet-Ins instance segmentation (mmdet-mlflow)")
    variables = {BATCH_PARAMS_ENV: json.dumps(settings.params)} if settings.params else {}
    deployment = ModelBatchDeployment(
        name=settings.deployment_name,
        endpoint_name=settings.endpoint_name,
        model=settings.model,
        environment=env_ref,
        code_configuration=CodeConfiguration(code=str(scoring_dir()), scoring_script="batch_score.py"),
        compute=settings.compute,
        resources=ResourceConfiguration(instance_count=settings.instance_count),
        settings=ModelBatchDeploymentSettings(
            mini_batch_size=settings.mini_batch_size,
            max_concurrency_per_instance=settings.max_concurrency_per_instance,
            output_action="append_row",
            output_file_name=settings.output_file_name,
            retry_settings=BatchRetrySettings(max_retries=settings.max_retries,
                                              timeout=settings.retry_timeout),
            error_threshold=settings.error_threshold,
            logging_level="info",
            environment_variables=_deployment_env(variables, settings.url_allowlist),
        ),
    )
    return endpoint, deployment, env


def _deployment_env(variables: dict, allowlist: str | None) -> dict:
    return {**variables, **({ALLOWLIST_ENV: allowlist} if allowlist else {})}


def entity_yaml(entity, schema: str, base_dir: Path) -> str:
    """``entity`` as the YAML ``az ml`` and azure-ai-ml's loaders read, with local paths
    relative to ``base_dir`` (where the file goes). Written from the entity's own dict because
    the SDK's Endpoint.dump writes nothing (azure-ai-ml 1.35.2)."""
    import yaml

    data = _without_empty({"$schema": SCHEMA.format(schema), **json.loads(json.dumps(entity._to_dict()))})
    code = data.get("code_configuration", {})
    if code.get("code") and os.path.isabs(code["code"]):
        code["code"] = os.path.relpath(code["code"], base_dir)
    return yaml.safe_dump(data, sort_keys=False)


def _without_empty(data):
    """Drop empty mappings (tags: {}, properties: {}, environment_variables: {}) recursively."""
    if isinstance(data, dict):
        return {k: _without_empty(v) for k, v in data.items() if v != {}}
    return data


def yaml_texts(kind: str, entities, base_dir: Path, with_environment: bool = True) -> dict[str, str]:
    """``<kind>-endpoint.yml``, ``<kind>-deployment.yml`` and (when the deployment uses this
    repo's environment) ``environment.yml``, as text for files in ``base_dir``."""
    endpoint, deployment, env = entities
    base_dir = Path(base_dir).resolve()
    if kind == "online":
        # The service refuses traffic for a deployment that does not exist yet, so the endpoint
        # file carries none; deploy() and the commands below set it once the deployment is up.
        traffic = dict(endpoint.traffic or {})
        endpoint.traffic = {}
        shown = ",".join(f"{name}={percent}" for name, percent in traffic.items())
        endpoint_text = (f"# Traffic ({shown}) is set once the deployment exists:\n"
                         f"#   az ml online-endpoint update -n {endpoint.name} --traffic \"{shown}\"\n"
                         + entity_yaml(endpoint, "managedOnlineEndpoint", base_dir))
        endpoint.traffic = traffic
        files = {"online-endpoint.yml": endpoint_text,
                 "online-deployment.yml": entity_yaml(deployment, "managedOnlineDeployment", base_dir)}
    else:
        files = {"batch-endpoint.yml": entity_yaml(endpoint, "batchEndpoint", base_dir),
                 "batch-deployment.yml": entity_yaml(deployment, "modelBatchDeployment", base_dir)}
    if env is not None and with_environment:
        files["environment.yml"] = environment_yaml(base_dir)
    return files


def write_yaml(kind: str, entities, out_dir: Path) -> dict[str, Path]:
    """Write yaml_texts() to ``out_dir``. Returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in yaml_texts(kind, entities, out_dir).items():
        (out_dir / name).write_text(text)
        written[name] = out_dir / name
    return written


def environment_yaml(base_dir: Path) -> str:
    """components/environment/environment.yml with its build context relative to ``base_dir``."""
    import yaml

    data = yaml.safe_load(ENVIRONMENT_YAML.read_text())
    context = (ENVIRONMENT_DIR / data["build"]["path"]).resolve()
    data["build"]["path"] = os.path.relpath(context, Path(base_dir).resolve())
    return yaml.safe_dump(data, sort_keys=False)


def ml_client(subscription_id: str | None = None, resource_group: str | None = None,
              workspace: str | None = None):
    """An MLClient with DefaultAzureCredential. The workspace comes from the arguments, else
    from the variables Azure sets inside a job (AZUREML_ARM_*), else from a config.json."""
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    credential = DefaultAzureCredential()
    subscription_id = subscription_id or os.environ.get("AZUREML_ARM_SUBSCRIPTION")
    resource_group = resource_group or os.environ.get("AZUREML_ARM_RESOURCEGROUP")
    workspace = workspace or os.environ.get("AZUREML_ARM_WORKSPACE_NAME")
    if subscription_id and resource_group and workspace:
        return MLClient(credential, subscription_id, resource_group, workspace)
    return MLClient.from_config(credential)


def deploy(kind: str, entities, client) -> None:
    """Create or update the environment (when ours), the endpoint, then the deployment (and,
    online, the traffic), waiting for each."""
    from azure.core.exceptions import ResourceNotFoundError

    endpoint, deployment, env = entities
    if env is not None:
        logger.info("environment %s:%s: creating or updating (the image builds on first use)",
                    env.name, env.version)
        client.environments.create_or_update(env)
    operations = client.online_endpoints if kind == "online" else client.batch_endpoints
    deployments = client.online_deployments if kind == "online" else client.batch_deployments
    try:
        existing = operations.get(endpoint.name)
    except ResourceNotFoundError:
        existing = None
    logger.info("%s endpoint %s: %s", kind, endpoint.name, "updating" if existing else "creating")
    wanted = dict(getattr(endpoint, "traffic", None) or {})
    if kind == "online":
        # traffic may only name deployments that exist: keep what is there until ours is up
        endpoint.traffic = dict(existing.traffic or {}) if existing else {}
    operations.begin_create_or_update(endpoint).result()
    logger.info("%s deployment %s/%s: creating or updating", kind, endpoint.name, deployment.name)
    deployments.begin_create_or_update(deployment).result()
    endpoint = operations.get(endpoint.name)
    if kind == "online":
        for name, percent in wanted.items():
            endpoint.traffic = traffic_with(endpoint.traffic or {}, name, percent)
        logger.info("online endpoint %s: traffic %s", endpoint.name, endpoint.traffic)
    else:
        endpoint.defaults = {"deployment_name": deployment.name}
    operations.begin_create_or_update(endpoint).result()
    logger.info("done: %s endpoint %s, deployment %s", kind, endpoint.name, deployment.name)


def traffic_with(traffic: dict, name: str, percent: int) -> dict:
    """``traffic`` with ``percent`` for deployment ``name`` and the others scaled to share the
    rest (the service wants a total of 100)."""
    others = {k: int(v) for k, v in traffic.items() if k != name and int(v) > 0}
    result = {k: 0 for k in traffic if k != name}
    rest, total = 100 - percent, sum(others.values())
    if others and rest > 0:
        scaled = {k: v * rest // total for k, v in others.items()}
        scaled[max(others, key=others.get)] += rest - sum(scaled.values())  # rounding
        result.update(scaled)
    result[name] = percent
    return result


# --- command line (the deploy components' main.py) ------------------------------------------

SETTINGS = {"online": OnlineSettings, "batch": BatchSettings}


def add_arguments(parser, kind: str) -> None:
    """One --option per settings field (required where the field has no default), plus the
    workspace, --dry-run and --output-dir."""
    import dataclasses

    for f in dataclasses.fields(SETTINGS[kind]):
        option = "--" + f.name.replace("_", "-")
        if f.name == "model":  # or --registration-details
            parser.add_argument(option, dest=f.name, help=_FIELD_HELP["model"])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            parser.add_argument(option, dest=f.name, required=True)
        elif f.default_factory is not dataclasses.MISSING:
            parser.add_argument(option, dest=f.name, type=json.loads, default=None,
                                help="a JSON object, e.g. '{\"score_threshold\": 0.5}'")
        else:
            kind_of = type(f.default) if f.default is not None else str
            parser.add_argument(option, dest=f.name, type=kind_of, default=None,
                                help=f"default: {f.default}")
    parser.add_argument("--registration-details", type=Path,
                        help="instead of --model: the output folder of a register step (model.json)")
    parser.add_argument("--enabled", type=_boolean, default=True,
                        help="false: deploy nothing (lets a pipeline switch this deployment off)")
    parser.add_argument("--subscription-id", help="default: AZUREML_ARM_SUBSCRIPTION in a job, else config.json")
    parser.add_argument("--resource-group", help="default: AZUREML_ARM_RESOURCEGROUP in a job, else config.json")
    parser.add_argument("--workspace-name", help="default: AZUREML_ARM_WORKSPACE_NAME in a job, else config.json")
    parser.add_argument("--dry-run", nargs="?", const=True, default=False, type=_boolean,
                        help="write and print the endpoint, deployment and environment YAML; contact nothing")
    parser.add_argument("--output-dir", type=Path,
                        help="where the YAML goes (with --dry-run: default ./azure-<kind>)")


def run_from_args(kind: str, args) -> int:
    """Build the entities from parsed arguments; write/print them (--dry-run) or deploy them."""
    import dataclasses

    if not args.enabled:
        print(f"{kind} deployment switched off (--enabled false): nothing to do")
        return 0
    if args.model is None:
        if args.registration_details is None:
            raise SystemExit("give --model azureml:<name>:<version> or --registration-details DIR")
        from mmdet_mlflow.azure_register import registered_model_id

        args.model = registered_model_id(args.registration_details)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SETTINGS[kind])
             if getattr(args, f.name) is not None}
    settings = SETTINGS[kind](**given)
    entities = (online_entities if kind == "online" else batch_entities)(settings)
    out_dir = args.output_dir or (Path(f"azure-{kind}") if args.dry_run else None)
    if out_dir:
        written = write_yaml(kind, entities, out_dir)
        for name, path in written.items():
            print(f"# --- {path}\n{path.read_text()}", end="" if args.dry_run else "\n")
    if args.dry_run:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # no HTTP request logging
    deploy(kind, entities, ml_client(args.subscription_id, args.resource_group, args.workspace_name))
    return 0


def component_yaml(kind: str) -> str:
    """components/deploy_<kind>/spec.yaml: one input per settings field, so the component,
    main.py and the library cannot drift apart."""
    import dataclasses

    inputs, command = {}, [f"python components/deploy_{kind}/main.py"]
    for f in dataclasses.fields(SETTINGS[kind]):
        option = "--" + f.name.replace("_", "-")
        spec: dict[str, Any] = {}
        if f.name == "model":  # or registration_details, from a register step
            spec.update(type="string", optional=True)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            spec["type"] = "string"
        elif f.default_factory is not dataclasses.MISSING or f.default is None:
            spec.update(type="string", optional=True)
        else:
            spec.update(type="integer" if isinstance(f.default, int) else "string", default=f.default)
        spec["description"] = _FIELD_HELP.get(f.name, f.name.replace("_", " "))
        inputs[f.name] = spec
        part = f"{option} ${{{{inputs.{f.name}}}}}"
        command.append(f"$[[{part}]]" if spec.get("optional") else part)
    inputs["registration_details"] = {
        "type": "uri_folder", "optional": True,
        "description": "instead of model: the registration_details output of the register component"}
    inputs["enabled"] = {"type": "boolean", "default": True,
                         "description": "false: deploy nothing (switch this deployment off in a pipeline)"}
    inputs["dry_run"] = {"type": "boolean", "default": False,
                         "description": "write the YAML to the output only; deploy nothing"}
    command += ["$[[--registration-details ${{inputs.registration_details}}]]",
                "--enabled ${{inputs.enabled}}",
                "--dry-run ${{inputs.dry_run}}", "--output-dir ${{outputs.deployment_yaml}}"]
    what = "a managed online endpoint" if kind == "online" else "a batch endpoint"
    data = {
        "$schema": SCHEMA.format("commandComponent"),
        "type": "command",
        "name": f"mmdet_mlflow_deploy_{kind}",
        "display_name": f"Deploy RTMDet-Ins to {what}",
        "version": "0.1.0",
        "description": f"Create or update {what} and its deployment for a registered mmdet-mlflow "
                       f"MLflow model (mmdet_mlflow.azure_deploy). Authenticates with "
                       f"DefaultAzureCredential: give the compute a managed identity with rights "
                       f"on the workspace.",
        "inputs": inputs,
        "outputs": {"deployment_yaml": {"type": "uri_folder",
                                        "description": "the endpoint, deployment and environment YAML deployed"}},
        "code": "../..",
        "environment": {"image": "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
                        "conda_file": "../environment/deploy-conda.yaml"},
        "command": " ".join(command),
    }
    return ("# Generated by mmdet_mlflow.azure_deploy from its settings: do not edit.\n"
            + _yaml(data))


_FIELD_HELP = {
    "endpoint_name": "endpoint name (unique in the Azure region)",
    "model": "registered MLflow model, azureml:<name>:<version> (or give registration_details)",
    "environment": "azureml:<name>:<version>; default: components/environment (built on first use)",
    "compute": "AmlCompute cluster that runs the batch jobs",
    "params": "predict params for every image, a JSON object",
    "url_allowlist": "hosts or CIDR networks image URLs may point to beyond the public internet",
}


def _boolean(text) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("1", "true", "yes"):
        return True
    if str(text).lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


# --- the environment's build context follows the one list of pins -----------------------------

EXAMPLE_MODEL = "azureml:rtmdet-ins-x:1"
EXAMPLES = {  # the YAML in components/deploy_*/ for `az ml ... create -f`, as --dry-run writes it
    "online": lambda: OnlineSettings(endpoint_name="rtmdet-ins", model=EXAMPLE_MODEL),
    "batch": lambda: BatchSettings(endpoint_name="rtmdet-ins-batch", model=EXAMPLE_MODEL,
                                   compute="cpu-cluster"),
}
DEPLOY_CONDA = ENVIRONMENT_DIR / "deploy-conda.yaml"


def generated_files() -> dict[Path, str]:
    """Every file generated from the pins and the settings above: the environment's build
    context, the deploy components' conda file, and the example endpoint/deployment YAML."""
    files = {ENVIRONMENT_CONTEXT / name: text for name, text in environment_context_files().items()}
    deploy_pins = [line for line in _requirement_lines(DEV_PINS)
                   if line.startswith(("azure-ai-ml", "azure-identity"))]
    files[DEPLOY_CONDA] = (
        "# Generated from requirements-dev.txt by mmdet_mlflow.azure_deploy: do not edit.\n"
        "# The deploy components only need the Azure ML SDK and azure-identity.\n"
        + _yaml({"name": "mmdet-mlflow-deploy", "channels": ["conda-forge"],
                 "dependencies": ["python=3.11", "pip", {"pip": deploy_pins}]}))
    return files


def example_files() -> dict[Path, str]:
    files = {}
    for kind, settings in EXAMPLES.items():
        out_dir = REPO / "components" / f"deploy_{kind}"
        entities = (online_entities if kind == "online" else batch_entities)(settings())
        for name, text in yaml_texts(kind, entities, out_dir, with_environment=False).items():
            files[out_dir / name] = text
        files[out_dir / "spec.yaml"] = component_yaml(kind)
    return files


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def environment_context_files() -> dict[str, str]:
    """The generated files of components/environment/context: the pins (a copy of
    mlflow_model/requirements.txt), mmcv's build requirements and the serving extras."""
    from mlflow_model import mmcv_build_requirements

    header = "# Generated from {} by mmdet_mlflow.azure_deploy: do not edit.\n"
    server = [line for line in _requirement_lines(DEV_PINS)
              if line.startswith("azureml-inference-server-http")]
    return {
        "requirements.txt": header.format("mlflow_model/requirements.txt") + PINS.read_text(),
        "build-requirements.txt": header.format("mlflow_model.mmcv_build_requirements()")
        + "\n".join(mmcv_build_requirements()) + "\n",
        "serving-requirements.txt": header.format("requirements-dev.txt") + "\n".join(server) + "\n",
    }


def environment_version() -> str:
    """The environment's version: a digest of its build context, so a new pin is a new version."""
    digest = hashlib.sha256()
    for path in sorted(ENVIRONMENT_CONTEXT.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def sync_generated(check: bool = False) -> list[str]:
    """Regenerate the files that follow the pins (generated_files), the version in
    environment.yml, then the example YAML (which names that version); with ``check``, only
    report what is out of date. Returns the paths that were (or would be) changed."""
    import re

    changed = []

    def update(path: Path, text: str):
        if not path.exists() or path.read_text() != text:
            changed.append(str(path.relative_to(REPO)))
            if not check:
                path.write_text(text)

    for path, text in generated_files().items():
        update(path, text)
    yaml_text = ENVIRONMENT_YAML.read_text()
    update(ENVIRONMENT_YAML, re.sub(r"(?m)^version: .*$", f'version: "{environment_version()}"', yaml_text))
    if not check or not changed:  # the examples name the environment version just written
        for path, text in example_files().items():
            update(path, text)
    return changed


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


if __name__ == "__main__":
    import sys

    check = "--check" in sys.argv
    stale = sync_generated(check=check)
    print(("out of date: " if check else "updated: ") + (", ".join(stale) or "nothing"))
    sys.exit(1 if check and stale else 0)
