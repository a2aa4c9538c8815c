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
from cluster import environment, mlflow_service, ports, processes, redis_service, state

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
    with held(config):
        previous = state.load(config)
        if previous is not None:
            reused = _reuse(config, previous, echo)
            if reused is not None:
                return reused
        _preflight(config, config_path)
        return UpResult(state=_start(config, config_path, echo))


def down(config: ClusterConfig, echo: Echo = lambda _: None) -> DownResult:
    """Stop exactly the processes ``up`` started for this config, workers first."""
    with held(config):
        recorded = state.load(config)
        if recorded is None:
            return DownResult(found=False)
        count = 0
        # The supervisor first, or it would start again what is being stopped; Redis last, so
        # the GCS never sees its store vanish while it runs.
        by_group = _services_by_group(recorded)
        for group in (
            by_group["supervisor"],
            by_group["other"],
            recorded.workers(),
            [recorded.head()],
            by_group["redis"],
        ):
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


def _services_by_group(recorded: state.ClusterState) -> dict[str, list[state.NodeRecord]]:
    found: dict[str, list[state.NodeRecord]] = {"supervisor": [], "redis": [], "other": []}
    for service in recorded.services:
        found[service.group if service.group in found else "other"].append(service)
    return found


def plan(config: ClusterConfig) -> list[_PlannedNode]:
    """The nodes ``up`` starts, head first, with their names."""
    nodes = [_PlannedNode("head", "head", "head", config.head)]
    for group in config.worker_groups:
        for index in range(group.replicas):
            nodes.append(_PlannedNode(f"{group.name}-{index + 1}", "worker", group.name, group))
    return nodes


@contextmanager
def held(config: ClusterConfig, wait: bool = True) -> Iterator[bool]:
    """Hold the cluster's lock: two `up`s at once would both find no cluster and both start
    one, and the supervisor must not restart what `down` is stopping. Yields False (holding
    nothing) when ``wait`` is off and another process holds it."""
    lock_path = Path(config.temp_root).expanduser() / f"{config.name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("w")
    except OSError as exc:
        raise errors.ClusterError(
            f"cannot create {lock_path}: {exc}", "Set 'temp_root' to a writable directory."
        ) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _preflight(config: ClusterConfig, config_path: Path) -> None:
    wanted = [
        ("ports", name, getattr(config.ports, name)) for name in type(config.ports).model_fields
    ]
    if config.mlflow.enabled:
        wanted.append(("mlflow", "port", config.mlflow.port))
    if not config.gcs_fault_tolerance.enabled:
        wanted = [entry for entry in wanted if entry[1] != "redis"]
    elif redis_service.available() is None:
        raise errors.ClusterError(
            f"gcs_fault_tolerance is on in {config_path} but there is no redis-server on this "
            "machine",
            "Install it (make install does: Debian's redis-server), or set "
            f"'gcs_fault_tolerance: {{enabled: false}}' in {config_path}. Nothing was started.",
        )
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
    """Report the running cluster, restarting what was lost; None when it must start anew."""
    head = previous.head()
    head_alive = processes.leader(head.pid, head.create_time) is not None
    with Dashboard(previous.dashboard_url, config.auth_mode) as dashboard:
        if not survives_head(config, previous) and not (head_alive and dashboard.reachable()):
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
        return heal(config, previous, dashboard, echo)


def survives_head(config: ClusterConfig, recorded: state.ClusterState) -> bool:
    """A lost head is restarted in place: its GCS finds the cluster's state in Redis."""
    return config.gcs_fault_tolerance.enabled and any(
        service.group == redis_service.NAME for service in recorded.services
    )


def lost_parts(recorded: state.ClusterState) -> list[state.NodeRecord]:
    """Recorded nodes and services whose process is gone."""
    return [
        part
        for part in [*recorded.nodes, *recorded.services]
        if processes.leader(part.pid, part.create_time) is None
    ]


def heal(
    config: ClusterConfig,
    previous: state.ClusterState,
    dashboard: Dashboard,
    echo: Echo,
    skip: frozenset[str] = frozenset(),
) -> UpResult:
    """Start again every lost node and service of a recorded cluster, in the order they
    depend on each other: Redis, the head, the workers, the services; then put back what Ray
    could not keep. ``skip`` names parts the caller restarts itself (the supervisor)."""
    lost = [part for part in lost_parts(previous) if part.name not in skip]
    # A service recorded by an older aiaas without its command is forgotten, as before.
    dropped = [p for p in lost if p.role == "service" and not _restartable(p)]
    if dropped:
        echo(f"Forgetting lost service(s) that cannot be restarted: {[p.name for p in dropped]}")
        previous = previous.model_copy(
            update={"services": [s for s in previous.services if s not in dropped]}
        )
        state.save(config, previous)
        lost = [part for part in lost if part not in dropped]
    if not lost:
        return UpResult(state=previous, already_running=True)
    names = [part.name for part in lost]
    echo(f"Restarting lost part(s): {', '.join(names)}")
    processes.stop_sessions(_our_sessions(lost))
    by_name = {node.name: node for node in plan(config)}
    fresh: dict[str, state.NodeRecord] = {}
    started: list[state.NodeRecord] = []
    deadline = _deadline(config)
    try:
        for part in _in_start_order(lost):
            if part.role == "service":
                record = _restart_service(config, part, deadline)
            else:
                address = None if part.role == "head" else _worker_address(config)
                if part.role == "head":
                    # `ray start --head` refuses to start where its last address is recorded
                    # while a worker's raylet still names that GCS (they wait for it to return).
                    (Path(part.temp_dir) / "ray_current_cluster").unlink(missing_ok=True)
                record = _start_node(config, by_name[part.name], address)
                if part.role == "head":
                    _wait_alive(dashboard, [record], deadline)
            started.append(record)
            fresh[part.name] = record
        _wait_alive(dashboard, [r for r in started if r.role == "worker"], deadline)
    except BaseException:
        processes.stop_sessions([record.pid for record in started])
        raise
    current = previous.model_copy(
        update={
            "nodes": [fresh.get(node.name, node) for node in previous.nodes],
            "services": [fresh.get(node.name, node) for node in previous.services],
        }
    )
    state.save(config, current)
    return UpResult(state=current, restarted=names)


