"""Closed by default: the session cluster attacked the way an outsider would, from this machine's
own network address (Ray binds it, not loopback), with no token, a wrong one, and the right one.

Every listener of the cluster's processes on a non-loopback address is found at run time and
probed; each must either refuse work without the token or carry no control plane (a metrics
page). The probes only ask (no job without the token ever runs: markers prove it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from tests import support
from tests.e2e.conftest import RunningCluster

#: Methods of Ray's gRPC services: a server that checks tokens answers UNAUTHENTICATED to any of
#: its own methods; one that does not would answer something else (the empty request is invalid).
_GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.ObjectManagerService/Push",
    "/ray.rpc.CoreWorkerService/NumPendingTasks",
    "/ray.rpc.ReporterService/GetProfilingStats",
    "/ray.rpc.LogService/ListLogs",
    "/ray.rpc.RayletDriver/ClusterInfo",
    "/ray.rpc.RayletDataStreamer/Datapath",
    # Serve replicas' inter-deployment server.
    "/ray.serve.ASGIService/HandleRequest",
)
#: gRPC's standard health check answers "serving" to anyone and runs nothing.
_GRPC_HEALTH = "/grpc.health.v1.Health/Check"


def _machine_address(cluster: RunningCluster) -> str:
    address = cluster.gcs_address.rsplit(":", 1)[0]
    assert not ipaddress.ip_address(address).is_loopback, address
    return address


def _cluster_pids(cluster: RunningCluster) -> set[int]:
    state = cluster.state()
    sessions = {node["pid"] for node in [*state["nodes"], *state["services"]]}
    found = set()
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions:
                found.add(process.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _outside_listeners(cluster: RunningCluster) -> dict[int, str]:
    """Port → process name of every listener of the cluster not bound to loopback only."""
    pids = _cluster_pids(cluster)
    listeners = {}
    for connection in psutil.net_connections("inet"):
        if connection.status != psutil.CONN_LISTEN or connection.pid not in pids:
            continue
        host = connection.laddr.ip.removeprefix("::ffff:")
        if ipaddress.ip_address(host).is_loopback:
            continue
        try:
            listeners[connection.laddr.port] = psutil.Process(connection.pid).name()
        except psutil.Error:
            continue
    return listeners


def _classify(address: str, port: int) -> str:
    """What a stranger gets from ``address:port`` without a token."""
    try:
        answer = httpx.get(f"http://{address}:{port}/api/version", timeout=3)
    except httpx.HTTPError:
        return _classify_grpc(address, port)
    if answer.status_code in (401, 403):
        return f"HTTP, token required ({answer.status_code})"
    metrics = httpx.get(f"http://{address}:{port}/metrics", timeout=3)
    if metrics.status_code == 200 and metrics.text.startswith("# "):
        return "HTTP, Prometheus metrics only (no control plane)"
    return f"OPEN HTTP: /api/version answered {answer.status_code} {answer.text[:80]!r}"


def _classify_grpc(address: str, port: int) -> str:
    import grpc

    answers = {}
    with grpc.insecure_channel(f"{address}:{port}") as channel:
        for method in (*_GRPC_METHODS, _GRPC_HEALTH):
            try:
                channel.unary_unary(method)(b"", timeout=3)
                answers[method] = "OK"
            except grpc.RpcError as error:
                answers[method] = error.code().name
    own = {m: code for m, code in answers.items() if m != _GRPC_HEALTH and code != "UNIMPLEMENTED"}
    if own and set(own.values()) == {"UNAUTHENTICATED"}:
        return f"gRPC, token required ({', '.join(m.rsplit('/', 1)[1] for m in own)})"
    if set(answers.values()) == {"UNAVAILABLE"}:
        return "GONE: nothing answers any more"
    if not own:
        # A server that implements none of Ray's services runs nothing (a replica's server
        # between registering its service and shutting down, say).
        return "gRPC, serves no Ray method (runs nothing)"
    return f"OPEN gRPC: {own}"


def test_every_listener_on_the_machine_address_needs_the_token_or_is_metrics_only(
    cluster: RunningCluster,
) -> None:
    address = _machine_address(cluster)
    listeners = _outside_listeners(cluster)
    kinds = {port: (name, _classify(address, port)) for port, name in sorted(listeners.items())}
    # Processes come and go (a replica shutting down): judge what still listens afterwards.
    still = _outside_listeners(cluster)
    kinds = {
        port: kind
        for port, kind in kinds.items()
        if port in still or not kind[1].startswith(("GONE", "OPEN"))
    }
    table = "\n".join(f"  {port:>5}  {name:<28} {kind}" for port, (name, kind) in kinds.items())
    print(f"\nListeners of cluster e2e reachable at {address}:\n{table}")
    bad = {port: kind for port, (_, kind) in kinds.items() if not kind.startswith(("HTTP", "gRPC"))}
    assert not bad, f"listeners that answer without the token:\n{table}"
    state = cluster.state()
    # The ones that run code are among them, and each refuses: GCS, every agent, Ray Client.
    gcs_port = int(cluster.gcs_address.rsplit(":", 1)[1])
    assert kinds[gcs_port][1].startswith("gRPC, token required")
    for node in state["nodes"]:
        assert kinds[node["agent_port"]][1] == "HTTP, token required (401)", node["name"]
        assert kinds[node["metrics_export_port"]][1].startswith("HTTP, Prometheus metrics only")
    client_port = _config(cluster)["ports"]["client_server"]
    assert kinds[client_port][1].startswith("gRPC, token required")


def test_the_dashboard_is_on_loopback_only_and_its_jobs_api_needs_the_token(
    cluster: RunningCluster,
) -> None:
    port = _config(cluster)["ports"]["dashboard"]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://{_machine_address(cluster)}:{port}/api/jobs/", timeout=5)
    url = f"{cluster.dashboard_url}/api/jobs/"
    assert httpx.get(url, timeout=10).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer " + "0" * 64}, timeout=10)
    assert wrong.status_code == 403
    assert httpx.get(url, headers=cluster.headers, timeout=30).status_code == 200
    submitted = httpx.post(url, json={"entrypoint": "echo hi"}, timeout=10)
    assert submitted.status_code == 401


def test_no_nodes_dashboard_agent_runs_a_job_without_the_token(
    cluster: RunningCluster, tmp_path: Path
) -> None:
    address = _machine_address(cluster)
    for node in cluster.state()["nodes"]:
        marker = tmp_path / f"ran-{node['name']}"
        answer = httpx.post(
            f"http://{address}:{node['agent_port']}/api/job_agent/jobs/",
            json={"entrypoint": f"touch {marker}", "submission_id": f"attack-{uuid.uuid4().hex}"},
            timeout=10,
        )
        assert answer.status_code == 401, (node["name"], answer.status_code, answer.text)
        assert "Missing authentication token" in answer.text
    # With the token the head's agent takes the job (so the 401s above were the token's doing).
    marker = tmp_path / "ran-with-token"
    submission_id = f"with-token-{uuid.uuid4().hex[:8]}"
    head = next(node for node in cluster.state()["nodes"] if node["role"] == "head")
    accepted = httpx.post(
        f"http://{address}:{head['agent_port']}/api/job_agent/jobs/",
        json={"entrypoint": f"touch {marker}", "submission_id": submission_id},
        headers=cluster.headers,
        timeout=60,
    )
    assert accepted.status_code == 200, accepted.text
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, "the job the agent accepted never ran"
        time.sleep(1)
    assert not any(tmp_path.glob("ran-cpu-*")) and not (tmp_path / "ran-head").exists()


def _ray_client_probe(cluster: RunningCluster, env: dict[str, str], marker: Path) -> str:
    port = _config(cluster)["ports"]["client_server"]
    probe = (
        "import ray, pathlib\n"
        f"ray.init('ray://{_machine_address(cluster)}:{port}', logging_level='ERROR')\n"
        f"ray.get(ray.remote(lambda: pathlib.Path({str(marker)!r}).touch()).remote())\n"
        "print('ran')\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", probe],
            env=support.env(env),
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "timed out"
    return result.stdout + result.stderr


def test_ray_client_runs_nothing_without_the_token(cluster: RunningCluster, tmp_path: Path) -> None:
    marker = tmp_path / "client-ran"
    refused = _ray_client_probe(cluster, {"RAY_AUTH_MODE": "disabled"}, marker)
    assert "ran" not in refused.split() and not marker.exists(), refused
    wrong = _ray_client_probe(
        cluster, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, marker
    )
    assert "ran" not in wrong.split() and not marker.exists(), wrong
    # Ray's client proxier forks a server per client; once in CI that fork died inside gRPC
    # ("Check failed: next_worker->state == KICKED" in ray_client_server.err) and the client
    # waited in vain. A second client gets a new server: one retry, never for the refusals.
    for _ in range(2):
        accepted = _ray_client_probe(cluster, cluster.ray_env, marker)
        if "ran" in accepted.split():
            break
    assert "ran" in accepted.split() and marker.exists(), accepted


def test_ray_status_needs_the_token_and_works_with_the_printed_line(
    cluster: RunningCluster,
) -> None:
    address = f"{_machine_address(cluster)}:{cluster.gcs_address.rsplit(':', 1)[1]}"
    refused = support.run("ray", "status", "--address", address, timeout=120)
    assert refused.returncode != 0
    assert "InvalidAuthToken" in refused.stdout + refused.stderr
    wrong = support.run(
        "ray",
        "status",
        "--address",
        address,
        timeout=120,
        ray_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
    )
    assert wrong.returncode != 0
    # The line `aiaas cluster env` prints is what makes Ray's own CLI work.
    line = support.run("aiaas", "cluster", "env", str(cluster.config_path))
    assert line.returncode == 0, line.stderr
    exported = dict(
        item.split("=", 1) for item in line.stdout.split(";")[0].removeprefix("export ").split()
    )
    assert exported == cluster.ray_env
    status = support.run("ray", "status", "--address", address, timeout=120, ray_env=exported)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Active:" in status.stdout
    # Serve's CLI talks to the dashboard's REST API: refused without the line, fine with it.
    serve_refused = support.run("serve", "status", "-a", cluster.dashboard_url, timeout=120)
    assert serve_refused.returncode != 0
    served = support.run(
        "serve", "status", "-a", cluster.dashboard_url, timeout=120, ray_env=exported
    )
    assert served.returncode == 0, served.stdout + served.stderr


def test_the_token_file_is_private_and_never_in_a_nodes_environment(
    cluster: RunningCluster,
) -> None:
    token_path = Path(cluster.ray_env["RAY_AUTH_TOKEN_PATH"])
    assert token_path.stat().st_mode & 0o777 == 0o600
    token = token_path.read_text().strip()
    for pid in _cluster_pids(cluster):
        try:
            environ = psutil.Process(pid).environ()
        except psutil.Error:
            continue
        assert token not in json.dumps(environ), psutil.Process(pid).cmdline()[:3]
        assert environ.get("RAY_AUTH_MODE") in (None, "token")


def _config(cluster: RunningCluster) -> dict:
    import yaml

    return dict(yaml.safe_load(cluster.config_path.read_text()))
