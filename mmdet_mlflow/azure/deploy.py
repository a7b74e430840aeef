"""Create or update an endpoint and its deployment in a workspace, then route traffic to it."""
from __future__ import annotations

import logging

from azure.core.exceptions import ResourceNotFoundError

from mmdet_mlflow.azure.entities import Entities

logger = logging.getLogger("mmdet_mlflow.azure")


def deploy(kind: str, entities: Entities, client) -> None:
    """Create or update the environment (when ours), the endpoint, then the deployment (and,
    online, the traffic), waiting for each."""
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