def _restartable(service: state.NodeRecord) -> bool:
    return service.group in (redis_service.NAME, "mlflow") or bool(service.command)


def _in_start_order(parts: list[state.NodeRecord]) -> list[state.NodeRecord]:
    rank = {"redis": 0, "head": 1, "worker": 2}
    return sorted(parts, key=lambda part: rank.get(part.group, rank.get(part.role, 3)))


def _restart_service(
    config: ClusterConfig, lost: state.NodeRecord, deadline: float
) -> state.NodeRecord:
    if lost.group == redis_service.NAME:
        record = redis_service.start(config)
        redis_service.wait_ready(config, record, deadline)
        return record
    if lost.group == "mlflow":
        record = mlflow_service.start(config)
        mlflow_service.wait_healthy(record, deadline)
        return record
    # Prometheus and the supervisor run again as they were started.
    env = environment.node_env(config)
    leader = processes.spawn(lost.command, env, Path(lost.log_path))
    record = lost.model_copy(update={"pid": leader.pid, "create_time": leader.create_time()})
    if lost.url:
        processes.wait_answering(
            lost.name,
            record.pid,
            record.create_time,
            f"{lost.url}{lost.health_path}",
            lost.log_path,
            deadline,
            f"See {lost.log_path}.",
        )
    return record


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
            if config.gcs_fault_tolerance.enabled:
                echo(f"Starting Redis for the GCS's state ({redis_service.address(config)}) ...")
                services.append(redis_service.start(config))
                redis_service.wait_ready(config, services[-1], deadline)
            echo(f"Starting head node (dashboard {config.dashboard_url()}) ...")
            started.append(_start_node(config, head_plan, None))
            _wait_alive(dashboard, started, deadline)
            if worker_plans:
                echo(f"Starting {len(worker_plans)} worker node(s) ...")
                workers = [
                    _start_node(config, node, _worker_address(config)) for node in worker_plans
                ]
                started.extend(workers)
            if config.mlflow.enabled:
                echo(f"Starting MLflow tracking server ({config.mlflow_url()}) ...")
                services.append(mlflow_service.start(config))
            _wait_alive(dashboard, started[1:], deadline)
            for service in services:
                if service.group == "mlflow":
                    mlflow_service.wait_healthy(service, deadline)
            head_ip = next(
                node["node_ip"] for node in dashboard.nodes() if node.get("is_head_node")
            )
            if config.gcs_fault_tolerance.enabled:
                services.append(_start_supervisor(config, config_path))
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


def _start_supervisor(config: ClusterConfig, config_path: Path) -> state.NodeRecord:
    """The process that restarts lost nodes and services (cluster/supervisor.py)."""
    log_path = environment.cluster_dir(config) / "supervisor.log"
    command = [
        sys.executable,
        "-m",
        "cluster.supervisor",
        str(config_path.resolve()),
        str(environment.cluster_dir(config)),  # in its command line: how down knows it as ours
    ]
    leader = processes.spawn(command, environment.node_env(config), log_path)
    return state.NodeRecord(
        name="supervisor",
        role="service",
        group="supervisor",
        pid=leader.pid,
        create_time=leader.create_time(),
        temp_dir=str(environment.cluster_dir(config)),
        log_path=str(log_path),
        command=command,
    )


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
    env = environment.node_env(config)
    if head_address is None:
        metrics_port = config.ports.metrics_export
        if config.gcs_fault_tolerance.enabled:
            env["RAY_REDIS_ADDRESS"] = redis_service.address(config)
            # Keys of this cluster's tables in a Redis that may serve several.
            env["RAY_external_storage_namespace"] = config.name
            # Ray tells its GCS the password on its command line; see cluster/redis_service.py.
            command.append(f"--redis-password={redis_service.password(config)}")
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
    leader = processes.spawn(command, env, log_path)
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


def _wait_alive(dashboard: Dashboard, nodes: list[state.NodeRecord], deadline: float) -> None:
    """Wait until every node is ALIVE in Ray, registered since its process started."""
    waiting = {node.name for node in nodes}
    while True:
        for node in nodes:
            if processes.leader(node.pid, node.create_time) is None:
                raise errors.ClusterError(
                    f"node '{node.name}' exited while starting; the last lines of "
                    f"{node.log_path}:\n{processes.log_tail(Path(node.log_path))}"
                )
        started = {node.name: node.create_time for node in nodes}
        try:
            # A restarted node has a new id; its old entry may still read ALIVE for a while
            # (the GCS finds its death late), so only an entry that began after it counts.
            alive = {
                entry["node_name"]
                for entry in dashboard.nodes()
                if entry["state"] == _ALIVE
                and entry.get("start_time_ms", 0) / 1000 >= started.get(entry["node_name"], 0) - 2
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
