"""`aiaas cluster render`: ray-up YAML checked against Ray's own schema, KubeRay manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from aiaas import errors
from aiaas.config import loader
from aiaas.config.cluster import ClusterConfig
from aiaas_cli.main import cli
from cluster import render

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "cluster" / "local.yaml"


def _config(**changes: object) -> ClusterConfig:
    base = loader.load(LOCAL, ClusterConfig)
    return ClusterConfig.model_validate({**base.model_dump(), **changes})


def test_ray_up_passes_rays_schema_and_keeps_resources() -> None:
    rendered = render.ray_up(_config(), LOCAL)  # validates against ray-schema.json
    assert rendered["cluster_name"] == "local"
    assert rendered["provider"] == {"type": "aws", "region": "us-west-2"}
    head, cpu = rendered["available_node_types"]["head"], rendered["available_node_types"]["cpu"]
    assert head["resources"] == {"CPU": 1, "memory": 4 * 2**30}
    assert cpu["resources"] == {"CPU": 2, "memory": 4 * 2**30}
    assert (cpu["min_workers"], cpu["max_workers"], rendered["max_workers"]) == (2, 4, 4)
    assert cpu["node_config"] == {"InstanceType": "m5.xlarge"}
    start = rendered["head_start_ray_commands"][1]
    assert "AIAAS_STORAGE_ROOT=s3://my-bucket/aiaas" in start
    assert "--port=6379" in start and "--metrics-export-port=8090" in start


def test_ray_up_gpu_group_and_custom_resources() -> None:
    base = _config().model_dump()
    group = {**base["worker_groups"][0], "name": "gpu", "num_gpus": 4, "resources": {"a100": 4}}
    rendered = render.ray_up(
        _config(
            worker_groups=[group],
            deploy={
                **base["deploy"],
                "ray_up": {"provider": {"type": "gcp", "region": "us-central1", "project_id": "p"}},
            },
        ),
        LOCAL,
    )
    assert rendered["available_node_types"]["gpu"]["resources"] == {
        "CPU": 2,
        "memory": 4 * 2**30,
        "GPU": 4,
        "a100": 4,
    }


def test_ray_up_schema_violation_names_the_field() -> None:
    deploy = {**_config().model_dump()["deploy"], "ray_up": {"provider": {"type": 42}}}
    with pytest.raises(errors.ConfigError) as caught:
        render.ray_up(_config(deploy=deploy), LOCAL)
    assert str(caught.value).startswith(
        f"{LOCAL}: the rendered ray-up config breaks Ray's schema at provider.type: 42 is not of type 'string'"
    )


def test_ray_up_needs_a_provider() -> None:
    deploy = {**_config().model_dump()["deploy"], "ray_up": None}
    with pytest.raises(errors.ConfigError) as caught:
        render.ray_up(_config(deploy=deploy), LOCAL)
    assert str(caught.value).startswith(
        f"{LOCAL}: 'deploy.ray_up' is missing; rendering for ray up needs a provider"
    )


def test_ray_up_unknown_group_in_node_configs() -> None:
    deploy = _config().model_dump()["deploy"]
    deploy["ray_up"]["worker_node_configs"] = {"gpus": {}}
    with pytest.raises(errors.ConfigError) as caught:
        render.ray_up(_config(deploy=deploy), LOCAL)
    assert "names unknown worker group(s) gpus" in str(caught.value)


def test_kuberay_manifest() -> None:
    manifest = render.kuberay(_config())
    assert (manifest["apiVersion"], manifest["kind"]) == ("ray.io/v1", "RayCluster")
    spec = manifest["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "1"
    assert head["rayStartParams"]["object-store-memory"] == str(2**30)
    container = head["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "4Gi"}
    assert {"name": "AIAAS_STORAGE_ROOT", "value": "s3://my-bucket/aiaas"} in container["env"]
    # Off this machine Serve's HAProxy gets the cluster config's settings too.
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure empty-response"
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    [workers] = spec["workerGroupSpecs"]
    assert (workers["groupName"], workers["replicas"], workers["maxReplicas"]) == ("cpu", 2, 4)
    assert workers["template"]["spec"]["volumes"] == [
        {"name": "shm", "emptyDir": {"medium": "Memory"}}
    ]


def test_kuberay_gpu_limits() -> None:
    group = {**_config().model_dump()["worker_groups"][0], "num_gpus": 2}
    manifest = render.kuberay(_config(worker_groups=[group]))
    limits = manifest["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resources"
    ]["limits"]
    assert limits["nvidia.com/gpu"] == "2"


def test_render_cli_writes_yaml_and_warns_on_local_storage(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    data = yaml.safe_load(LOCAL.read_text())
    data["deploy"].pop("storage_root")
    config.write_text(yaml.safe_dump(data))
    output = tmp_path / "cluster.yaml"
    result = CliRunner().invoke(
        cli, ["cluster", "render", str(config), "--target", "ray-up", "-o", str(output)]
    )
    assert result.exit_code == 0, result.output
    assert "Warning: storage root '~/.aiaas' is local to each machine" in result.output
    assert yaml.safe_load(output.read_text())["head_node_type"] == "head"
    assert f"ray up {output}" in result.output


def test_ray_up_turns_token_auth_on_with_rays_token_file_never_inline() -> None:
    rendered = render.ray_up(_config(), LOCAL)
    for command in (
        rendered["head_start_ray_commands"][1],
        rendered["worker_start_ray_commands"][1],
    ):
        assert "RAY_AUTH_MODE=token" in command
        assert "RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token" in command
        assert "RAY_AUTH_TOKEN=" not in command
    # ray up copies Ray's default token file (ray get-auth-token --generate) to every node.
    assert rendered["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--dashboard-host=0.0.0.0" in rendered["head_start_ray_commands"][1]


def test_kuberay_takes_the_token_from_a_secret_and_never_inline() -> None:
    manifest = render.kuberay(_config())
    assert manifest["spec"]["authOptions"] == {"mode": "token", "secretName": "local-ray-auth"}
    text = yaml.safe_dump(manifest)
    assert "RAY_AUTH_TOKEN" not in text
    steps = render.next_steps(_config(), "kuberay", Path("c.yaml"))
    assert steps[0].startswith("kubectl create secret generic local-ray-auth -n default")


def test_a_cluster_without_auth_binds_no_dashboard_to_every_interface() -> None:
    config = _config(auth_mode="disabled")
    ray_up = render.ray_up(config, LOCAL)
    assert "--dashboard-host=127.0.0.1" in ray_up["head_start_ray_commands"][1]
    assert "RAY_AUTH_MODE=disabled" in ray_up["head_start_ray_commands"][1]
    assert "/home/ray/.ray/auth_token" not in ray_up["file_mounts"]
    kuberay = render.kuberay(config)
    assert kuberay["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert kuberay["spec"]["authOptions"] == {"mode": "disabled"}
    assert any("auth_mode: disabled" in warning for warning in render.warnings(config))


def test_gcs_fault_tolerance_renders_an_external_redis_with_its_password_by_reference() -> None:
    config = _config(gcs_fault_tolerance={"redis_address": "redis.internal:6379"})
    kuberay = render.kuberay(config)
    assert kuberay["spec"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.internal:6379",
        "redisPassword": {
            "valueFrom": {"secretKeyRef": {"name": "local-redis", "key": "password"}}
        },
        "externalStorageNamespace": "local",
    }
    env = {
        e["name"]: e["value"]
        for e in kuberay["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["RAY_gcs_rpc_server_reconnect_timeout_s"] == "120"
    steps = render.next_steps(config, "kuberay", Path("c.yaml"))
    assert steps[-1] == "kubectl apply -f c.yaml"
    assert any(step.startswith("kubectl create secret generic local-redis") for step in steps)
    assert not any("redis_address is unset" in w for w in render.warnings(config))

    ray_up = render.ray_up(config, LOCAL)
    head = ray_up["head_start_ray_commands"][1]
    assert "RAY_REDIS_ADDRESS=redis.internal:6379" in head
    assert "RAY_external_storage_namespace=local" in head
    assert '--redis-password="$(cat /home/ray/.ray/redis_password)"' in head
    assert ray_up["file_mounts"]["/home/ray/.ray/redis_password"] == "~/.ray/redis_password"
    assert "RAY_REDIS_ADDRESS" not in ray_up["worker_start_ray_commands"][1]
    assert render.next_steps(config, "ray-up", Path("c.yaml"))[-1] == "ray up c.yaml"


def test_gcs_fault_tolerance_off_renders_no_redis_and_unset_address_is_warned() -> None:
    assert any("redis_address is unset" in w for w in render.warnings(_config()))
    config = _config(gcs_fault_tolerance={"enabled": False})
    assert "gcsFaultToleranceOptions" not in render.kuberay(config)["spec"]
    assert "RAY_REDIS_ADDRESS" not in render.ray_up(config, LOCAL)["head_start_ray_commands"][1]
    assert not any("redis" in w for w in render.warnings(config))
