"""`aiaas cluster up | status | down` against real `ray start` nodes on this machine."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import psutil
import yaml

from tests import support
from tests.e2e.conftest import RunningCluster, start, stop


def test_up_gives_three_alive_nodes_with_configured_resources(cluster: RunningCluster) -> None:
    alive = [
        node for node in support.ray_nodes(cluster.gcs_address, cluster.ray_env) if node["Alive"]
    ]
    by_name = {node["NodeName"]: node for node in alive}
    assert sorted(by_name) == ["cpu-1", "cpu-2", "head"]
    assert by_name["head"]["Resources"]["CPU"] == 1
    for worker in ("cpu-1", "cpu-2"):
        resources = by_name[worker]["Resources"]
        assert (resources["CPU"], resources["edge"], resources["memory"]) == (1, 1, 2**30)
        assert by_name[worker]["Labels"]["zone"] == "a"
    # Each node has its own temp dir under the cluster's own temp root.
    temp_dirs = {node["name"]: node["temp_dir"] for node in cluster.state()["nodes"]}
    assert len(set(temp_dirs.values())) == 3
    assert all(path.startswith(cluster.temp_root) for path in temp_dirs.values())


def test_second_up_reports_the_running_cluster(cluster: RunningCluster) -> None:
    before = cluster.state()["nodes"]
    result = support.run("aiaas", "cluster", "up", str(cluster.config_path))
    assert result.returncode == 0, result.stderr
    assert "Cluster 'e2e' is already running (3 nodes)." in result.stdout
    assert f"Dashboard / Jobs API: {cluster.dashboard_url}" in result.stdout
    assert cluster.state()["nodes"] == before


def test_status_shows_nodes_jobs_and_serve_apps(cluster: RunningCluster) -> None:
    result = support.run("aiaas", "cluster", "status", str(cluster.config_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Nodes (3 alive):" in out
    for name in ("head", "cpu-1", "cpu-2"):
        assert f"  {name}" in out
    assert "{'edge': 1.0}" in out
    for node in cluster.state()["nodes"]:
        assert f"pid={node['pid']} metrics=:{node['metrics_export_port']}" in out
    assert "Jobs: 0 running of" in out
    assert "Serve applications: 0" in out


def test_ray_job_submit_uses_the_project_environment_and_a_small_upload(
    cluster: RunningCluster,
) -> None:
    probe = (
        "import os, aiaas, torch, sys; "
        "size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk('.') for f in fs); "
        "print('UPLOAD', size, sorted(os.listdir('.'))); print('PYTHON', sys.executable)"
    )
    result = support.ray_job_submit(
        cluster.dashboard_url, "python", "-c", probe, ray_env=cluster.ray_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    upload = next(line for line in result.stdout.splitlines() if line.startswith("UPLOAD"))
    size = int(upload.split()[1])
    assert size < 5 * 2**20, upload
    assert ".venv" not in upload and "__pycache__" not in upload
    python = next(line for line in result.stdout.splitlines() if line.startswith("PYTHON"))
    assert (
        python == f"PYTHON {support.BIN / 'python3'}"
        or python == f"PYTHON {support.BIN / 'python'}"
    )


def test_demo_job_runs_a_task_on_every_node(cluster: RunningCluster) -> None:
    result = support.ray_job_submit(
        cluster.dashboard_url, "python", "-m", "jobs.node_report", ray_env=cluster.ray_env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 3 tasks on 3 nodes" in result.stdout
    for name in ("head", "cpu-1", "cpu-2"):
        assert f"  node {name:<10}" in result.stdout


def test_a_lost_worker_is_restarted_without_a_command(cluster: RunningCluster) -> None:
    lost = next(node for node in cluster.state()["nodes"] if node["name"] == "cpu-2")
    members = [p for p in psutil.process_iter() if _sid(p.pid) == lost["pid"]]
    for process in members:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(members, timeout=10)
    deadline = time.monotonic() + 90
    while cluster.state()["nodes"][2]["pid"] == lost["pid"]:
        assert time.monotonic() < deadline, "the supervisor did not restart cpu-2"
        time.sleep(0.5)
    # `cluster up` finds the cluster whole again (the supervisor restarted the node in place).
    result = support.run("aiaas", "cluster", "up", str(cluster.config_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "already running" in result.stdout, result.stdout
    alive = {
        node["NodeName"]
        for node in support.ray_nodes(cluster.gcs_address, cluster.ray_env)
        if node["Alive"]
    }
    assert alive == {"head", "cpu-1", "cpu-2"}
    log = Path(cluster.state()["cluster_dir"]) / "supervisor.log"
    assert "restarted: cpu-2" in log.read_text()


def test_down_stops_exactly_what_up_started(tmp_path: Path) -> None:
    bystander = psutil.Process(os.getpid())  # a process of ours that down must not touch
    small = start(tmp_path, "solo", workers=1)
    try:
        _check_down_stops_everything(small, bystander)
    finally:
        # A failed check must not leave a second cluster running beside the rest of the suite.
        if small.state_path.exists():
            support.run("aiaas", "cluster", "down", str(small.config_path))


def _check_down_stops_everything(small: RunningCluster, bystander: psutil.Process) -> None:
    assert support.processes_under(small.temp_root), "the cluster should be running"
    # A second cluster beside the session's one takes jobs too (no shared agent port).
    second = support.ray_job_submit(
        small.dashboard_url, "python", "-c", "print('second ok')", ray_env=small.ray_env
    )
    assert second.returncode == 0 and "second ok" in second.stdout, second.stdout + second.stderr
    # Prometheus from `monitor up` is stopped by `cluster down` too (its port is checked below).
    monitored = support.run("aiaas", "monitor", "up", "--cluster", str(small.config_path))
    assert monitored.returncode == 0, monitored.stdout + monitored.stderr
    assert [s["name"] for s in small.state()["services"]] == [
        "redis",
        "mlflow",
        "supervisor",
        "prometheus",
    ]
    sessions = [node["pid"] for node in [*small.state()["nodes"], *small.state()["services"]]]
    config = yaml.safe_load(small.config_path.read_text())
    ports = {**config["ports"], "mlflow": config["mlflow"]["port"]}
    stop(small)
    assert not small.state_path.exists()
    assert all(_sid_members(sid) == [] for sid in sessions)
    assert bystander.is_running()
    for port in ports.values():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("0.0.0.0", port))
    result = support.run("aiaas", "cluster", "down", str(small.config_path))
    assert result.returncode == 0
    assert "No cluster 'solo' is recorded" in result.stdout


def test_taken_port_fails_cleanly(tmp_path: Path) -> None:
    config_path = support.write_cluster_config(tmp_path, "busy", workers=1)
    config = yaml.safe_load(config_path.read_text())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", config["ports"]["gcs"]))
        holder.listen()
        result = support.run("aiaas", "cluster", "up", str(config_path))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"Error: port {config['ports']['gcs']} (ports.gcs in {config_path}) is in use by pid {os.getpid()}"
    )
    assert "Traceback" not in result.stderr
    assert support.processes_under(config["temp_root"]) == []
    assert not (Path(config["storage_root"]) / "clusters" / "busy" / "state.json").exists()


def test_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    # The head needs ~5 s; a 2 s budget fails after its processes have started.
    config_path = support.write_cluster_config(tmp_path, "slow", workers=1, startup_timeout_s=2)
    config = yaml.safe_load(config_path.read_text())
    result = support.run("aiaas", "cluster", "up", str(config_path))
    assert result.returncode == 1
    assert "Error: timed out waiting for node(s) head to be alive; their logs:" in result.stderr
    assert "Start failed; stopped the nodes already started." in result.stdout
    assert support.processes_under(config["temp_root"]) == []
    assert not (Path(config["storage_root"]) / "clusters" / "slow" / "state.json").exists()


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _sid_members(sid: int) -> list[int]:
    members = []
    for process in psutil.process_iter(["status"]):
        if _sid(process.pid) == sid and process.info["status"] != psutil.STATUS_ZOMBIE:
            members.append(process.pid)
    return members
