"""``deploy:`` of a ``kind: cluster`` file: how ``aiaas cluster render`` targets ``ray up`` and
KubeRay. Nothing here changes what ``cluster up`` starts on this machine.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, PositiveFloat, field_validator

from aiaas.config.base import ConfigModel


class RayUpSpec(ConfigModel):
    """What a ``ray up`` cluster YAML needs beyond the node resources."""

    provider: dict[str, Any] = Field(
        description="ray-up 'provider' block, passed through, e.g. {type: aws, region: us-west-2}"
    )
    head_node_config: dict[str, Any] = Field(
        default_factory=dict,
        description="provider-specific node_config of the head, e.g. {InstanceType: m5.2xlarge}",
    )
    worker_node_configs: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="provider-specific node_config per worker group name",
    )
    ssh_user: str = Field("ubuntu", description="user ray up logs in as")
    idle_timeout_minutes: PositiveFloat = Field(5, description="autoscaler scale-down delay")

    @field_validator("provider")
    @classmethod
    def _provider_has_type(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "type" not in value:
            raise ValueError("needs a 'type', e.g. {type: aws, region: us-west-2}")
        return value


class KubeRaySpec(ConfigModel):
    """What a KubeRay ``RayCluster`` manifest needs beyond the node resources."""

    namespace: str = Field("default", description="Kubernetes namespace of the RayCluster")
    service_account: str | None = Field(None, description="service account of the Ray pods")


class DeploySpec(ConfigModel):
    """Used only by ``aiaas cluster render``: how the cluster runs off this machine."""

    image: str = Field(
        "rayproject/ray:2.60.0-py311-cpu",
        description="container image of every node; use a -gpu image for GPU groups",
    )
    storage_root: str | None = Field(
        None,
        description="storage root shared by all nodes (s3:// or gs://); defaults to the "
        "top-level storage_root",
    )
    ray_up: RayUpSpec | None = Field(None, description="settings for --target ray-up")
    kuberay: KubeRaySpec = Field(
        default_factory=KubeRaySpec, description="settings for --target kuberay"
    )
