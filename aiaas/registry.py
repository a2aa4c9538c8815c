"""The model registry: MLflow's, reached at the tracking server ``cluster up`` starts.

Only this module talks to MLflow, so the rest of aiaas speaks of versions and lineage, not of
MLflow's client API.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiaas import errors

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

#: Tag keys of a version's lineage, shown by `aiaas models show`.
LINEAGE_PREFIX = "aiaas."


@dataclass
class Registered:
    """A registered model version."""

    name: str
    version: str
    run_id: str


def tracking_uri() -> str:
    """The MLflow tracking URI from the environment (set on every node by ``cluster up``)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise errors.ClusterError(
            "MLFLOW_TRACKING_URI is not set, so there is no registry to register in",
            "Start the cluster with 'aiaas cluster up' (it starts MLflow), or export "
            "MLFLOW_TRACKING_URI.",
        )
    return uri


def log_run(
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    history: list[dict[str, float]],
    metrics: dict[str, float],
    tags: dict[str, str],
) -> str:
    """Log a training run (params, per-epoch history, final metrics, lineage tags).

    Returns:
        The MLflow run id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in params.items()})
        for row in history:
            step = int(row.get("epoch", 0))
            mlflow.log_metrics(
                {k: float(v) for k, v in row.items() if k != "epoch" and _number(v)}, step=step
            )
        mlflow.log_metrics({f"test_{key}": value for key, value in metrics.items()})
        mlflow.set_tags({f"{LINEAGE_PREFIX}{key}": value for key, value in tags.items()})
        return str(run.info.run_id)


def register_torch_model(
    run_id: str,
    model_name: str,
    model: nn.Module,
    example: np.ndarray,
    tags: dict[str, str],
) -> Registered:
    """Log a torch model with its input signature into a run and register it as a new version."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri())
    model = model.eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example[:2],
            # Naming the requirements skips MLflow's slow import-tracing inference.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=model_name,
            await_registration_for=60,
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, f"{LINEAGE_PREFIX}{key}", value)
    return Registered(name=model_name, version=version, run_id=run_id)


def versions(model_name: str) -> list[dict[str, Any]]:
    """Every version of a registered model, oldest first, with its tags."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.MlflowClient().search_model_versions(f"name='{model_name}'")
    return sorted(
        (
            {"version": v.version, "run_id": v.run_id, "tags": dict(v.tags), "status": v.status}
            for v in found
        ),
        key=lambda v: int(v["version"]),
    )


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
