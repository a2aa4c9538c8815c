"""The `aiaas` command's contract: fast lazy help, exit codes, `Error:` lines, dry runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from aiaas_cli.main import cli

REPO = Path(__file__).resolve().parents[2]


def test_help_imports_neither_torch_nor_ray() -> None:
    # Every group's and every command's --help: the whole CLI package stays light.
    probe = (
        "import sys\n"
        "import click\n"
        "from aiaas_cli.main import cli\n"
        "def walk(path, command):\n"
        "    try:\n"
        "        cli([*path, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    if isinstance(command, click.Group):\n"
        "        ctx = click.Context(command)\n"
        "        for name in command.list_commands(ctx):\n"
        "            walk([*path, name], command.get_command(ctx, name))\n"
        "try:\n"
        "    cli(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('top:', sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))\n"
        "walk([], cli)\n"
        "print('all:', sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    lines = result.stdout.splitlines()
    assert "top: []" in lines and lines[-1] == "all: []"
    assert "cluster   Start, inspect, stop or render the Ray cluster." in result.stdout
    assert "Usage: -c models optimize [OPTIONS] NAME:VERSION|NAME@ALIAS" in result.stdout


def test_validate_ok_and_exit_codes(tmp_path: Path) -> None:
    runner = CliRunner()
    good = REPO / "configs" / "cluster" / "local.yaml"
    result = runner.invoke(cli, ["validate", str(good)])
    assert result.exit_code == 0
    assert f"ok  {good} (cluster)" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "kind: cluster\nhead: {num_cpus: 1, memory: 1GiB, object_store_memory: 1GiB, x: 1}\n"
    )
    result = runner.invoke(cli, ["validate", str(good), str(bad)])
    assert result.exit_code == 1
    assert result.output.endswith(
        f"Error: 1 of 2 files invalid:\n{bad}: not a valid cluster config (1 problem):\n"
        "  • head.x (line 2): unknown field; allowed fields: num_cpus, num_gpus, memory, "
        "object_store_memory, resources, labels\n"
    )
    assert "Traceback" not in result.output


def test_debug_env_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = CliRunner().invoke(cli, ["cluster", "up", str(missing)], env={"AIAAS_DEBUG": "1"})
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "ConfigError"


def test_cluster_up_dry_run_starts_nothing(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["cluster", "up", str(REPO / "configs/cluster/local.yaml"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "would start head         head   CPU=1 GPU=0 memory=4.0GiB object_store=1.0GiB",
        "would start cpu-1        worker CPU=2 GPU=0 memory=4.0GiB object_store=768.0MiB",
        "would start cpu-2        worker CPU=2 GPU=0 memory=4.0GiB object_store=768.0MiB",
    ]


def test_missing_default_config_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["cluster", "status"])
    assert result.exit_code == 1
    assert result.output == (
        "Error: configs/cluster/local.yaml: no such file\n"
        "Check the path; shipped configs live under configs/.\n"
    )


def test_monitor_commands_fail_cleanly_without_a_cluster(tmp_path: Path) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text(
        (REPO / "configs/cluster/local.yaml")
        .read_text()
        .replace("storage_root: ~/.aiaas", f"storage_root: {tmp_path}/storage")
    )
    runner = CliRunner()
    up = runner.invoke(cli, ["monitor", "up", "--cluster", str(config)])
    assert up.exit_code == 1
    assert "Error: no cluster 'local' is running" in up.output and "aiaas cluster up" in up.output
    boards = runner.invoke(cli, ["monitor", "dashboards", "--cluster", str(config)])
    assert boards.exit_code == 1 and "--grafana-url" in boards.output
    dry = runner.invoke(cli, ["monitor", "up", "--dry-run", "--cluster", str(config)])
    assert dry.exit_code == 0 and "AiaasServingErrorRate" in dry.output
    bad = tmp_path / "monitoring.yaml"
    bad.write_text("kind: monitoring\nprometheus: {scrape_interval: often}\n")
    refused = runner.invoke(cli, ["monitor", "up", "--config", str(bad), "--cluster", str(config)])
    assert refused.exit_code == 1 and "prometheus.scrape_interval" in refused.output
    assert "Traceback" not in refused.output
