"""``aiaas cluster up`` / ``down``: a real multi-node Ray cluster as ``ray start`` processes here.

Each node is a ``ray start --block`` process in a session of its own, with its own temp dir and
ports, and the project's virtualenv first on its PATH so job entrypoints' ``python`` has Ray,
torch and aiaas. A failed start stops whatever it had started before the error is shown.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from aiaas import errors, ray_auth
from aiaas.config.cluster import ClusterConfig, NodeSpec
from aiaas.dashboard import Dashboard
from cluster import environment, mlflow_service, ports, processes, state

# Ray puts "session_<date>_<time>_<pid>/sockets/plasma_store" (~64 characters) under a node's
# temp dir, and Unix socket paths stop at 107 characters.
_MAX_TEMP_DIR = 42
_ALIVE = "ALIVE"

Echo = Callable[[str], None]


@dataclass
class UpResult:
    """What ``up`` did."""

    state: state.ClusterState
    already_running: bool = False
    restarted: list[str] = field(default_factory=list)


@dataclass
class DownResult:
    """What ``down`` stopped."""

    found: bool
    nodes: list[str] = field(default_factory=list)
    processes: int = 0


@dataclass
class _PlannedNode:
    name: str
    role: str
    group: str
    spec: NodeSpec


def up(config: ClusterConfig, config_path: Path, echo: Echo = lambda _: None) -> UpResult:
    """Start the cluster, or report (and repair) the one already running from this config.

    Raises:
        PortInUseError: A configured port is taken; nothing was started.
        ClusterError: A node did not come up; everything started was stopped again.
    """
    with _lock(config):
        previous = state.load(config)
        if previous is not None:
            reused = _reuse(config, previous, echo)
            if reused is not None:
                return reused
        _preflight(config, config_path)
        return UpResult(state=_start(config, config_path, echo))


def down(config: ClusterConfig, echo: Echo = lambda _: None) -> DownResult:
    """Stop exactly the processes ``up`` started for this config, workers first."""
    with _lock(config):
        recorded = state.load(config)
        if recorded is None:
            return DownResult(found=False)
        count = 0
        for group in (recorded.services, recorded.workers(), [recorded.head()]):
            sessions = _our_sessions(group)
            if sessions:
                echo(f"Stopping {', '.join(node.name for node in group)} ...")
                count += processes.stop_sessions(sessions)
        left = processes.session_members(_our_sessions([*recorded.nodes, *recorded.services]))
        if left:
            raise errors.ClusterError(
                f"{len(left)} process(es) of cluster '{config.name}' did not stop: "
                + ", ".join(str(process.pid) for process in left),
                "Stop them by hand (kill -9 PID) and run 'aiaas cluster down' again.",
            )
        state.forget(config)
        shutil.rmtree(recorded.cluster_dir, ignore_errors=True)
        shutil.rmtree(environment.haproxy_dir(config), ignore_errors=True)
        return DownResult(found=True, nodes=[node.name for node in recorded.nodes], processes=count)


def plan(config: ClusterConfig) -> list[_PlannedNode]:
    """The nodes ``up`` starts, head first, with their names."""
    nodes = [_PlannedNode("head", "head", "head", config.head)]
    for group in config.worker_groups:
        for index in range(group.replicas):
            nodes.append(_PlannedNode(f"{group.name}-{index + 1}", "worker", group.name, group))
    return nodes


@contextmanager
def _lock(config: ClusterConfig) -> Iterator[None]:
    # Two `up`s at once would both find no cluster and both start one.
    lock_path = Path(config.temp_root).expanduser() / f"{config.name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("w")
    except OSError as exc:
        raise errors.ClusterError(
            f"cannot create {lock_path}: {exc}", "Set 'temp_root' to a writable directory."
        ) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _preflight(config: ClusterConfig, config_path: Path) -> None:
    wanted = [
        ("ports", name, getattr(config.ports, name)) for name in type(config.ports).model_fields
    ]
    if config.mlflow.enabled:
        wanted.append(("mlflow", "port", config.mlflow.port))
    for section, name, port in wanted:
        if not ports.is_free(port):
            raise errors.PortInUseError(
                f"port {port} ({section}.{name} in {config_path}) is in use by "
                f"{ports.holder(port)}",
                f"Stop that process, or set another port under '{section}: {name}:' in "
                f"{config_path}. Nothing was started.",
            )
    longest = max(len(str(environment.cluster_dir(config) / node.name)) for node in plan(config))
    if longest > _MAX_TEMP_DIR:
        raise errors.ConfigError(
            f"temp_root in {config_path} gives node temp dirs of {longest} characters; Ray's "
            f"socket paths need them under {_MAX_TEMP_DIR + 1}",
            "Set a shorter 'temp_root' (e.g. /tmp/aiaas) or a shorter cluster 'name'.",
        )
    sockets = len(str(environment.haproxy_dir(config))) + environment.HAPROXY_SOCKET_SUFFIX
    if config.serve_ingress == "haproxy" and sockets > environment.HAPROXY_SOCKET_PATH_MAX:
        raise errors.ConfigError(
            f"temp_root in {config_path} gives Serve's HAProxy socket paths of {sockets} "
            f"characters; HAProxy takes at most {environment.HAPROXY_SOCKET_PATH_MAX}",
            "Set a shorter 'temp_root' (e.g. /tmp/aiaas), or serve_ingress: proxy.",
        )
    object_stores = sum(node.spec.object_store_memory for node in plan(config))
    total = psutil.virtual_memory().total
    if object_stores > 0.8 * total:
        raise errors.ConfigError(
            f"the object stores in {config_path} add up to {object_stores / 2**30:.1f} GiB, more "
            f"than 80% of this machine's {total / 2**30:.1f} GiB",
            "Lower 'object_store_memory' of the head or the worker groups.",
        )
    if not (environment.venv_bin() / "ray").exists():
        raise errors.ClusterError(
            f"no 'ray' executable beside {sys.executable}",
            "Run aiaas from the project's virtualenv (make demo sets it up).",
        )


def _reuse(config: ClusterConfig, previous: state.ClusterState, echo: Echo) -> UpResult | None:
    """Report the running cluster, restarting lost workers; None when it must start anew."""
    head = previous.head()
    head_alive = processes.leader(head.pid, head.create_time) is not None
    with Dashboard(previous.dashboard_url, config.auth_mode) as dashboard:
        if not (head_alive and dashboard.reachable()):
            echo(f"Cluster '{config.name}' was recorded but its head is gone; cleaning up.")
            processes.stop_sessions(_our_sessions([*previous.nodes, *previous.services]))
            state.forget(config)
            return None
        if previous.config_hash != state.config_hash(config):
            raise errors.ClusterError(
                f"cluster '{config.name}' is running with a different config (started from "
                f"{previous.config_path})",
                "Run 'aiaas cluster down' first to apply the new config.",
            )
        lost = [
            node
            for node in previous.workers()
            if processes.leader(node.pid, node.create_time) is None
        ]
        lost_services = [
            service
            for service in previous.services
            if processes.leader(service.pid, service.create_time) is None
        ]
        # Only MLflow comes back with the cluster; a lost Prometheus is `aiaas monitor up`'s.
        dropped = [service for service in lost_services if service.group != "mlflow"]
        lost_services = [service for service in lost_services if service.group == "mlflow"]
        if dropped:
            previous = previous.model_copy(
                update={"services": [s for s in previous.services if s not in dropped]}
            )
            state.save(config, previous)
        if not lost and not lost_services:
            return UpResult(state=previous, already_running=True)
        names = [node.name for node in [*lost, *lost_services]]
        echo(f"Restarting lost part(s): {', '.join(names)}")
        processes.stop_sessions(_our_sessions([*lost, *lost_services]))
        by_name = {node.name: node for node in plan(config)}
        known = {node["node_id"] for node in dashboard.nodes()}
        restarted = [
            _start_node(config, by_name[node.name], _worker_address(config)) for node in lost
        ]
        services = [mlflow_service.start(config) for _ in lost_services]
        try:
            _wait_alive(dashboard, restarted, known, _deadline(config))
            for service in services:
                mlflow_service.wait_healthy(service, _deadline(config))
        except BaseException:
            processes.stop_sessions([node.pid for node in [*restarted, *services]])
            raise
    fresh = {node.name: node for node in [*restarted, *services]}
    current = previous.model_copy(
        update={
            "nodes": [fresh.get(node.name, node) for node in previous.nodes],
            "services": [fresh.get(node.name, node) for node in previous.services],
        }
    )
    state.save(config, current)
    return UpResult(state=current, restarted=names)


def _start(config: ClusterConfig, config_path: Path, echo: Echo) -> state.ClusterState:
    started: list[state.NodeRecord] = []
    services: list[state.NodeRecord] = []
    deadline = _deadline(config)
    if config.auth_mode == "token":
        # Before any node: every process of the cluster reads the same file.
        ray_auth.ensure_token(config)
    try:
        with Dashboard(config.dashboard_url(), config.auth_mode) as dashboard:
            head_plan, *worker_plans = plan(config)
            echo(f"Starting head node (dashboard {config.dashboard_url()}) ...")
            started.append(_start_node(config, head_plan, None))
            _wait_alive(dashboard, started, set(), deadline)
            if worker_plans:
                echo(f"Starting {len(worker_plans)} worker node(s) ...")
                workers = [
                    _start_node(config, node, _worker_address(config)) for node in worker_plans
                ]
                started.extend(workers)
            if config.mlflow.enabled:
                echo(f"Starting MLflow tracking server ({config.mlflow_url()}) ...")
                services.append(mlflow_service.start(config))
            _wait_alive(dashboard, started[1:], set(), deadline)
            for service in services:
                mlflow_service.wait_healthy(service, deadline)
            head_ip = next(
                node["node_ip"] for node in dashboard.nodes() if node.get("is_head_node")
            )
    except BaseException:
        # Never leave half a cluster behind, whatever interrupted the start.
        if started:
            # Stop first: the echo itself may fail (a closed stdout) and must not skip this.
            processes.stop_sessions([node.pid for node in [*services, *started]])
            with contextlib.suppress(Exception):
                echo("Start failed; stopped the nodes already started.")
        raise
    current = state.ClusterState(
        name=config.name,
        config_path=str(config_path.resolve()),
        config_hash=state.config_hash(config),
        started_at=time.time(),
        gcs_address=f"{head_ip}:{config.ports.gcs}",
        dashboard_url=config.dashboard_url(),
        cluster_dir=str(environment.cluster_dir(config)),
        nodes=started,
        services=services,
    )
    state.save(config, current)
    return current


def _worker_address(config: ClusterConfig) -> str:
    # The GCS listens on every interface; loopback always reaches it on this machine.
    return f"127.0.0.1:{config.ports.gcs}"


def _deadline(config: ClusterConfig) -> float:
    return time.monotonic() + config.startup_timeout_s


def _start_node(
    config: ClusterConfig, node: _PlannedNode, head_address: str | None
) -> state.NodeRecord:
    temp_dir = environment.cluster_dir(config) / node.name
    temp_dir.mkdir(parents=True, exist_ok=True)
    spec = node.spec
    command = [
        str(environment.venv_bin() / "ray"),
        "start",
        "--block",
        "--disable-usage-stats",
        f"--node-name={node.name}",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={spec.num_cpus}",
        f"--num-gpus={spec.num_gpus}",
        f"--memory={int(spec.memory)}",
        f"--object-store-memory={int(spec.object_store_memory)}",
    ]
    if spec.resources:
        command.append(f"--resources={json.dumps(spec.resources)}")
    if spec.labels:
        command.append("--labels=" + ",".join(f"{k}={v}" for k, v in spec.labels.items()))
    taken = set(config.ports.model_dump().values()) | {config.mlflow.port}
    # Ray's dashboard agent listens on 52365 unless told otherwise: a second node or cluster on
    # this machine would then have no agent, and the Jobs API answers "No available agent".
    agent_port = ports.pick_free(1, avoid=taken)[0]
    command.append(f"--dashboard-agent-listen-port={agent_port}")
    taken.add(agent_port)
    if head_address is None:
        metrics_port = config.ports.metrics_export
        command += [
            "--head",
            f"--port={config.ports.gcs}",
            f"--dashboard-host={config.dashboard_host}",
            f"--dashboard-port={config.ports.dashboard}",
            f"--ray-client-server-port={config.ports.client_server}",
        ]
    else:
        # A fixed, recorded port per worker so Prometheus and status can name it.
        metrics_port = ports.pick_free(1, avoid=taken)[0]
        command.append(f"--address={head_address}")
    command.append(f"--metrics-export-port={metrics_port}")
    log_path = temp_dir / "ray-start.log"
    leader = processes.spawn(command, environment.node_env(config), log_path)
    return state.NodeRecord(
        name=node.name,
        role=node.role,
        group=node.group,
        pid=leader.pid,
        create_time=leader.create_time(),
        temp_dir=str(temp_dir),
        log_path=str(log_path),
        metrics_export_port=metrics_port,
        agent_port=agent_port,
    )


def _wait_alive(
    dashboard: Dashboard, nodes: list[state.NodeRecord], known_ids: set[str], deadline: float
) -> None:
    """Wait until every node is ALIVE in Ray (as a node id not in ``known_ids``)."""
    waiting = {node.name for node in nodes}
    while True:
        for node in nodes:
            if processes.leader(node.pid, node.create_time) is None:
                raise errors.ClusterError(
                    f"node '{node.name}' exited while starting; the last lines of "
                    f"{node.log_path}:\n{processes.log_tail(Path(node.log_path))}"
                )
        try:
            alive = {
                entry["node_name"]
                for entry in dashboard.nodes()
                if entry["state"] == _ALIVE and entry["node_id"] not in known_ids
            }
        except errors.ClusterError:
            alive = set()  # the dashboard is not up yet
        if waiting <= alive:
            return
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(waiting - alive))
            logs = "\n".join(f"  {node.log_path}" for node in nodes if node.name in waiting - alive)
            raise errors.ClusterError(
                f"timed out waiting for node(s) {missing} to be alive; their logs:\n{logs}",
                "Raise 'startup_timeout_s' in the cluster config if this machine is slow.",
            )
        time.sleep(0.5)


def _our_sessions(nodes: list[state.NodeRecord]) -> list[int]:
    """Session ids that are really this cluster's, never a reused pid's."""
    sessions = []
    for node in nodes:
        if processes.leader(node.pid, node.create_time) is not None:
            sessions.append(node.pid)
            continue
        # The leader is gone; its session is still ours if a member works in our temp dir
        # (an orphaned log monitor or raylet), and never if the pid was reused by a stranger.
        for member in processes.session_members([node.pid]):
            try:
                if any(node.temp_dir in part for part in member.cmdline()):
                    sessions.append(node.pid)
                    break
            except psutil.Error:
                continue
    return sessions
